"""Every examples/ recipe runs end to end on the tiny fixtures: the loss falls and the result reloads through Auto."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer

import hf_kadapter as hk

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "examples"))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.fixture(scope="session")
def recipe_base(tmp_path_factory) -> str:
    """A tiny random BERT with a WordPiece vocabulary covering every fixture word (a Hub model stand-in)."""
    words: set[str] = {"@", "#"}
    for path in FIXTURES.iterdir():
        text = path.read_text(encoding="utf-8")
        records = (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
        for string in _strings(records):
            words.update(re.findall(r"\w+|[^\w\s]", string.lower()))
    folder = tmp_path_factory.mktemp("recipe-base")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,  # deterministic losses when the base trains
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


PRETRAINING_FILES = ("trex_train.json", "dep_sentences.jsonl")


def _argv(base: str, output: Path, train: str, *extra: str, steps: int = 15) -> list[str]:
    argv = [
        "--base_model", base, "--train_file", str(FIXTURES / train), "--output_dir", str(output),
        "--do_train", "--max_steps", str(steps), "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--seed", "0",
        "--disable_tqdm", "true", "--max_length", "64", "--classifier_dropout", "0",
    ]  # fmt: skip
    if train in PRETRAINING_FILES:  # the new adapter's settings: flags of the pretraining scripts only
        argv += ["--adapter_hidden_size", "16", "--adapter_heads", "2", "--adapter_intermediate_size", "32",
                 "--tap_layers", "0,2,4", "--adapter_dropout", "0"]  # fmt: skip
    else:
        argv += ["--lora_dropout", "0"]
    return [*argv, *extra]


def _run(script: str, argv: list[str]):
    module = importlib.import_module(script)
    return module.main(argv)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_learns_and_reloads(trainer, output: Path) -> None:
    losses = _losses(trainer)  # full-batch steps, no dropout: the training loss must clearly fall
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert (output / "trainer_state.json").exists() and (output / "all_results.json").exists()
    reloaded = AutoModel.from_pretrained(output)
    assert isinstance(reloaded, hk.KAdapterModel)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if inputs["input_ids"].dim() == 3:  # multiple choice
        inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
    with torch.no_grad():
        expected = model.kadapter(**inputs).last_hidden_state
        assert torch.allclose(reloaded(**inputs).last_hidden_state, expected, atol=1e-5)


@pytest.fixture(scope="module")
def factual_adapter(recipe_base, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fac-adapter")
    trainer = _run("pretrain_factual", _argv(recipe_base, output, "trex_train.json"))
    _assert_learns_and_reloads(trainer, output)
    assert trainer.model.config.frozen_adapters == []
    assert isinstance(hk.KAdapterForFactualPretraining.from_pretrained(output), hk.KAdapterForFactualPretraining)
    return output


def test_pretrain_factual(factual_adapter):
    saved = json.loads((factual_adapter / "config.json").read_text())
    assert list(saved["adapters"]) == ["factual"] and saved["pretraining_adapter"] == "factual"


def test_pretrain_factual_from_the_feature_cache_matches(recipe_base, factual_adapter, tmp_path):
    plain = json.loads((factual_adapter / "trainer_state.json").read_text())["log_history"]
    output = tmp_path / "cached"
    argv = _argv(recipe_base, output, "trex_train.json", "--feature_cache_dir", str(tmp_path / "cache"))
    trainer = _run("pretrain_factual", argv)
    assert _losses(trainer) == pytest.approx([e["loss"] for e in plain if "loss" in e], rel=1e-5)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    _run("pretrain_factual", argv)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # reused, not rebuilt


def test_pretrain_factual_with_a_half_precision_cache_and_base(recipe_base, factual_adapter, tmp_path):
    plain = json.loads((factual_adapter / "trainer_state.json").read_text())["log_history"]
    cache = tmp_path / "cache"
    argv = _argv(recipe_base, tmp_path / "half", "trex_train.json", "--feature_cache_dir", str(cache),
                 "--feature_cache_dtype", "bfloat16", "--base_dtype", "bfloat16")  # fmt: skip
    trainer = _run("pretrain_factual", argv)
    # The same run within half precision's rounding (bfloat16 keeps ~3 significant digits).
    assert _losses(trainer) == pytest.approx([e["loss"] for e in plain if "loss" in e], rel=5e-2)
    (built,) = cache.iterdir()
    metadata = json.loads((built / "metadata.json").read_text())
    assert metadata["dtype"] == "bfloat16" and metadata["base_dtype"] == "bfloat16"
    core = trainer.model.kadapter
    assert {p.dtype for p in core.pretrained_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in core.adapters.parameters()} == {torch.float32}
    assert json.loads((tmp_path / "half" / "run_arguments.json").read_text())["feature_cache_dtype"] == "bfloat16"


def test_half_precision_flags_name_what_is_missing():
    from hf_kadapter.kadapter.recipes import FineTuningArguments, PretrainingArguments

    with pytest.raises(ValueError, match="there is no cache: add --feature_cache_dir"):
        PretrainingArguments(base_model="base", feature_cache_dtype="float16")
    with pytest.raises(ValueError, match="--feature_cache_dtype 'int8' is not one of"):
        PretrainingArguments(base_model="base", feature_cache_dir="cache", feature_cache_dtype="int8")
    with pytest.raises(ValueError, match="the regime 'paper' trains it.*--bf16"):
        FineTuningArguments(base_model="base", base_dtype="bfloat16")
    assert FineTuningArguments(base_model="base", base_dtype="bfloat16", regime="adapters").base_dtype == "bfloat16"


def test_pretrain_linguistic_keeps_the_factual_adapter_intact(recipe_base, factual_adapter, tmp_path):
    output = tmp_path / "lin"
    source = hk.KAdapterModel.from_pretrained(factual_adapter).eval()
    trainer = _run(
        "pretrain_linguistic",
        _argv(recipe_base, output, "dep_sentences.jsonl", "--load_adapters", str(factual_adapter), steps=20),
    )
    _assert_learns_and_reloads(trainer, output)
    model = trainer.model.eval()
    assert model.config.frozen_adapters == ["factual"] and model.pretraining_adapter == "linguistic"
    tokens = AutoTokenizer.from_pretrained(recipe_base)(["the cat sat on the mat ."], return_tensors="pt")
    with torch.no_grad():
        after = model.kadapter(**tokens)
        before = source(**tokens)
    assert torch.equal(model.kadapter.adapter_output(after, "factual"), before.adapter_hidden_states[0])

    # Fine-tuning with both folders: the factual adapter repeated inside the linguistic folder is loaded once.
    argv = _argv(recipe_base, tmp_path / "rel", "tacred_train.json", "--load_adapters", str(factual_adapter),
                 str(output), steps=2)  # fmt: skip
    tuned = _run("finetune_relation", argv).model
    assert list(tuned.config.adapters) == ["factual", "linguistic"]


@pytest.mark.parametrize(
    ("script", "train", "regime"),
    [
        ("finetune_entity_typing", "openentity_train.json", "paper"),
        ("finetune_relation", "tacred_train.json", "adapters"),
        ("finetune_multiple_choice", "cosmosqa_tiny.jsonl", "lora"),
        ("finetune_qa", "squad_tiny.json", "adapters"),
        ("finetune_entity_typing", "openentity_train.json", "probe"),
    ],
)
def test_finetuning_recipes(recipe_base, factual_adapter, tmp_path, capsys, script, train, regime):
    output = tmp_path / script
    argv = _argv(
        recipe_base, output, train, "--load_adapters", f"factual={factual_adapter}", "--regime", regime,
        "--validation_file", str(FIXTURES / train), "--do_eval", "--per_device_eval_batch_size", "4", steps=30,
    )  # fmt: skip
    if script == "finetune_qa":
        argv += ["--doc_stride", "32"]
    trainer = _run(script, argv)
    printed = capsys.readouterr().out
    assert "***** eval metrics *****" in printed  # printed, as transformers' example scripts do
    assert f"hf_kadapter.kadapter.recipes - regime {regime}:" in printed  # the package's own INFO logs show
    _assert_learns_and_reloads(trainer, output)
    model = trainer.model
    assert model.config.frozen_adapters == (["factual"] if regime != "adapters" else [])
    base_trains = model.base_weights_trainable()
    assert base_trains == (regime == "paper")
    assert (model.config.base_lora is not None) == (regime == "lora")
    if regime == "probe":  # what the adapters know, measured: only the fusion and the head train
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("kadapter.fusion.", "classifier.")) for n in trainable)
    results = json.loads((output / "all_results.json").read_text())
    evaluation = json.loads((output / "eval_results.json").read_text()) if script == "finetune_qa" else results
    expected_metric = {
        "finetune_entity_typing": "eval_loose_micro_f1",
        "finetune_relation": "eval_f1",
        "finetune_multiple_choice": "eval_accuracy",
        "finetune_qa": "eval_f1",
    }[script]
    assert any(key.startswith(expected_metric) for key in evaluation), evaluation


def test_rerunning_an_output_dir_resumes_or_refuses_changed_arguments(recipe_base, tmp_path, capsys):
    output = tmp_path / "fac"
    argv = _argv(recipe_base, output, "trex_train.json", "--save_strategy", "steps", "--save_steps", "2", steps=2)
    _run("pretrain_factual", argv)
    assert json.loads((output / "run_arguments.json").read_text())["learning_rate"] == 3e-3
    results = json.loads((output / "all_results.json").read_text())
    capsys.readouterr()
    assert _run("pretrain_factual", argv).state.global_step == 2  # the same arguments: resumed (and finished)
    printed = capsys.readouterr().out
    assert "holds a run with the same arguments: resuming" in printed and "had already trained to step 2" in printed
    # the finished run's results stay (the resumed session trained nothing: its train_loss 0.0 is no result)
    assert json.loads((output / "all_results.json").read_text()) == results and results["train_loss"] > 0
    record = json.loads((output / "run_arguments.json").read_text())
    for newer in ("base_dtype", "feature_cache_dtype"):  # a run recorded before these flags existed
        del record[newer]
    (output / "run_arguments.json").write_text(json.dumps(record))
    assert _run("pretrain_factual", argv).state.global_step == 2  # flags at their defaults change nothing
    assert "holds a run with the same arguments: resuming" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--base_dtype: 'float32' -> 'bfloat16'"):  # recorded by the resume
        _run("pretrain_factual", [*argv, "--base_dtype", "bfloat16"])
    changed = [*argv, "--learning_rate", "1e-3"]
    # Before: resumed the finished run, trained nothing and overwrote the results; with other taps it crashed.
    with pytest.raises(
        ValueError, match=r"--learning_rate: 0\.003 -> 0\.001.*new --output_dir.*--overwrite_output_dir"
    ):
        _run("pretrain_factual", changed)
    with pytest.raises(ValueError, match=r"--tap_layers: '0,2,4' -> '0,4'"):
        _run("pretrain_factual", [*argv, "--tap_layers", "0,4"])
    (output / "checkpoint-best").mkdir()  # the user's copy, not a Trainer checkpoint: --overwrite_output_dir keeps it
    (output / "checkpoint-best" / "notes.txt").write_text("mine")
    trainer = _run("pretrain_factual", [*changed, "--overwrite_output_dir"])
    assert trainer.state.global_step == 2 and trainer.args.learning_rate == 1e-3
    assert (output / "checkpoint-best" / "notes.txt").read_text() == "mine"
    assert json.loads((output / "run_arguments.json").read_text())["learning_rate"] == 1e-3


def test_linguistic_evaluation_joins_batches_of_other_lengths(recipe_base, tmp_path, capsys):
    output = tmp_path / "lin"
    argv = _argv(recipe_base, output, "dep_sentences.jsonl", "--validation_file", str(FIXTURES / "dep_sentences.jsonl"),
                 "--do_eval", "--per_device_eval_batch_size", "1", "--gradient_checkpointing", steps=2)  # fmt: skip
    _run("pretrain_linguistic", argv)  # before: logits (1, 9, 9) and (1, 6, 6) could not be concatenated
    printed = capsys.readouterr().out
    assert "***** eval metrics *****" in printed and "pretraining the adapter 'linguistic'" in printed
    assert 0 <= json.loads((output / "eval_results.json").read_text())["eval_accuracy"] <= 1


@pytest.mark.parametrize(
    ("script", "train", "flag"),
    [
        ("pretrain_factual", "trex_train.json", "--regime"),
        ("pretrain_linguistic", "dep_sentences.jsonl", "--lora_r"),
        ("finetune_relation", "tacred_train.json", "--feature_cache_dir"),
        ("finetune_entity_typing", "openentity_train.json", "--tap_layers"),
    ],
)
def test_scripts_do_not_offer_flags_they_ignore(recipe_base, tmp_path, script, train, flag):
    with pytest.raises(ValueError, match=f"not used by the HfArgumentParser.*{flag}"):
        _run(script, _argv(recipe_base, tmp_path / "out", train, flag, "1"))

"""kill -9 at every write boundary and at random points (tests/faults.py): every long job resumes to the same bytes as
an uninterrupted run, every saved-folder kind shows its old or its new version after a kill (never a mix), and two
builders of the same folder both succeed with the right result.

HF_KADAPTER_RELIABILITY_REPORT=faults.json python -m pytest -q tests/test_reliability_faults.py  writes the counts.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import DOCS as CHAR_DOCS
from conftest import char_tokenizer, make_model, tiny_adapter, tiny_bert_config
from datasets import Dataset
from faults import KILLED, Tally, boundaries, fault_hook, leftovers, random_delays, run_child, snapshot
from test_kadapter_feature_cache import factual, toy_dataset
from test_pelt_build import CORPUS, bert_tokenizer, tiny_bert
from test_recipes import FIXTURES, recipe_base  # noqa: F401 (a fixture)
from test_retrieval_retriever import DOCS, make_embedder, tiny_tokenizer
from transformers import AutoModel, AutoTokenizer, BertForMaskedLM, BertModel, Trainer, TrainingArguments
from transformers.trainer_callback import TrainerState

import hf_kadapter as hk
import hf_kadapter.utils.io as shared_io
from hf_kadapter.kadapter.data import KAdapterDataCollator, build_label_vocab, load_factual, preprocess_factual
from hf_kadapter.kadapter.feature_cache import build_feature_cache
from hf_kadapter.kadapter.recipes import PretrainingArguments, build_pretraining_model, run
from hf_kadapter.pelt import EntityLookupTable, PELTModel, PELTTokenizer, build_entity_table
from hf_kadapter.retrieval import (
    DocumentIndex,
    OpenQAReader,
    RealmKnowledgeAugmentedMLM,
    RealmStyleRetriever,
    RetrieverEmbedder,
)
from hf_kadapter.utils.io import recover_folder

TALLY = Tally("faults")


@pytest.fixture(scope="module", autouse=True)
def report():
    torch.set_num_threads(1)
    yield
    TALLY.write()


def check_kills(name: str, job_for, reference: dict, points: list[int], delays: list[float], tmp: Path, ignore=None):
    """For each boundary in `points` and each delay: a fresh folder, a run killed there, a resumed run; the result
    must be `reference` byte for byte, with no staging folder, record or temporary file left."""
    ignore = ignore or (lambda relative: False)
    for how, kills in (("boundary", [dict(kill_at=n) for n in points]), ("random", [dict(kill_after=d) for d in delays])):
        for i, kill in enumerate(kills):
            out = tmp / f"{name}-{how}-{i}"
            code = run_child(job_for(out), **kill)
            assert code in ((KILLED,) if how == "boundary" else (KILLED, 0)), (name, kill, code)
            assert run_child(job_for(out)) == 0, (name, kill)
            result = snapshot(out, ignore)
            different = sorted(k for k in set(result) | set(reference) if result.get(k) != reference.get(k))
            assert not different, (name, kill, different)
            assert not leftovers(out), (name, kill, leftovers(out))
            TALLY.add(name, how, True)


# ---------------------------------------------------------------------------------------------------------------
# Long jobs: kill, resume, same bytes
# ---------------------------------------------------------------------------------------------------------------
def test_pelt_build_resumes_to_the_same_bytes_after_any_kill(tmp_path):
    tokenizer = bert_tokenizer(tmp_path / "vocab")
    model = tiny_bert(len(tokenizer))

    def job_for(out):
        return lambda: build_entity_table(model, tokenizer, CORPUS, output_dir=out, batch_size=2, chunk_size=8,
                                          progress=False)  # fmt: skip

    started = time.perf_counter()
    labels = boundaries(job_for(tmp_path / "reference"))
    reference = snapshot(tmp_path / "reference")
    assert sorted(reference) == ["README.md", "entity_table.safetensors", "entity_table_config.json", "entity_vocab.json"]
    delays = random_delays(1, 2, time.perf_counter() - started)
    check_kills("pelt_build", job_for, reference, list(range(1, len(labels) + 1)), delays, tmp_path)


def test_index_build_resumes_to_the_same_bytes_after_any_kill(tmp_path):
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    corpus = [{"id": d, "title": t, "text": x} for d, t, x in DOCS]  # a list corpus: fingerprinted too

    def job_for(out):
        return lambda: retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=out, progress=False)

    started = time.perf_counter()
    labels = boundaries(job_for(tmp_path / "reference"))
    reference = snapshot(tmp_path / "reference")
    assert "index/embeddings.safetensors" in reference and "build_state.json" in reference
    delays = random_delays(2, 2, time.perf_counter() - started)
    check_kills("index_build", job_for, reference, list(range(1, len(labels) + 1)), delays, tmp_path)


def test_feature_cache_build_resumes_to_the_same_bytes_after_any_kill(base_dirs, tmp_path):
    model, data = factual(base_dirs["bert"]), toy_dataset(size=20)

    def job_for(out):
        return lambda: build_feature_cache(model, data, out, batch_size=4, chunk_size=10, progress=False)

    started = time.perf_counter()
    labels = boundaries(job_for(tmp_path / "reference"))
    reference = snapshot(tmp_path / "reference")
    assert any(name.endswith("hidden_states.npy") for name in reference)
    delays = random_delays(3, 2, time.perf_counter() - started)
    check_kills("feature_cache_build", job_for, reference, list(range(1, len(labels) + 1)), delays, tmp_path)


# Trainer writes its own checkpoint files in place; these stand-ins write each in two halves with a write boundary in
# between, so a kill can leave a torn optimizer.pt or trainer_state.json, as a real kill during a save can.
_real_save, _real_to_json = torch.save, TrainerState.save_to_json


def _torn_save(obj, target, *args, **kwargs):
    if not isinstance(target, (str, os.PathLike)):
        return _real_save(obj, target, *args, **kwargs)
    buffer = io.BytesIO()
    _real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(target, "wb") as stream:
        stream.write(data[: len(data) // 2])
        stream.flush()
        shared_io._fault_point("torch.save:half")
        stream.write(data[len(data) // 2 :])
    shared_io._fault_point("torch.save:done")


def _torn_to_json(self, path):
    _real_to_json(self, path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    shared_io._fault_point("trainer_state:half")
    Path(path).write_bytes(data)
    shared_io._fault_point("trainer_state:done")


@pytest.fixture(scope="module")
def factual_parts(recipe_base):  # noqa: F811 (the fixture imported above)
    args = PretrainingArguments(base_model=recipe_base, adapter_hidden_size=16, adapter_heads=2,
                             adapter_intermediate_size=32, tap_layers="0,2,4", adapter_dropout=0.0,
                             classifier_dropout=0.0)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(recipe_base)
    train = load_factual(FIXTURES / "trex_train.json")
    label2id = build_label_vocab(train, field="relation")
    features = preprocess_factual(train, tokenizer, label2id, max_length=64)
    torch.manual_seed(0)
    model = build_pretraining_model(
        hk.KAdapterForFactualPretraining, args, "factual", id2label={i: k for k, i in label2id.items()},
        label2id=label2id,
    )  # fmt: skip
    return model, features, KAdapterDataCollator(tokenizer, label_kind="scalar")


def test_recipe_training_resumes_from_the_last_complete_checkpoint_after_any_kill(factual_parts, tmp_path):
    template, features, collator = factual_parts

    def job_for(out):
        def train():
            torch.save, TrainerState.save_to_json = _torn_save, _torn_to_json
            try:
                args = TrainingArguments(
                    output_dir=str(out), do_train=True, max_steps=3, save_strategy="steps", save_steps=1,
                    save_total_limit=2, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1,
                    report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                )  # fmt: skip
                run(Trainer(model=copy.deepcopy(template), args=args, train_dataset=features, data_collator=collator), args)
            finally:
                torch.save, TrainerState.save_to_json = _real_save, _real_to_json

        return train

    started = time.perf_counter()
    labels = boundaries(job_for(tmp_path / "reference"))

    def timing(relative: str) -> bool:  # wall-clock metrics, pickled arguments (paths) and checkpoints are not results
        return relative.startswith("checkpoint-") or relative in (
            "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json", "training_args.bin")  # fmt: skip

    reference = snapshot(tmp_path / "reference", timing)
    assert "model.safetensors" in reference
    # In the second checkpoint's save: our commit of the model recorded but nothing moved, half moved; Trainer's
    # optimizer.pt torn, trainer_state.json torn, the checkpoint complete. In the final save: the output folder's
    # commit half moved, its trainer_state.json torn, all_results.json written but not renamed.
    saves = [i for i, label in enumerate(labels) if label == "commit:staged"]
    second, final = labels[saves[1] : saves[2]], labels[saves[-1] :]
    points = [saves[1] + second.index(label) + 1 for label in (
        "commit:recorded", "commit:moved", "torch.save:half", "trainer_state:half", "trainer_state:done")]
    points += [saves[-1] + final.index(label) + 1 for label in (
        "commit:moved", "trainer_state:half", "atomic_write:written")]  # fmt: skip
    delays = random_delays(4, 1, time.perf_counter() - started)
    check_kills("recipe_training", job_for, reference, points, delays, tmp_path, ignore=timing)


def test_resume_names_the_incomplete_checkpoints_it_skips(factual_parts, tmp_path, caplog):
    template, features, collator = factual_parts
    out = tmp_path / "run"
    for step, broken in ((1, None), (2, "trainer_state.json"), (3, "optimizer.pt")):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        template.save_pretrained(folder)
        torch.save({"step": step}, folder / "optimizer.pt")
        torch.save({"step": step}, folder / "rng_state.pth")
        if broken:
            target = folder / broken
            target.write_bytes(target.read_bytes()[:-7])
    from hf_kadapter.kadapter.recipes import last_complete_checkpoint

    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(out, require_optimizer=True) == str(out / "checkpoint-1")
    assert "checkpoint-3: optimizer.pt is not a whole torch archive" in caplog.text
    assert "checkpoint-2" in caplog.text and "trainer_state.json is damaged" in caplog.text
    (out / "checkpoint-1" / "rng_state.pth").unlink()
    assert last_complete_checkpoint(out, require_optimizer=True) is None
    assert "no rng_state" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Saved folders: after a kill anywhere in a save, the old version or the new one, never a mix
# ---------------------------------------------------------------------------------------------------------------
def _distinct(labels: list[str]) -> list[int]:
    """The first boundary of each kind (1-based): enough where the mechanism is the one tested in full above."""
    return sorted({labels.index(label) + 1 for label in labels})


def _old_or_new(name: str, save_old, save_new, load, tmp: Path, every: bool = True) -> None:
    """save_old(folder) then save_new(folder) killed at each of its boundaries (or the first of each kind):
    loading the folder works and shows exactly the old or the new files; a save afterwards completes."""
    old, new = tmp / f"{name}-old", tmp / f"{name}-new"
    save_old(old)
    save_new(new)
    versions = [snapshot(old), snapshot(new)]
    probe = tmp / f"{name}-probe"
    save_old(probe)
    labels = boundaries(lambda: save_new(probe))
    assert snapshot(probe) == versions[1]
    for n in range(1, len(labels) + 1) if every else _distinct(labels):
        folder = tmp / f"{name}-{n}"
        save_old(folder)
        assert run_child(lambda folder=folder: save_new(folder), kill_at=n) == KILLED
        load(folder)  # finishes the interrupted save, or discards it
        assert snapshot(folder) in versions, (name, n, labels[n - 1])
        assert not leftovers(folder), (name, n, leftovers(folder))
        save_new(folder)
        assert snapshot(folder) == versions[1]
        TALLY.add(f"save_{name}", "boundary", True)


def test_kadapter_folders_show_the_old_or_the_new_save(base_dirs, tmp_path):
    first = make_model(base_dirs["bert"], seed=0)
    second = make_model(base_dirs["bert"], seed=1, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter()})
    _old_or_new("kadapter", first.save_pretrained, second.save_pretrained, AutoModel.from_pretrained, tmp_path)


def test_entity_tables_show_the_old_or_the_new_save(tmp_path):
    tokenizer = bert_tokenizer(tmp_path / "vocab")
    model = tiny_bert(len(tokenizer))
    table = build_entity_table(model, tokenizer, CORPUS, progress=False)
    bigger = build_entity_table(model, tokenizer, CORPUS * 2, progress=False)
    _old_or_new("entity_table", table.save_pretrained, bigger.save_pretrained, EntityLookupTable.from_pretrained, tmp_path)
    slots = PELTTokenizer(tokenizer, entity_vocab=["Q1"])
    relabelled = PELTTokenizer(tokenizer, entity_vocab=["Q1", "Q2"])
    _old_or_new("pelt_tokenizer", slots.save_pretrained, relabelled.save_pretrained, PELTTokenizer.from_pretrained,
                tmp_path, every=False)  # fmt: skip


def test_indexes_and_retrievers_show_the_old_or_the_new_save(tmp_path):
    torch.manual_seed(0)
    documents = Dataset.from_dict({"id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    small = DocumentIndex(["a", "b"], torch.randn(2, 8))
    large = DocumentIndex(["a", "b", "c"], torch.randn(3, 8), documents=documents)
    _old_or_new("document_index", small.save_pretrained, large.save_pretrained, DocumentIndex.from_pretrained, tmp_path,
                every=False)  # fmt: skip

    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    retriever.build_index([{"id": d, "title": t, "text": x} for d, t, x in DOCS[:4]], batch_size=4, max_length=32,
                          progress=False)  # fmt: skip
    grown = copy.copy(retriever)
    grown.index = copy.deepcopy(retriever.index)
    grown.add_documents([{"id": d, "title": t, "text": x} for d, t, x in DOCS[4:]], max_length=32)
    _old_or_new("retriever", retriever.save_pretrained, grown.save_pretrained, RealmStyleRetriever.from_pretrained,
                tmp_path, every=False)  # fmt: skip


def test_composite_models_show_the_old_or_the_new_save(tmp_path):
    """PELTModel (weights + entity_table/), OpenQAReader and RealmKnowledgeAugmentedMLM (weights + retriever/)."""
    tokenizer = char_tokenizer(tmp_path / "chars")
    corpus = [{"text": t, "mentions": [{"char_start": 0, "char_end": len(t.split()[0]), "entity_id": e}]}
              for t, e in (("paris is in france.", "Q90"), ("rome is in italy.", "Q220"))]  # fmt: skip
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config())
    table = build_entity_table(mlm, tokenizer, corpus, progress=False)
    old, new = PELTModel(copy.deepcopy(mlm), table), PELTModel(copy.deepcopy(mlm), table)
    with torch.no_grad():
        next(new.parameters()).add_(1.0)
    new.set_table(build_entity_table(mlm, tokenizer, corpus * 2, progress=False), check=False)
    _old_or_new("pelt_model", old.save_pretrained, new.save_pretrained, PELTModel.from_pretrained, tmp_path,
                every=False)  # fmt: skip

    encoder = BertModel(tiny_bert_config(num_hidden_layers=2), add_pooling_layer=False)
    readers = [OpenQAReader(copy.deepcopy(encoder), max_span_width=3) for _ in range(2)]
    _old_or_new("reader", readers[0].save_pretrained, readers[1].save_pretrained, OpenQAReader.from_pretrained,
                tmp_path, every=False)  # fmt: skip

    embedder = RetrieverEmbedder.from_encoder(BertModel(tiny_bert_config(), add_pooling_layer=False), projection_dim=8)
    retriever = RealmStyleRetriever(embedder, tokenizer)
    retriever.build_index([{"id": d, "title": t, "text": x} for d, t, x in CHAR_DOCS], max_length=24, progress=False)
    models = [RealmKnowledgeAugmentedMLM(BertForMaskedLM(tiny_bert_config()), retriever, k=2, doc_max_length=24)
              for _ in range(2)]  # fmt: skip
    _old_or_new("realm_mlm", models[0].save_pretrained, models[1].save_pretrained,
                RealmKnowledgeAugmentedMLM.from_pretrained, tmp_path, every=False)  # fmt: skip


def test_saving_a_loaded_retriever_into_its_own_folder(tmp_path):
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    corpus = Dataset.from_dict({k: [d[i] for d in DOCS] for i, k in enumerate(("id", "title", "text"))})
    retriever.build_index(corpus, batch_size=4, max_length=32, progress=False)
    retriever.save_pretrained(tmp_path / "saved")
    loaded = RealmStyleRetriever.from_pretrained(tmp_path / "saved")  # documents memory-mapped from that folder
    loaded.add_documents([{"id": "d9", "title": "athens", "text": "athens is the capital of greece."}], max_length=32)
    loaded.save_pretrained(tmp_path / "saved")
    again = RealmStyleRetriever.from_pretrained(tmp_path / "saved")
    assert again.index.ids == [d[0] for d in DOCS] + ["d9"] and len(again.documents) == len(DOCS) + 1
    assert again.retrieve(["athens"], k=len(DOCS) + 1, max_length=32).texts[0]  # the documents read back
    index = DocumentIndex.from_pretrained(tmp_path / "saved" / "index")
    index.save_pretrained(tmp_path / "saved" / "index")
    assert DocumentIndex.from_pretrained(tmp_path / "saved" / "index").ids == again.index.ids


# ---------------------------------------------------------------------------------------------------------------
# Concurrent builders of one folder
# ---------------------------------------------------------------------------------------------------------------
class _SlowAt:
    """Sleeps at the first write boundary, so a second builder starts while the first one is mid-build."""

    def __init__(self):
        self.slept = False

    def __call__(self, label: str) -> None:
        if not self.slept:
            self.slept = True
            time.sleep(0.5)


def _two_builders(name: str, build, reference_dir: Path, out: Path) -> None:
    build(reference_dir)
    reference = snapshot(reference_dir)

    def first():
        with fault_hook(_SlowAt()):
            build(out)

    pid_codes = []
    for job in (first, lambda: build(out)):
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                job()
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        gc.unfreeze()
        pid_codes.append(pid)
        time.sleep(0.1)
    for pid in pid_codes:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, name
    assert snapshot(out) == reference, name
    TALLY.add(f"concurrent_{name}", "two_builders", True)


def test_two_builders_of_one_folder_both_succeed(base_dirs, tmp_path):
    model, data = factual(base_dirs["bert"]), toy_dataset(size=12)
    _two_builders("feature_cache", lambda out: build_feature_cache(model, data, out, batch_size=4, chunk_size=4,
                                                                   progress=False),
                  tmp_path / "cache-reference", tmp_path / "cache")  # fmt: skip
    tokenizer = bert_tokenizer(tmp_path / "vocab")
    mlm = tiny_bert(len(tokenizer))
    _two_builders("entity_table", lambda out: build_entity_table(mlm, tokenizer, CORPUS, output_dir=out,
                                                                 chunk_size=8, progress=False),
                  tmp_path / "table-reference", tmp_path / "table")  # fmt: skip
    retriever = RealmStyleRetriever(make_embedder(), tiny_tokenizer(tmp_path))
    corpus = [{"id": d, "title": t, "text": x} for d, t, x in DOCS]
    _two_builders("index", lambda out: retriever.build_index(corpus, batch_size=3, max_length=32, output_dir=out,
                                                             progress=False),
                  tmp_path / "index-reference", tmp_path / "index")  # fmt: skip


def test_recovery_finishes_a_commit_whose_writer_died(tmp_path):
    """The roll-forward itself: a record whose files were half moved is finished by the next reader."""
    first = {"a.json": b"1", "b.json": b"1"}
    for name, data in first.items():
        (tmp_path / name).write_bytes(data)
    def save():
        with shared_io.FolderCommit(tmp_path) as staging:
            (staging / "a.json").write_bytes(b"2")
            (staging / "b.json").write_bytes(b"2")

    labels = boundaries(save)
    for name, data in first.items():
        (tmp_path / name).write_bytes(data)
    moved_once = labels.index("commit:moved") + 1
    assert run_child(save, kill_at=moved_once) == KILLED
    def contents():
        return sorted((tmp_path / name).read_bytes() for name in first)

    assert contents() == [b"1", b"2"]  # a mix, on disk, until someone opens the folder
    recover_folder(tmp_path)
    assert contents() == [b"2", b"2"] and not leftovers(tmp_path)


def test_an_exception_during_a_commit_leaves_the_old_or_the_new_version(tmp_path):
    """Ctrl-C (or a full disk) inside the process, at every write boundary of a commit: once the record is written
    its staged files must survive the exception, so the next reader finishes the commit instead of mixing versions."""
    folder = tmp_path / "folder"
    versions = {"old": {"a.json": b"old", "b.json": b"old", "c.json": b"old"}, "new": {"a.json": b"new", "b.json": b"new"}}

    def save(version: str):
        with shared_io.FolderCommit(folder, stale=("*.json",)) as staging:
            for name, data in versions[version].items():
                (staging / name).write_bytes(data)

    save("old")
    labels = boundaries(lambda: save("new"))
    for n, label in enumerate(labels, start=1):
        save("old")
        count = iter(range(1, n + 1))

        def interrupt(label, count=count, n=n):
            if next(count, None) == n:
                raise KeyboardInterrupt

        with fault_hook(interrupt), pytest.raises(KeyboardInterrupt):
            save("new")
        with shared_io.reading_folder(folder):
            contents = {p.name: p.read_bytes() for p in folder.glob("*.json")}
        assert contents in list(versions.values()), (n, label, contents)
        assert not leftovers(folder), (n, label)


def test_commits_and_recovery_never_touch_foreign_files(tmp_path):
    foreign = {
        "checkpoint-1/model.safetensors": b"a Trainer checkpoint",  # matches a stale pattern, one level down
        "notes.json": b"{}",
        ".editor.tmp": b"someone else's temporary file",
        "model_card_draft.md": b"mine",
        "model_backup.safetensors": b"mine too",  # looks like weights, but not a name save_pretrained writes
    }
    for relative, data in foreign.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    for weights in (("model-00001-of-00002.safetensors", "model.safetensors.index.json"), ("model.safetensors",)):
        with shared_io.FolderCommit(tmp_path, stale=shared_io.WEIGHTS_PATTERNS) as staging:
            for name in weights:
                (staging / name).write_bytes(b"ours")
    recover_folder(tmp_path)
    assert {relative: (tmp_path / relative).read_bytes() for relative in foreign} == foreign
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()  # ours, stale once model.safetensors came
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "model.safetensors").read_bytes() == b"ours" and leftovers(tmp_path) == [".editor.tmp"]
    # and through a model's own save
    OpenQAReader(BertModel(tiny_bert_config(), add_pooling_layer=False), span_hidden_size=8).save_pretrained(tmp_path)
    assert {relative: (tmp_path / relative).read_bytes() for relative in foreign} == foreign

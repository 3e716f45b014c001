"""`hf-kadapter`: every command's help, argument errors, and the long jobs on tiny local models (same results as the
Python API, resumed when rerun)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOCS, char_tokenizer, tiny_bert_config
from transformers import BertForMaskedLM, BertModel

from hf_kadapter import EntityLookupTable, KAdapterModel, KnowledgeAdapterConfig, RealmStyleRetriever
from hf_kadapter.cli import build_parser, main
from hf_kadapter.kadapter.feature_cache import FeatureCache

COMMANDS = ("bench", "build-suite", "build-table", "build-index", "build-cache")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "--output-dir" in capsys.readouterr().out


def test_no_command_prints_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--methods", "kadapter,ernie"], "unknown method"),
        (["bench", "--set", "kadapter.head_epochs"], "not METHOD.FIELD=VALUE"),
        (["bench", "--set", "luke.epochs=3"], "--set names unknown method"),
        (["bench", "--set", "pelt.no_such_setting=3"], "no_such_setting"),
    ],
)
def test_bench_argument_errors_name_the_problem(argv, message, tmp_path):
    with pytest.raises((SystemExit, TypeError), match=message):
        main([*argv, "--smoke", "--output-dir", str(tmp_path)])


def _tiny_mlm(folder):
    tokenizer = char_tokenizer(folder)
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_build_table_matches_the_python_api_and_resumes(tmp_path, capsys):
    model_dir = _tiny_mlm(tmp_path / "mlm")
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"text": "paris is in france.", "mentions": [{"char_start": 0, "char_end": 5, "entity_id": "e:paris"}]},
        {"text": "i saw paris.", "mentions": [{"char_start": 6, "char_end": 11, "entity_id": "e:paris"}]},
        {"text": "rome is old.", "mentions": [{"char_start": 0, "char_end": 4, "entity_id": "e:rome"}]},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["build-table", "--model", str(model_dir), "--corpus", str(corpus), "--output-dir", str(tmp_path / "t"),
            "--max-occurrences", "4", "--max-length", "32"]  # fmt: skip
    assert main(argv) == 0
    table = EntityLookupTable.from_pretrained(tmp_path / "t")
    assert table.entity_ids == ["e:paris", "e:rome"] and table.counts.tolist() == [2, 1]
    from transformers import AutoTokenizer

    from hf_kadapter import build_entity_table

    direct = build_entity_table(BertForMaskedLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                                str(corpus), max_occurrences=4, max_length=32, progress=False)  # fmt: skip
    torch.testing.assert_close(table.sums, direct.sums)
    assert main(argv) == 0  # a finished build is loaded, not recomputed
    assert "saved in" in capsys.readouterr().out


def test_build_index_saves_a_retriever_that_retrieves(tmp_path):
    encoder_dir = tmp_path / "encoder"
    char_tokenizer(encoder_dir).save_pretrained(encoder_dir)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(), add_pooling_layer=False).save_pretrained(encoder_dir)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in DOCS))
    argv = ["build-index", "--encoder", str(encoder_dir), "--corpus", str(corpus), "--output-dir",
            str(tmp_path / "r"), "--max-length", "32", "--projection-dim", "8"]  # fmt: skip
    assert main(argv) == 0
    retriever = RealmStyleRetriever.from_pretrained(tmp_path / "r")
    assert len(retriever.index) == 3
    found = retriever.retrieve(["paris"], k=3, rescore=False)
    assert sorted(found.doc_ids[0]) == ["d0", "d1", "d2"]


def test_build_cache_writes_the_hidden_states_the_model_reads(tmp_path):
    base_dir = tmp_path / "base"
    char_tokenizer(base_dir).save_pretrained(base_dir)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_hidden_layers=2), add_pooling_layer=False).save_pretrained(base_dir)
    model = KAdapterModel.from_base(
        str(base_dir),
        adapters={"factual": KnowledgeAdapterConfig(tap_layers=[0, 1], hidden_size=8, num_attention_heads=2,
                                                    intermediate_size=16)},
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "typing.jsonl"
    records = [{"sent": "paris is in france .", "start": 0, "end": 5, "labels": ["location"]},
               {"sent": "i saw rome .", "start": 6, "end": 10, "labels": ["location"]}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["build-cache", "--model", str(tmp_path / "model"), "--task", "typing", "--data", str(data),
            "--output-dir", str(tmp_path / "cache"), "--max-length", "48"]  # fmt: skip
    assert main(argv) == 0
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    cache = FeatureCache(folder)
    assert cache.complete and len(cache) == 2 and cache.indices == [0, 1, 2]


def test_parser_lists_the_bench_modes():
    args = build_parser().parse_args(["bench", "--full"])
    assert args.mode == "full" and build_parser().parse_args(["bench"]).mode == "quick"

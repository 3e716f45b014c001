"""The WordNet knowledge suite: shipped, loadable, checked, split by entity, rebuilt identically from the raw files."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from hf_kadapter.bench import build_wordnet_suite, load_wordnet_suite, read_table, write_wordnet_suite
from hf_kadapter.bench.wordnet import SUITE_DIR, TABLES, WORDNET_DIR, entity_split, suite_checksum

HAVE_WORDNET = (WORDNET_DIR / "data.noun").is_file()


def test_shipped_tables_load_as_dataset_dicts_with_their_splits():
    manifest = json.loads((SUITE_DIR / "suite.json").read_text())
    for table in TABLES:
        loaded = load_wordnet_suite(table)
        assert {split: len(ds) for split, ds in loaded.items()} == manifest["tables"][table]["splits"]
    typing = load_wordnet_suite("typing")["test"][0]
    assert typing["sent"][typing["start"] : typing["end"]]  # a real mention span
    assert (SUITE_DIR / "LICENSE-WordNet").read_text().count("Princeton University") >= 2
    assert "Licence" in (SUITE_DIR / "README.md").read_text()
    assert suite_checksum().startswith("sha256:")


def test_splits_are_by_entity_and_facts_never_hold_held_out_typing_sentences():
    entities = {e["id"]: e for e in read_table("entities")}
    assert all(e["split"] == entity_split(e["id"]) for e in entities.values())
    typing = read_table("typing")
    by_split = defaultdict(set)
    for row in typing:
        assert row["split"] == entities[row["entity_id"]]["split"]
        by_split[row["split"]].add(row["entity_id"])
    assert not by_split["test"] & by_split["train"] and not by_split["dev"] & by_split["train"]
    held_out = {row["sent"] for row in typing if row["split"] != "train"}
    for fact in read_table("facts"):
        sentence = " ".join(fact["token"])
        definition = entities[fact["subj_label"]]["gloss"]
        assert definition not in held_out, sentence
    for question in read_table("questions"):
        assert question["split"] == entities[question["entity_id"]]["split"]
        document = next(d for d in read_table("documents") if d["id"] == question["gold_document"])
        assert any(answer in document["text"] for answer in question["answers"])
        break  # one full scan of the documents is enough; the builder checks every answer the same way


def test_a_damaged_table_is_named_not_used(tmp_path):
    copy = tmp_path / "suite"
    shutil.copytree(SUITE_DIR, copy)
    path = copy / "facts.jsonl.gz"
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=r"facts\.jsonl\.gz does not match the checksum"):
        read_table("facts", copy)
    with pytest.raises(FileNotFoundError, match="build-suite"):
        read_table("facts", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="Unknown table"):
        read_table("fact", copy)


@pytest.mark.skipif(not HAVE_WORDNET, reason="WordNet 3.0 is not installed (apt-get install wordnet-base)")
def test_rebuilding_from_the_raw_files_gives_the_shipped_bytes(tmp_path):
    manifest = write_wordnet_suite(build_wordnet_suite(WORDNET_DIR), tmp_path)
    shipped = json.loads((SUITE_DIR / "suite.json").read_text())
    assert manifest == shipped
    for table in TABLES:
        assert (tmp_path / f"{table}.jsonl.gz").read_bytes() == (SUITE_DIR / f"{table}.jsonl.gz").read_bytes()
        assert gzip.decompress((tmp_path / f"{table}.jsonl.gz").read_bytes())


def test_missing_wordnet_names_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        build_wordnet_suite(Path(tmp_path))

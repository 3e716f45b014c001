"""EntityLookupTable: lookup, normalised vectors, model checks, merging, and safetensors + JSON persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

import hf_kadapter as hk
from hf_kadapter.pelt.table import EntityLookupTable, EntityTableMismatchError, model_fingerprint

torch.set_num_threads(1)

FILES = {"entity_table.safetensors", "entity_vocab.json", "entity_table_config.json", "README.md"}


def tiny_mlm(seed: int = 0, kind: str = "bert"):
    torch.manual_seed(seed)
    settings = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**settings)).eval()
    return RobertaForMaskedLM(RobertaConfig(**settings, pad_token_id=1)).eval()


def make_table(model=None, n: int = 4, seed: int = 0, ids: list[str] | None = None) -> EntityLookupTable:
    model = model or tiny_mlm()
    generator = torch.Generator().manual_seed(seed)
    ids = ids or [f"Q{i + 1}" for i in range(n)]
    return EntityLookupTable(
        ids,
        torch.randn(len(ids), 32, generator=generator),
        torch.arange(1, len(ids) + 1),
        names=[f"Entity {i}" for i in ids],
        aliases=[[f"{i} alias"] for i in ids],
        metadata={
            "model_fingerprint": model_fingerprint(model),
            "model_name_or_path": "tiny/bert-mlm",
            "model_type": model.config.model_type,
            "max_occurrences": 256,
            "seed": 0,
            "num_occurrences": 10,
        },
    )


@pytest.fixture(scope="module")
def model():
    return tiny_mlm()


# ---------------------------------------------------------------------------------------------------------------
# Lookup and vectors
# ---------------------------------------------------------------------------------------------------------------
def test_lookup(model):
    table = make_table(model)
    assert len(table) == 4 and "Q2" in table and "Q9" not in table and 3 not in table
    assert table.index("Q3") == 2
    with pytest.raises(KeyError, match="'Q9'"):
        table.index("Q9")
    assert table.metadata["hidden_size"] == 32 and table.hidden_size == 32
    assert "entities=4" in repr(table)


def test_vectors_are_normalised_sums(model):
    table = make_table(model)
    expected = table.sums / table.sums.norm(dim=-1, keepdim=True) * 7.0
    assert torch.allclose(table.vectors(), expected)
    assert torch.allclose(table.vectors(torch.tensor([[2, 0], [1, 1]])), expected[torch.tensor([[2, 0], [1, 1]])])
    assert torch.allclose(table.vectors([3], norm=2.5).norm(dim=-1), torch.tensor([2.5]))
    assert table.vectors([]).shape == (0, 32)
    table.norm = 4.0
    assert torch.allclose(table.vectors([1]).norm(dim=-1), torch.tensor([4.0]))
    with pytest.raises(IndexError, match=r"\[-1\]"):
        table.vectors(torch.tensor([0, -1]))
    with pytest.raises(IndexError, match=r"\[4\]"):
        table.vectors([4])
    table.counts[1] = 0
    with pytest.raises(ValueError, match="'Q2'.*count 0"):
        table.vectors([0, 1])


def test_constructor_validates():
    with pytest.raises(ValueError, match="twice"):
        EntityLookupTable(["Q1", "Q1"], torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="sums"):
        EntityLookupTable(["Q1"], torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(TypeError, match="strings"):
        EntityLookupTable([1, 2], torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="names"):
        EntityLookupTable(["Q1"], torch.zeros(1, 4), torch.ones(1), names=["a", "b"])
    with pytest.raises(ValueError, match="hidden_size"):
        EntityLookupTable(["Q1"], torch.zeros(1, 4), torch.ones(1), metadata={"hidden_size": 8})
    table = EntityLookupTable(["Q1"], torch.ones(1, 4, dtype=torch.float64), torch.ones(1, dtype=torch.int32))
    assert table.sums.dtype == torch.float32 and table.counts.dtype == torch.long
    assert table.names == [None] and table.aliases == [[]] and table.norm == 7.0


def test_tables_made_under_inference_mode_can_still_grow(model):
    with torch.inference_mode():
        sums, counts = torch.randn(2, 32), torch.ones(2, dtype=torch.long)
    table = EntityLookupTable(["Q1", "Q2"], sums, counts, metadata={"model_fingerprint": model_fingerprint(model)})
    other = make_table(model, ids=["Q2", "Q3"])
    table.add_entities(other)  # in place: would fail on inference tensors
    assert table.counts.tolist() == [1, 2, 2]


# ---------------------------------------------------------------------------------------------------------------
# Model checks
# ---------------------------------------------------------------------------------------------------------------
def test_check_model_accepts_the_building_model_and_its_encoder(model):
    table = make_table(model)
    table.check_model(model)
    table.check_model(model.bert)
    assert model_fingerprint(model) == model_fingerprint(model.bert) == hk.base_fingerprint(model.bert)

    class Wrapper(torch.nn.Module):  # DistributedDataParallel / PELTModel-like wrappers are looked through
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    table.check_model(Wrapper(model))
    half = tiny_mlm().to(torch.bfloat16)  # same weights in another dtype: same fingerprint
    table.check_model(half)


def test_check_model_refuses_another_model_with_a_clear_message(model):
    table = make_table(model)
    other = tiny_mlm(seed=1, kind="roberta")
    other.config.name_or_path = "someone/other-mlm"
    with pytest.raises(EntityTableMismatchError) as caught:
        table.check_model(other)
    message = str(caught.value)
    assert "tiny/bert-mlm" in message and "someone/other-mlm" in message  # both models named
    assert table.metadata["model_fingerprint"] in message and model_fingerprint(other) in message
    assert "build_entity_table" in message  # and the fix
    assert isinstance(caught.value, ValueError)
    with pytest.raises(EntityTableMismatchError, match="random weights"):
        table.check_model(tiny_mlm(seed=2))


def test_check_model_uses_the_kadapter_base_fingerprint(model, tmp_path):
    table = make_table(model)
    adapter = hk.KnowledgeAdapterConfig(tap_layers=[0, 1], hidden_size=16, num_attention_heads=2, intermediate_size=32)
    kadapter = hk.KAdapterForEntityTyping.from_base(model, adapters={"factual": adapter}, num_labels=3)
    assert kadapter.config.base_fingerprint == model_fingerprint(model)
    table.check_model(kadapter)
    table.check_model(kadapter.kadapter)
    other = hk.KAdapterModel.from_base(tiny_mlm(seed=3), adapters={"factual": adapter})
    with pytest.raises(EntityTableMismatchError, match="KAdapterModel"):
        table.check_model(other)


# ---------------------------------------------------------------------------------------------------------------
# Growing the table
# ---------------------------------------------------------------------------------------------------------------
def test_add_entities_appends_new_rows_and_sums_shared_ones(model):
    table = make_table(model, ids=["Q1", "Q2", "Q3"])
    before_sums, before_counts = table.sums.clone(), table.counts.clone()
    other = make_table(model, ids=["Q3", "Q4", "Q5"], seed=1)
    other.names[0] = "Other name"
    other.aliases[0] = ["Q3 alias", "Q3 other alias"]
    original = table.copy()
    merged = table.merge(other)
    assert torch.equal(table.sums, original.sums) and table.entity_ids == original.entity_ids  # merge copies
    assert merged.entity_ids == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    assert torch.equal(merged.sums[:2], before_sums[:2]) and torch.equal(merged.counts[:2], before_counts[:2])
    assert torch.equal(merged.sums[2], before_sums[2] + other.sums[0])
    assert merged.counts.tolist() == [1, 2, 3 + 1, 2, 3]
    assert torch.equal(merged.sums[3:], other.sums[1:])
    assert merged.names[2] == "Entity Q3" and merged.aliases[2] == ["Q3 alias", "Q3 other alias"]
    assert merged.index("Q5") == 4 and merged.metadata["merged"][0]["new_entities"] == 2

    assert table.add_entities(other, on_duplicate="keep") == ["Q4", "Q5"]
    assert torch.equal(table.sums[:3], before_sums) and torch.equal(table.counts[:3], before_counts)
    with pytest.raises(ValueError, match="Q3"):
        make_table(model, ids=["Q1", "Q3"]).add_entities(other, on_duplicate="raise")
    with pytest.raises(ValueError, match="on_duplicate"):
        table.add_entities(other, on_duplicate="replace")


def test_add_entities_refuses_a_table_of_another_model(model):
    table = make_table(model)
    foreign = make_table(tiny_mlm(seed=5), ids=["Q9"])
    with pytest.raises(EntityTableMismatchError, match="different spaces"):
        table.add_entities(foreign)
    narrow = EntityLookupTable(["Q9"], torch.ones(1, 8), torch.ones(1))
    with pytest.raises(EntityTableMismatchError, match="hidden size 8"):
        table.add_entities(narrow)
    assert len(table) == 4


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, sharing
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_safetensors_and_json(model, tmp_path):
    table = make_table(model)
    table.norm = 5.0
    table.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FILES  # no temporary files left, nothing pickled
    with safe_open(str(tmp_path / "entity_table.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"sums", "counts"}
        assert handle.get_tensor("sums").dtype == torch.float32 and handle.get_tensor("counts").dtype == torch.int64
    vocab = json.loads((tmp_path / "entity_vocab.json").read_text())
    assert vocab["entity_ids"] == table.entity_ids and vocab["names"][0] == "Entity Q1"
    assert vocab["aliases"][0] == ["Q1 alias"] and vocab["counts"] == [1, 2, 3, 4]
    config = json.loads((tmp_path / "entity_table_config.json").read_text())
    assert config["format_version"] == 1 and config["norm"] == 5.0 and config["num_entities"] == 4
    assert config["metadata"]["model_fingerprint"] == model_fingerprint(model)

    loaded = EntityLookupTable.from_pretrained(tmp_path)
    assert loaded.entity_ids == table.entity_ids and loaded.names == table.names and loaded.aliases == table.aliases
    assert torch.equal(loaded.sums, table.sums) and torch.equal(loaded.counts, table.counts)
    assert loaded.norm == 5.0 and loaded.metadata == table.metadata
    assert torch.equal(loaded.vectors(), table.vectors())
    loaded.check_model(model)

    card = (tmp_path / "README.md").read_text()
    assert "tiny/bert-mlm" in card and "**4 entities**" in card and "base_model: tiny/bert-mlm" in card


def test_saving_again_overwrites_and_keeps_a_user_card(model, tmp_path):
    make_table(model, n=3).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("# My own card\n")
    make_table(model, n=5).save_pretrained(tmp_path)
    assert len(EntityLookupTable.from_pretrained(tmp_path)) == 5
    assert (tmp_path / "README.md").read_text() == "# My own card\n"


def test_loading_refuses_incomplete_or_inconsistent_folders(model, tmp_path):
    table = make_table(model)
    table.save_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "entity_vocab.json").read_text())
    vocab["counts"][0] = 99
    (tmp_path / "entity_vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="counts"):
        EntityLookupTable.from_pretrained(tmp_path)
    (tmp_path / "entity_table.safetensors").unlink()
    with pytest.raises(OSError, match="entity_table.safetensors"):
        EntityLookupTable.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="download options"):
        EntityLookupTable.from_pretrained(tmp_path, trust_remote_code=True)


def test_push_to_hub_uploads_the_saved_folder(model, monkeypatch):
    table = make_table(model)
    calls: dict = {}

    class FakeRepo:
        repo_id = "me/entity-table"

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return FakeRepo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert table.push_to_hub("entity-table", private=True, commit_message="tables!") == "commit-url"
    assert calls["create_repo"] == ("entity-table", {"private": True, "exist_ok": True})
    repo_id, kwargs = calls["upload"]
    assert repo_id == "me/entity-table" and kwargs["commit_message"] == "tables!"
    assert set(calls["files"]) == FILES
    assert b"**4 entities**" in calls["files"]["README.md"]
    vocab = json.loads(calls["files"]["entity_vocab.json"])
    assert vocab["entity_ids"] == table.entity_ids

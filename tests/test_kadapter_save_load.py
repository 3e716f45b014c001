"""Saving, loading, remote code and Hub upload of K-Adapter models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import batch, make_model, tiny_adapter
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification

import hf_kadapter as hk


def _keys(folder) -> list[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def test_adapter_only_save_and_auto_reload_is_identical(base_dir, tmp_path):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter(input_mode="concat")})
    expected = model(**batch())
    model.save_pretrained(tmp_path)

    files = sorted(os.listdir(tmp_path))
    assert files == [
        "README.md",
        "config.json",
        "configuration_kadapter.py",
        "model.safetensors",
        "modeling_kadapter.py",
    ]
    assert not any(key.startswith("pretrained_model.") for key in _keys(tmp_path))
    assert any(key.startswith("adapters.linguistic.") for key in _keys(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "kadapter" and config["base_model_name_or_path"] == base_dir
    assert config["auto_map"]["AutoModel"] == "modeling_kadapter.KAdapterModel"

    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is hk.KAdapterModel
    assert loaded.base_is_frozen()  # freezing is re-applied after loading
    out = loaded(**batch())
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    for a, b in zip(out.adapter_hidden_states, expected.adapter_hidden_states, strict=True):
        assert torch.equal(a, b)


def test_reload_with_a_given_base_and_into_a_head(base_dir, tmp_path):
    model = make_model(base_dir)
    expected = model(**batch()).last_hidden_state
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(base_dir)
    loaded = hk.KAdapterModel.from_pretrained(tmp_path, base_model=base)
    assert torch.equal(loaded(**batch()).last_hidden_state, expected)

    head = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert type(head) is hk.KAdapterForSequenceClassification and head.config.num_labels == 4
    assert torch.equal(head.kadapter(**batch()).last_hidden_state, expected)
    head.save_pretrained(tmp_path / "head")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "head")
    assert torch.equal(again(**batch()).logits, head(**batch()).logits)


def test_full_save_includes_the_base(base_dir, tmp_path):
    model = make_model(base_dir)
    model.save_pretrained(tmp_path, save_base=True)
    assert any(key.startswith("pretrained_model.") for key in _keys(tmp_path))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(**batch()).last_hidden_state, model(**batch()).last_hidden_state)
    # A base being trained (the paper's fine-tuning regime) is saved by default: adapter-only would lose it.
    model.unfreeze_base()
    model.save_pretrained(tmp_path / "trained")
    assert any(key.startswith("pretrained_model.") for key in _keys(tmp_path / "trained"))
    assert not AutoModel.from_pretrained(tmp_path / "trained").base_is_frozen()


def test_save_is_atomic_and_replaces_stale_files(base_dir, tmp_path):
    model = make_model(base_dir)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (tmp_path / "notes.txt").write_text("kept")
    model.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert "model-00001-of-00002.safetensors" not in names and "notes.txt" in names
    assert not [n for n in names if n.startswith((".staging-", ".commit-"))]
    assert "adapter_config.json" not in names


def test_reload_refuses_another_base(base_dirs, tmp_path):
    model = make_model(base_dirs["bert"])
    model.save_pretrained(tmp_path)
    other = AutoModel.from_pretrained(base_dirs["bert"])
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(hk.KAdapterBaseMismatchError, match="other weights"):
        hk.KAdapterModel.from_pretrained(tmp_path, base_model=other)
    loaded = hk.KAdapterModel.from_pretrained(tmp_path, base_model=other, check_base=False)
    assert loaded.base_is_frozen()


def test_remote_code_loads_without_the_package(base_dir, tmp_path):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter(tap_layers=[4])})
    inputs = batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(model(**inputs).last_hidden_state, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_kadapter"] = None  # the package is not importable in this process
        import torch
        from transformers import AutoModel
        torch.set_num_threads(1)  # as in the test process: same reduction order, bit-identical outputs
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert torch.equal(model(**inputs).last_hidden_state, expected)
        print("REMOTE-OK")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout


def test_push_to_hub_uploads_the_adapter_only_folder_with_a_card(base_dir, monkeypatch):
    model = make_model(base_dir)
    calls = {}

    class FakeRepo:
        repo_id = "me/kadapter-test"

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return FakeRepo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["repo_id"] = repo_id
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert model.push_to_hub("kadapter-test", base_model_id="org/tiny-base") == "commit-url"
    assert calls["create_repo"] == "kadapter-test" and calls["repo_id"] == "me/kadapter-test"
    files = calls["files"]
    assert set(files) == {
        "README.md",
        "config.json",
        "configuration_kadapter.py",
        "model.safetensors",
        "modeling_kadapter.py",
    }
    card = files["README.md"].decode()
    assert "org/tiny-base" in card and "| factual |" in card and "NOT included" in card
    with open(os.path.join(base_dir, "model.safetensors"), "rb") as handle:
        assert len(files["model.safetensors"]) < len(handle.read())  # the base is not uploaded


def test_base_lora_trains_saves_with_the_adapters_and_reloads(base_dir, tmp_path):
    model = make_model(base_dir, hk.KAdapterForSequenceClassification, num_labels=2)
    model.freeze_adapter()
    model.add_base_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith(("classifier.", "kadapter.fusion.")) for n in trainable)
    assert not model.base_is_frozen() and not model.base_weights_trainable()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        model(**batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = model(**batch()).logits
    model.save_pretrained(tmp_path)
    keys = _keys(tmp_path)
    assert any("lora_A" in k for k in keys) and not any(k.endswith("query.base_layer.weight") for k in keys)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.base_lora["r"] == 4
    assert torch.allclose(loaded(**batch()).logits, expected, atol=1e-6)

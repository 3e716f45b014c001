"""K-Adapter usability: quiet loading (the pooler dropped on purpose) and loud, named reports when something is
wrong; from_base follows the base's dtype; errors that name the fix; peft-familiar helpers; the public API."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BASES, batch, make_model, tiny_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertModel

import hf_kadapter as hk

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_with_pooler(tmp_path_factory) -> str:
    """A base saved as released checkpoints are: with the pooler K-Adapter drops."""
    config_class, _, kwargs = BASES["bert"]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert-with-pooler")
    BertModel(config_class(**kwargs)).save_pretrained(folder)
    return str(folder)


def logged(capfd, caplog) -> str:
    """What a user sees by default: transformers' own handler writes to stderr, the package's warnings go through
    logging (INFO messages only show when asked for, as the recipes do)."""
    warnings = "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)
    return capfd.readouterr().err + warnings


# ----- quiet when nothing is wrong, loud and named when something is ------------------------------------------------
def test_loading_a_base_with_a_pooler_is_quiet(base_with_pooler, tmp_path, capfd, caplog):
    model = hk.KAdapterModel.from_base(base_with_pooler, adapters={"factual": tiny_adapter()})
    model.save_pretrained(tmp_path / "adapters")
    AutoModel.from_pretrained(tmp_path / "adapters")
    # A pretrained adapter loaded through AutoModel (the quickstart's reload): its pretraining head is left out quietly.
    pretraining = hk.KAdapterForFactualPretraining.from_base(base_with_pooler, adapters={"factual": tiny_adapter()})
    pretraining.save_pretrained(tmp_path / "factual-adapter")
    AutoModel.from_pretrained(tmp_path / "factual-adapter")
    assert "LOAD REPORT" not in logged(capfd, caplog)


def test_a_task_checkpoint_through_automodel_names_the_checkpoint(base_dir, tmp_path, capfd, caplog):
    make_model(base_dir, hk.KAdapterForSequenceClassification, num_labels=3).save_pretrained(tmp_path / "task")
    logged(capfd, caplog)
    caplog.clear()
    assert type(AutoModel.from_pretrained(tmp_path / "task")) is hk.KAdapterModel
    err = logged(capfd, caplog)
    assert "from: None" not in err and f"from: {tmp_path / 'task'}" in err
    assert "KAdapterForSequenceClassification.from_pretrained" in err  # how to keep the head


def test_a_base_missing_encoder_weights_is_loud(base_with_pooler, tmp_path, capfd, caplog):
    broken = tmp_path / "broken-base"
    shutil.copytree(base_with_pooler, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["encoder.layer.0.output.dense.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    hk.KAdapterModel.from_base(str(broken), adapters={"factual": tiny_adapter()})
    err = logged(capfd, caplog)
    assert "LOAD REPORT" in err and str(broken) in err and "encoder.layer.0.output.dense.weight" in err


# ----- dtype and device -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_base_follows_the_base_dtype(base_dir, dtype, tmp_path):
    base = AutoModel.from_pretrained(base_dir, dtype=dtype)
    model = hk.KAdapterForSequenceClassification.from_base(base, adapters={"factual": tiny_adapter()}, num_labels=2)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert model(**batch()).logits.dtype == dtype  # before: fp32 adapters on a half base crashed
    model.save_pretrained(tmp_path)
    reloaded = hk.KAdapterForSequenceClassification.from_pretrained(tmp_path, base_model=base)
    assert {p.dtype for p in reloaded.parameters()} == {dtype}


# ----- errors that name the fix -----------------------------------------------------------------------------------------
def test_a_plain_encoder_folder_points_to_from_base(base_dir):
    with pytest.raises(ValueError, match=r"not a K-Adapter checkpoint.*KAdapterModel\.from_base"):
        hk.KAdapterModel.from_pretrained(base_dir)


def test_a_moved_local_base_points_to_base_model(base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    model = make_model(str(base))
    model.save_pretrained(tmp_path / "adapters")
    moved = tmp_path / "moved-base"
    base.rename(moved)
    with pytest.raises(OSError, match=re.escape(str(base)) + r".*base_model="):
        hk.KAdapterModel.from_pretrained(tmp_path / "adapters")
    reloaded = hk.KAdapterModel.from_pretrained(tmp_path / "adapters", base_model=str(moved)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch()).last_hidden_state, model(**batch()).last_hidden_state)


# ----- peft-familiar helpers ------------------------------------------------------------------------------------------------
def test_disable_adapter_and_peft_mixin_methods(base_dir, capsys):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "lexical": tiny_adapter(tap_layers=[1])})
    model.set_adapter(["lexical"])
    inputs = batch()
    with torch.no_grad():
        fused = model(**inputs).last_hidden_state
        with model.disable_adapter():
            out = model(**inputs)
            assert out.adapter_hidden_states == () and torch.equal(out.last_hidden_state, out.base_last_hidden_state)
        assert model.active_adapters() == ["lexical"] and torch.equal(model(**inputs).last_hidden_state, fused)
        model.disable_adapters()  # transformers' PEFT-mixin names work the K-Adapter way
        assert model.active_adapters() == []
        model.enable_adapters()
        assert model.active_adapters() == ["lexical"]
    state = model.get_adapter_state_dict("factual")
    assert state and all(key.startswith("adapters.factual.") for key in state)
    with pytest.raises(NotImplementedError, match="load_adapter"):
        model.enable_peft_hotswap()
    from peft import LoraConfig

    with pytest.raises(TypeError, match="add_base_lora"):
        model.add_adapter(LoraConfig(r=4))
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,} || all params:" in capsys.readouterr().out


# ----- the public API ----------------------------------------------------------------------------------------------------------
def test_everything_the_docs_import_is_importable_from_the_package():
    names = set()
    for page in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        text = page.read_text()
        for module, imported in re.findall(r"from (hf_kadapter(?:\.\w+)*) import \(?([\w\s,#]+?)\)?\n(?!\s)", text):
            if not module.endswith(".recipes"):  # the example scripts' own helpers stay in their module
                imported = re.sub(r"#[^\n]*", "", imported)  # comments inside a parenthesised import
                names.update(n.strip() for n in imported.replace("\n", ",").split(",") if n.strip())
    assert {"PELTModel", "OpenQAReader", "RealmStyleRetriever", "EntityLookupTable"} <= names
    assert names <= set(hk.__all__), sorted(names - set(hk.__all__))
    for name in hk.__all__:
        assert getattr(hk, name) is not None

"""One fingerprint for bases and masked LMs: every weight counts, the LM head's transform counts for PELT, the same
weights in float32, float16 and bfloat16 agree, float16 vs bfloat16 is refused with the fix, old fingerprints load."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import make_model, tiny_adapter
from test_kadapter_feature_cache import factual, toy_dataset
from test_pelt_build import CORPUS, bert_tokenizer, tiny_bert
from transformers import AutoModel, BertConfig, BertModel

import hf_kadapter as hk
from hf_kadapter.kadapter.feature_cache import feature_cache_key
from hf_kadapter.pelt import EntityTableMismatchError, build_entity_table, lm_head_fingerprint, model_fingerprint
from hf_kadapter.utils.fingerprint import (
    FingerprintDtypeError,
    base_fingerprint,
    base_tensors,
    compare_fingerprints,
    native_fingerprint,
    parse_fingerprint,
    tensors_match_fingerprint,
)


def tiny_base(seed: int = 0, pooler: bool = False) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return BertModel(config, add_pooling_layer=pooler).eval()


def retrained_in_the_middle(model: BertModel) -> BertModel:
    """Rows in the middle of the embedding and FFN matrices changed (the first/last 512 values untouched)."""
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[30] += 0.5
        model.encoder.layer[0].intermediate.dense.weight[32, 16] += 0.25
    return model


def test_every_weight_counts():
    base = tiny_base()
    stored = base_fingerprint(base)
    changed = retrained_in_the_middle(tiny_base())
    assert compare_fingerprints(stored, base_fingerprint(changed)) is False
    assert tensors_match_fingerprint(base_tensors(changed), stored) is False
    assert tensors_match_fingerprint(base_tensors(tiny_base()), stored) is True
    assert compare_fingerprints(stored, base_fingerprint(tiny_base(seed=1))) is False
    # A change far below float16's resolution still shows in float32.
    with torch.no_grad():
        nudged = tiny_base()
        nudged.encoder.layer[1].output.dense.weight[5, 5] += 1e-6
    assert compare_fingerprints(stored, base_fingerprint(nudged)) is False


def test_float32_float16_and_bfloat16_copies_agree():
    base = tiny_base()
    stored = base_fingerprint(base)
    native, views = parse_fingerprint(stored)
    assert native == "float32" and sorted(views) == ["bfloat16", "float16", "float32"]
    half, brain = tiny_base().half(), tiny_base().to(torch.bfloat16)
    # fp32 -> fp16 -> bf16 rounds differently from fp32 -> bf16 for some values: each copy is compared in its own view.
    weight = base.embeddings.word_embeddings.weight
    assert not torch.equal(weight.half().to(torch.bfloat16), weight.to(torch.bfloat16))
    for cast in (half, brain):
        assert compare_fingerprints(stored, base_fingerprint(cast)) is True
        assert compare_fingerprints(base_fingerprint(cast), stored) is True
        assert tensors_match_fingerprint(base_tensors(cast), stored) is True
        assert tensors_match_fingerprint(base_tensors(retrained_in_the_middle(cast)), stored) is False
    half, brain = tiny_base().half(), tiny_base().to(torch.bfloat16)
    upcast = tiny_base().half().float()  # the float32 upcast of a float16 copy holds the same information
    assert tensors_match_fingerprint(base_tensors(upcast), base_fingerprint(half)) is True
    with pytest.raises(FingerprintDtypeError, match="float32.*check_base=False"):
        compare_fingerprints(base_fingerprint(half), base_fingerprint(brain))


def test_pooler_lora_and_old_fingerprints():
    pooled, plain = tiny_base(pooler=True), tiny_base(seed=1)
    plain.load_state_dict({k: v for k, v in pooled.state_dict().items() if not k.startswith("pooler.")})
    assert base_fingerprint(pooled) == base_fingerprint(plain)  # K-Adapter drops the pooler
    from peft import LoraConfig, inject_adapter_in_model

    with_lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"]), copy.deepcopy(plain))
    assert any(".base_layer." in name for name in with_lora.state_dict())
    assert base_fingerprint(with_lora) == base_fingerprint(plain)  # LoRA add-ons are not the base
    assert compare_fingerprints("sha256:0123456789abcdef0123456789abcdef01234567", base_fingerprint(tiny_base())) is None
    assert native_fingerprint(base_tensors(tiny_base())) != native_fingerprint(base_tensors(tiny_base().half()))


def test_kadapter_checks_the_base_in_any_dtype(base_dirs, tmp_path, caplog):
    model = make_model(base_dirs["bert"])
    model.save_pretrained(tmp_path / "adapter")
    half = AutoModel.from_pretrained(base_dirs["bert"], dtype=torch.float16)
    hk.KAdapterModel.from_pretrained(tmp_path / "adapter", base_model=half)  # checked in the float16 view: passes
    changed = retrained_in_the_middle(AutoModel.from_pretrained(base_dirs["bert"]))
    with pytest.raises(hk.KAdapterBaseMismatchError, match="other weights"):
        hk.KAdapterModel.from_pretrained(tmp_path / "adapter", base_model=changed)
    hk.KAdapterModel.from_pretrained(tmp_path / "adapter", base_model=changed, check_base=False)

    on_half = hk.KAdapterModel.from_base(half, adapters={})
    on_brain = hk.KAdapterModel.from_base(AutoModel.from_pretrained(base_dirs["bert"], dtype=torch.bfloat16), adapters={})
    on_half.save_pretrained(tmp_path / "half")
    on_half.add_adapter("factual", tiny_adapter())
    on_half.save_pretrained(tmp_path / "half")
    with pytest.raises(hk.KAdapterBaseMismatchError, match="float16 and bfloat16"):
        on_brain.load_adapter(tmp_path / "half")
    on_brain.load_adapter(tmp_path / "half", check_base=False)
    model.load_adapter(tmp_path / "half", adapter_name="from_half")  # float32 vs float16: compared in float16

    config = hk.KAdapterConfig.from_pretrained(tmp_path / "adapter")
    config.base_fingerprint = "sha256:" + "0" * 40  # written by hf_kadapter < 0.2
    config.save_pretrained(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING):
        hk.KAdapterModel.from_pretrained(tmp_path / "adapter")
    assert "cannot be verified" in caplog.text


def test_feature_cache_key_sees_retrained_middle_rows(base_dirs):
    model, data = factual(base_dirs["bert"]), toy_dataset(size=4)
    key = feature_cache_key(model, data)
    retrained_in_the_middle(model.kadapter.pretrained_model)
    assert feature_cache_key(model, data) != key


def test_pelt_tables_record_the_lm_head_transform(tmp_path):
    tokenizer = bert_tokenizer(tmp_path / "vocab")
    mlm = tiny_bert(len(tokenizer))
    table = build_entity_table(mlm, tokenizer, CORPUS[:3], progress=False)
    assert table.metadata["lm_head_fingerprint"] == lm_head_fingerprint(mlm) is not None
    assert lm_head_fingerprint(mlm.bert) is None and table.metadata["model_fingerprint"] == model_fingerprint(mlm.bert)
    table.check_model(mlm)
    table.check_model(mlm.bert)
    table.check_model(tiny_bert(len(tokenizer)).half())
    kadapter = hk.KAdapterModel.from_base(mlm, adapters={"factual": tiny_adapter(tap_layers=[0, 1])})
    table.check_model(kadapter)
    other_head = tiny_bert(len(tokenizer))
    with torch.no_grad():
        other_head.cls.predictions.transform.dense.weight[3, 3] += 0.1
    with pytest.raises(EntityTableMismatchError, match="head transform"):
        table.check_model(other_head)
    other = build_entity_table(other_head, tokenizer, CORPUS[:3], progress=False)
    with pytest.raises(EntityTableMismatchError, match="Cannot merge"):
        table.merge(other)

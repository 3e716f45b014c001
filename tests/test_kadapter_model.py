"""Config, architecture and heads of the K-Adapter model family."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, LAYERS, batch, make_model, tiny_adapter
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    RobertaConfig,
)

import hf_kadapter as hk


def test_import_registers_auto_classes():
    assert isinstance(AutoConfig.for_model("kadapter", base_config=BertConfig()), hk.KAdapterConfig)
    config = hk.KAdapterConfig(base_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    expected = {
        AutoModel: hk.KAdapterModel,
        AutoModelForSequenceClassification: hk.KAdapterForSequenceClassification,
        AutoModelForTokenClassification: hk.KAdapterForTokenClassification,
        AutoModelForQuestionAnswering: hk.KAdapterForQuestionAnswering,
        AutoModelForMultipleChoice: hk.KAdapterForMultipleChoice,
    }
    for auto_class, model_class in expected.items():
        assert type(auto_class.from_config(config)) is model_class


@pytest.mark.parametrize("config_class", [BertConfig, RobertaConfig])
def test_config_round_trip_keeps_base_class(tmp_path, config_class):
    base = config_class(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    config = hk.KAdapterConfig(
        base_config=base,
        base_model_name_or_path="some/base",
        adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter(input_mode="concat")},
        fusion="add",
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is hk.KAdapterConfig
    assert type(loaded.base_config) is config_class
    assert loaded.base_config.hidden_size == 32
    assert loaded.base_model_name_or_path == "some/base"
    assert loaded.adapters == config.adapters
    assert loaded.get_adapter_config("linguistic").input_mode == "concat"
    assert loaded.fusion == "add"
    assert not (tmp_path / "adapter_config.json").exists()


def test_from_paper_taps_and_parameter_count():
    large = RobertaConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
    )
    released = hk.KAdapterConfig.from_paper(large)
    assert list(released.adapters) == ["factual", "linguistic"]
    assert released.get_adapter_config("factual").tap_layers == [0, 11, 22]
    assert hk.KAdapterConfig.from_paper(large, taps="paper").get_adapter_config("linguistic").tap_layers == [0, 11, 23]
    spec = released.get_adapter_config("factual")
    assert (spec.hidden_size, spec.num_layers, spec.num_attention_heads, spec.intermediate_size) == (768, 2, 12, 3072)
    assert spec.init_std == 2e-4 and spec.input_mode == "sum" and released.fusion == "concat"
    with torch.device("meta"):
        model = hk.KAdapterModel(released)
    for adapter in model.adapters.values():
        assert sum(p.numel() for p in adapter.parameters()) == 47_251_200
    assert sum(p.numel() for p in model.adapters["factual"].layers[0].parameters()) == 15_750_400


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fusion="mean"), "fusion"),
        (dict(adapters={"f": dict(tap_layers=[0, 9])}), "valid taps are 0..4"),
        (dict(adapters={"bad.name": dict(tap_layers=[0])}), "not valid"),
        (dict(adapters={"f": dict(tap_layers=[0])}, active_adapters=["g"]), "unknown adapters"),
        (dict(adapters={"f": dict(tap_layers=[0], hidden_size=30, num_attention_heads=4)}), "divisible"),
        (dict(adapters={"f": dict(tap_layers=[0], input_mode="stack")}), "input_mode"),
        (dict(adapters={"f": dict(tap_layers=[0], hiden_size=3)}), "Unknown knowledge-adapter settings"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    base = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(ValueError, match=message):
        hk.KAdapterConfig(base_config=base, **kwargs)


def test_forward_outputs_and_frozen_base(base_dir):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter(tap_layers=[1, 4])})
    reference = AutoModel.from_pretrained(base_dir).eval()
    inputs = batch()
    out = model(**inputs)
    with torch.no_grad():
        expected_base = reference(**inputs).last_hidden_state
    assert torch.allclose(out.base_last_hidden_state, expected_base, atol=1e-6)
    assert out.last_hidden_state.shape == (3, 9, HIDDEN)
    assert len(out.adapter_hidden_states) == 2
    assert model.base_is_frozen()
    assert not any(p.requires_grad for p in model.pretrained_model.parameters())
    assert all(p.requires_grad for p in model.adapters.parameters())
    # The base ran under no_grad: its output is not part of any graph.
    assert out.base_last_hidden_state.grad_fn is None and out.last_hidden_state.grad_fn is not None
    model.train()
    assert model.adapters.training and not model.pretrained_model.training


def test_fresh_adapter_starts_near_identity_and_sums_taps(base_dir):
    model = make_model(base_dir)
    out = model(**batch(), output_hidden_states=True)
    taps = sum(out.hidden_states[t] for t in (0, 2, 3))
    adapter_out = model.adapter_output(out, "factual")
    # Each layer adds a tiny residual (projections ~ N(0, 2e-4)); the chain sums the tapped states.
    assert torch.allclose(adapter_out, taps, atol=1e-2)
    assert not torch.equal(adapter_out, taps)


def test_adapter_layers_honour_attention_mask(base_dir):
    model = make_model(base_dir)
    short = batch(pad_last=0, length=6)
    padded = {
        "input_ids": torch.cat([short["input_ids"], torch.ones(3, 4, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([short["attention_mask"], torch.zeros(3, 4, dtype=torch.long)], dim=1),
    }
    a, b = model(**short), model(**padded)
    assert torch.allclose(a.adapter_hidden_states[0], b.adapter_hidden_states[0][:, :6], atol=1e-5)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state[:, :6], atol=1e-5)


def test_concat_input_mode_uses_both_inputs(base_dir):
    model = make_model(base_dir, adapters={"paper": tiny_adapter(input_mode="concat")})
    first = model.adapters["paper"].layers[0]
    assert first.down_project.in_features == 2 * HIDDEN
    out = model(**batch())
    assert out.adapter_hidden_states[0].shape == (3, 9, HIDDEN)


def test_fusion_modes_match_the_official_formulas(base_dir):
    adapters = {"factual": tiny_adapter(), "linguistic": tiny_adapter(tap_layers=[0, 4])}
    add = make_model(base_dir, adapters=adapters, fusion="add")
    out = add(**batch())
    assert torch.allclose(out.last_hidden_state, out.base_last_hidden_state + sum(out.adapter_hidden_states), atol=1e-6)

    concat = make_model(base_dir, adapters=adapters)
    out = concat(**batch())
    fusion = concat.fusion
    base, fac, lin = out.base_last_hidden_state, *out.adapter_hidden_states
    fac_features = fusion.task_dense["factual"](torch.cat([base, fac], -1))
    lin_features = fusion.task_dense["linguistic"](torch.cat([base, lin], -1))
    # The official task_dense over concat(fac, lin) is one Linear(2H, H): our per-adapter blocks side by side.
    weight = torch.cat([fusion.combine["factual"].weight, fusion.combine["linguistic"].weight], dim=1)
    expected = F.linear(torch.cat([fac_features, lin_features], -1), weight, fusion.combine_bias)
    assert torch.allclose(out.last_hidden_state, expected, atol=1e-5)

    single = make_model(base_dir)  # the official code crashed on a single adapter with concat fusion
    assert single(**batch()).last_hidden_state.shape == (3, 9, HIDDEN)


def test_set_adapter_selects_active_adapters(base_dir):
    model = make_model(base_dir, adapters={"factual": tiny_adapter(), "linguistic": tiny_adapter(tap_layers=[1])})
    both = model(**batch())
    model.set_adapter("linguistic")
    only = model(**batch())
    assert model.active_adapters() == ["linguistic"]
    assert len(only.adapter_hidden_states) == 1
    assert torch.equal(only.adapter_hidden_states[0], both.adapter_hidden_states[1])
    model.set_adapter([])
    assert torch.equal(model(**batch()).last_hidden_state, both.base_last_hidden_state)
    with pytest.raises(ValueError, match="unknown adapters"):
        model.set_adapter("nope")


# ----- heads ------------------------------------------------------------------------------------------------
def _positions(size=3):
    return torch.tensor([1, 2, 0][:size]), torch.tensor([4, 5, 3][:size])


def test_sequence_token_qa_heads(base_dir):
    inputs = batch()
    seq = make_model(base_dir, hk.KAdapterForSequenceClassification, num_labels=3)
    out = seq(**inputs, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 2, 1])))

    tok = make_model(base_dir, hk.KAdapterForTokenClassification, num_labels=5)
    labels = torch.randint(0, 5, (3, 9))
    labels[-1, -3:] = -100
    out = tok(**inputs, labels=labels)
    assert out.logits.shape == (3, 9, 5)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[labels != -100], labels[labels != -100]))

    qa = make_model(base_dir, hk.KAdapterForQuestionAnswering)
    out = qa(**inputs, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 4, 3]))
    assert out.start_logits.shape == (3, 9) and out.end_logits.shape == (3, 9) and torch.isfinite(out.loss)


def test_multiple_choice_head(base_dir):
    model = make_model(base_dir, hk.KAdapterForMultipleChoice)
    inputs = {k: v.unsqueeze(0).expand(2, -1, -1) for k, v in batch().items()}  # 2 questions x 3 choices
    out = model(**inputs, labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="num_choices"):
        model(**batch())


def test_entity_typing_head_reads_marker_feature(base_dir):
    model = make_model(base_dir, hk.KAdapterForEntityTyping, num_labels=4)
    inputs = batch()
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float)
    out = model(**inputs, entity_positions=torch.tensor([1, 2, 3]), labels=labels)
    assert out.logits.shape == (3, 4)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    features = model.kadapter(**inputs).last_hidden_state[torch.arange(3), torch.tensor([1, 2, 3])]
    assert torch.allclose(out.logits, model.classifier(features), atol=1e-6)
    with pytest.raises(ValueError, match="outside the sequence length"):
        model(**inputs, entity_positions=torch.tensor([1, 2, 9]))
    with pytest.raises(ValueError, match="entity_positions is required"):
        model(**inputs)


def test_relation_and_factual_heads(base_dir):
    inputs = batch()
    subject, obj = _positions()
    labels = torch.tensor([0, 1, 2])
    relation = make_model(base_dir, hk.KAdapterForRelationClassification, num_labels=3)
    out = relation(**inputs, subject_positions=subject, object_positions=obj, labels=labels)
    assert out.logits.shape == (3, 3)
    features = relation.kadapter(**inputs).last_hidden_state
    pair = torch.cat([features[torch.arange(3), subject], features[torch.arange(3), obj]], -1)
    assert torch.allclose(out.logits, relation.classifier(pair), atol=1e-6)

    factual = make_model(base_dir, hk.KAdapterForFactualPretraining, num_labels=3)
    out = factual(**inputs, subject_positions=subject, object_positions=obj, labels=labels)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    # It trains its adapter (and head) only: the fusion is not used during pretraining.
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in factual.named_parameters() if p.requires_grad}
    assert "kadapter.adapters" in trainable and "kadapter.fusion" not in trainable
    assert "kadapter.pretrained_model" not in trainable


def test_factual_pretraining_needs_a_named_adapter_when_several(base_dir):
    adapters = {"factual": tiny_adapter(), "linguistic": tiny_adapter()}
    ambiguous = make_model(base_dir, hk.KAdapterForFactualPretraining, adapters=adapters, num_labels=3)
    assert not any(p.requires_grad for p in ambiguous.kadapter.adapters.parameters())
    subject, obj = _positions()
    with pytest.raises(ValueError, match="pretraining_adapter"):
        ambiguous(**batch(), subject_positions=subject, object_positions=obj)
    model = make_model(
        base_dir, hk.KAdapterForFactualPretraining, adapters=adapters, num_labels=3, pretraining_adapter="linguistic"
    )
    assert all(p.requires_grad for p in model.kadapter.adapters["linguistic"].parameters())
    assert not any(p.requires_grad for p in model.kadapter.adapters["factual"].parameters())


def test_dependency_head_predicts_positions_over_real_tokens(base_dir):
    model = make_model(base_dir, hk.KAdapterForDependencyPretraining, max_head_positions=16)
    inputs = batch()
    labels = torch.tensor(
        [[0, 0, 1, 1, 2, 3, 3, 5, -100], [2, 0, 1, 8, 8, 0, 0, 1, 2], [0, 0, 1, 1, 2, 3] + [-100] * 3]
    )
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 9, 9)
    # Padding positions (last 3 of example 3) can never be predicted as heads.
    probs = out.logits[2].softmax(-1)
    assert torch.all(probs[:, -3:] == 0)
    labelled = labels != -100
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[labelled], labels[labelled]))
    with pytest.raises(ValueError, match="positions in"):
        model(**inputs, labels=torch.full((3, 9), 9))
    with pytest.raises(ValueError, match="max_head_positions"):
        model(**batch(length=20))
    assert model.config.max_head_positions == 16 and LAYERS == 4

"""The speed and memory work changes no result: heads that compute only at their marker tokens, the base keeping only
the hidden states the adapters read, the adapter chain without its zero start, the feature cache converting while it
reads. A half-precision base stays within the tolerance docs/performance.md states. (Timings are the benchmarks' job,
never asserted here.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, make_model, tiny_adapter

import hf_kadapter as hk
from hf_kadapter.kadapter.feature_cache import CachedFeatureCollator, build_feature_cache

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ADAPTERS = {"factual": tiny_adapter(**NO_DROPOUT), "linguistic": tiny_adapter(tap_layers=[1, 3], **NO_DROPOUT)}
# Float rounding only: the marker path multiplies (batch, P) rows where the full path multiplies (batch, seq) rows,
# and a BLAS may sum those in another order.
ROUNDING = dict(rtol=1e-5, atol=1e-6)
# Stated in docs/performance.md: a half-precision base's effect on a head's logits and on a short run's final loss.
HALF_TOLERANCE = {torch.bfloat16: dict(logits=2e-2, loss=5e-3), torch.float16: dict(logits=4e-3, loss=1e-3)}


def reference_chain(adapter: hk.kadapter.modeling_kadapter.KnowledgeAdapter, hidden_states, bias) -> torch.Tensor:
    """The adapter chain as first written: it starts from a zeros tensor added to (or concatenated with) the tap."""
    previous = torch.zeros_like(hidden_states[adapter.tap_layers[0]])
    for tap, layer in zip(adapter.tap_layers, adapter.layers, strict=True):
        tapped = hidden_states[tap]
        combined = tapped + previous
        layer_input = combined if adapter.input_mode == "sum" else torch.cat([tapped, previous], dim=-1)
        previous = combined + layer(layer_input, bias)
    return previous


@pytest.mark.parametrize("input_mode", ["sum", "concat"])
def test_adapter_chain_is_bitwise_the_reference(base_dirs, input_mode):
    model = make_model(base_dirs["bert"], adapters={"factual": tiny_adapter(input_mode=input_mode)})
    inputs = batch()
    with torch.no_grad():
        hidden_states = model.pretrained_model(**inputs, output_hidden_states=True).hidden_states
        bias = (1.0 - inputs["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        adapter = model.adapters["factual"]
        assert torch.equal(adapter(hidden_states, bias), reference_chain(adapter, hidden_states, bias))


def test_the_base_keeps_only_the_hidden_states_the_adapters_read(base_dir):
    model = make_model(base_dir, adapters=ADAPTERS)
    model.set_adapter(["factual"])
    seen = []
    handle = model.pretrained_model.register_forward_hook(lambda module, args, out: seen.append(out.hidden_states))
    inputs = batch()
    with torch.no_grad():
        lean = model(**inputs)
        full = model(**inputs, output_hidden_states=True)
    handle.remove()
    kept = [index for index, state in enumerate(seen[0]) if state is not None]
    assert kept == model.cached_hidden_state_indices(["factual"]) == [0, 2, 3, 4]
    assert all(state is not None for state in full.hidden_states) and len(full.hidden_states) == 5
    assert torch.equal(lean.last_hidden_state, full.last_hidden_state)


def _marker_inputs(head: type, seed: int = 1) -> dict[str, torch.Tensor]:
    inputs = batch(seed=seed, size=3, length=9, pad_last=3)
    if head is hk.KAdapterForMultipleChoice:
        return {k: v[:, None].expand(-1, 2, -1).clone() for k, v in inputs.items()} | {"labels": torch.tensor([0, 1, 1])}
    if head is hk.KAdapterForEntityTyping:
        return inputs | {"entity_positions": torch.tensor([1, 4, 5]), "labels": torch.tensor([[1.0, 0, 1]] * 3)}
    if head is hk.KAdapterForSequenceClassification:
        return inputs | {"labels": torch.tensor([0, 2, 1])}
    return inputs | {
        "subject_positions": torch.tensor([1, 2, 0]),
        "object_positions": torch.tensor([6, 3, 5]),
        "labels": torch.tensor([0, 2, 1]),
    }


def _reference_logits(model, head: type, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head computed the first way: the fused (or com_dense) features at every token, then gathered."""
    encoder_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    if head is hk.KAdapterForMultipleChoice:
        flat = {k: v.flatten(0, 1) for k, v in encoder_inputs.items()}
        return model.classifier(model.kadapter(**flat).last_hidden_state[:, 0]).view(-1, 2)
    if head is hk.KAdapterForFactualPretraining:
        base_last, outputs, _, _ = model.kadapter.encode_adapters(["factual"], **encoder_inputs)
        features = model.com_dense(torch.cat([base_last, outputs["factual"]], dim=-1))
    else:
        features = model.kadapter(**encoder_inputs).last_hidden_state
    rows = torch.arange(features.shape[0])
    if head is hk.KAdapterForSequenceClassification:
        return model.classifier(features[:, 0])
    if head is hk.KAdapterForEntityTyping:
        return model.classifier(features[rows, inputs["entity_positions"]])
    pair = [features[rows, inputs["subject_positions"]], features[rows, inputs["object_positions"]]]
    return model.classifier(torch.cat(pair, dim=-1))


def _loss(head: type, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if head is hk.KAdapterForEntityTyping:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize(
    "head",
    [
        hk.KAdapterForFactualPretraining,
        hk.KAdapterForRelationClassification,
        hk.KAdapterForEntityTyping,
        hk.KAdapterForSequenceClassification,
        hk.KAdapterForMultipleChoice,
    ],
    ids=lambda head: head.__name__,
)
def test_marker_heads_match_the_full_computation_with_their_gradients(base_dirs, head):
    extra = {"pretraining_adapter": "factual"} if head is hk.KAdapterForFactualPretraining else {}
    model = make_model(base_dirs["roberta"], head, adapters=ADAPTERS, num_labels=3, classifier_dropout=0.0, **extra)
    model.unfreeze_adapter()  # every adapter, the fusion and the head train: all their gradients are compared
    inputs = _marker_inputs(head)
    output = model(**inputs)
    reference = _reference_logits(model, head, inputs)
    torch.testing.assert_close(output.logits, reference, **ROUNDING)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    fast = torch.autograd.grad(output.loss, [p for _, p in trained], allow_unused=True)
    slow = torch.autograd.grad(_loss(head, reference, inputs["labels"]), [p for _, p in trained], allow_unused=True)
    for (name, _), a, b in zip(trained, fast, slow, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **ROUNDING, msg=name)


def test_marker_heads_still_refuse_bad_positions(base_dirs):
    model = make_model(base_dirs["bert"], hk.KAdapterForRelationClassification, num_labels=3)
    inputs = _marker_inputs(hk.KAdapterForRelationClassification)
    with pytest.raises(ValueError, match="object_positions points into padding for examples \\[2\\]"):
        model(**(inputs | {"object_positions": torch.tensor([6, 3, 7])}))
    with pytest.raises(ValueError, match="subject_positions is required"):
        model(**(inputs | {"subject_positions": None}))


# ----- a half-precision base ------------------------------------------------------------------------------------
def _factual(base_dir: str) -> hk.KAdapterForFactualPretraining:
    return make_model(
        base_dir, hk.KAdapterForFactualPretraining, adapters={"factual": tiny_adapter()}, num_labels=3,
        classifier_dropout=0.0,
    )  # fmt: skip


def _short_run(model, inputs, steps: int = 10) -> float:
    """`steps` AdamW steps on one batch (dropout on, seeded): the final loss."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_base_stays_within_the_stated_tolerance(base_dirs, dtype):
    inputs = _marker_inputs(hk.KAdapterForFactualPretraining)
    full, half = _factual(base_dirs["bert"]), _factual(base_dirs["bert"])
    half.cast_base(dtype)
    assert {p.dtype for p in half.kadapter.pretrained_model.parameters()} == {dtype}
    assert {p.dtype for n, p in half.named_parameters() if "pretrained_model" not in n} == {torch.float32}
    with torch.no_grad():
        reference, logits = full(**inputs).logits, half(**inputs).logits
    assert logits.dtype == torch.float32 and not torch.equal(logits, reference)  # it does run in half precision
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= HALF_TOLERANCE[dtype]["logits"] * scale
    final_full, final_half = _short_run(full, inputs), _short_run(half, inputs)
    assert abs(final_half - final_full) <= HALF_TOLERANCE[dtype]["loss"] * final_full
    assert all(p.grad is None for p in half.kadapter.pretrained_model.parameters())


def test_cast_base_refuses_a_training_base_and_new_adapters_stay_float32(base_dirs):
    model = _factual(base_dirs["bert"])
    model.unfreeze_base()
    with pytest.raises(ValueError, match="The base trains .*mixed precision"):
        model.cast_base(torch.bfloat16)
    model.freeze_base()
    with pytest.raises(ValueError, match="torch.float32, torch.bfloat16 or torch.float16"):
        model.cast_base("int8")
    model.cast_base("bfloat16")
    core = hk.KAdapterModel.from_base(base_dirs["bert"], adapters={}, fusion="add")
    core.cast_base(torch.bfloat16)
    added = core.add_adapter("later", tiny_adapter())
    assert {p.dtype for p in added.parameters()} == {torch.float32}
    with torch.no_grad():
        assert core(**batch()).last_hidden_state.dtype == torch.float32


def test_a_feature_cache_of_a_half_base_and_its_conversion_on_read(base_dirs, tmp_path):
    from datasets import Dataset

    rows = batch(seed=3, size=6, length=9, pad_last=3)
    data = Dataset.from_dict(
        {k: v.tolist() for k, v in rows.items()}
        | {"subject_positions": [1] * 6, "object_positions": [4] * 6, "labels": [0, 1, 2, 0, 1, 2]}
    )
    model = _factual(base_dirs["bert"])
    model.cast_base(torch.bfloat16)
    full = build_feature_cache(model, data, tmp_path, batch_size=4, progress=False)
    half = build_feature_cache(model, data, tmp_path, batch_size=4, progress=False, dtype="float16")
    assert full.metadata["base_dtype"] == "bfloat16" and full.path != half.path
    collator = CachedFeatureCollator(lambda f: {k: torch.tensor([x[k] for x in f]) for k in f[0]}, half, model=model)
    features = half.attach(data).to_list()
    cached = collator(features)
    states = cached["cached_hidden_states"]
    assert states.dtype == torch.float32  # converted while read: no half-precision copy in between
    assert torch.equal(states, half.batch(range(6), 9).float())
    live = {k: v for k, v in cached.items() if k != "cached_hidden_states"}
    with torch.no_grad():
        torch.testing.assert_close(model(**cached).logits, model(**live).logits, rtol=1e-2, atol=1e-2)

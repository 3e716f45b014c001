"""Official K-Adapter checkpoints -> hf_kadapter.

State dicts are built in the official layout (microsoft/K-Adapter's AdapterModel of fac-adapter.py / lin-adapter.py,
tiny shapes, random weights), converted, and the converted model's outputs are compared with an independent
forward of the official architecture written below in plain torch from its maths (BertLayer-style adapter layers
with pytorch_transformers' erf GELU and post-LayerNorm, chained through the taps, and the pretraining heads).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_adapter
from transformers import AutoModel

import hf_kadapter as hk
from hf_kadapter.kadapter.convert_original import (
    convert_kadapter_original,
    convert_kadapter_original_state_dict,
    load_original_state_dict,
    main,
)

H, A, FFN, HEADS, LAYERS = 32, 16, 24, 2, 2  # base hidden (conftest's tiny RoBERTa), adapter width, FFN, heads, layers
TAPS = [0, 2, 3]
RELATIONS, POSITIONS = 7, 12
ROOT = Path(__file__).resolve().parent.parent


# ----- the official layout, and its forward from the maths --------------------------------------------------------
def official_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the official AdapterModel's state_dict()."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        state[f"{name}.weight"] = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        state[f"{name}.bias"] = 0.1 * torch.randn(out_features, generator=generator)

    def norm(name: str, size: int) -> None:
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(size, generator=generator)
        state[f"{name}.bias"] = 0.1 * torch.randn(size, generator=generator)

    for i in range(len(TAPS)):
        linear(f"adapter.{i}.down_project", A, H)
        for layer in range(LAYERS):
            prefix = f"adapter.{i}.encoder.layer.{layer}."
            for part in ("query", "key", "value"):
                linear(prefix + f"attention.self.{part}", A, A)
            linear(prefix + "attention.output.dense", A, A)
            norm(prefix + "attention.output.LayerNorm", A)
            linear(prefix + "intermediate.dense", FFN, A)
            linear(prefix + "output.dense", A, FFN)
            norm(prefix + "output.LayerNorm", A)
        linear(f"adapter.{i}.up_project", H, A)
    if kind == "factual":
        linear("com_dense", H, 2 * H)
        linear("dense", H, 2 * H)
        linear("out_proj", RELATIONS, H)
    elif kind == "linguistic":
        linear("com_dense", H, 2 * H)
        for part in ("query", "key", "value"):
            linear(f"self_attention.self.{part}", H, H)
        linear("self_attention.output.dense", H, H)
        norm("self_attention.output.LayerNorm", H)
        linear("dense", H, H)
        linear("out_proj", POSITIONS, H)
    return state


def gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x: torch.Tensor, state: dict, name: str, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def dense(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def bert_attention(x: torch.Tensor, state: dict, prefix: str, heads: int, bias: torch.Tensor | float = 0.0):
    """BertAttention: multi-head self-attention, output dense, residual, LayerNorm."""
    batch, length, width = x.shape
    size = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, size).transpose(1, 2)

    q, k, v = (split(dense(x, state, prefix + f"self.{p}")) for p in ("query", "key", "value"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(size) + bias, dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(batch, length, width)
    return layer_norm(dense(context, state, prefix + "output.dense") + x, state, prefix + "output.LayerNorm")


def official_adapter(hidden_states: tuple[torch.Tensor, ...], state: dict) -> torch.Tensor:
    """AdapterModel.forward up to hidden_states_last (adapter_skip_layers 0; the official all-ones mask)."""
    last = torch.zeros_like(hidden_states[-1])
    for i, tap in enumerate(TAPS):
        x = hidden_states[tap] + last
        h = dense(x, state, f"adapter.{i}.down_project")
        for layer in range(LAYERS):
            prefix = f"adapter.{i}.encoder.layer.{layer}."
            a = bert_attention(h, state, prefix + "attention.", HEADS)
            f = dense(gelu(dense(a, state, prefix + "intermediate.dense")), state, prefix + "output.dense")
            h = layer_norm(f + a, state, prefix + "output.LayerNorm")
        last = x + dense(h, state, f"adapter.{i}.up_project")
    return last


def official_factual_logits(sequence_output, last, state, subject, obj) -> torch.Tensor:
    features = dense(torch.cat([sequence_output, last], dim=2), state, "com_dense")
    rows = torch.arange(features.shape[0])
    pair = torch.cat([features[rows, subject], features[rows, obj]], dim=1)
    return dense(dense(pair, state, "dense"), state, "out_proj")


def official_linguistic_logits(sequence_output, last, state, attention_mask) -> torch.Tensor:
    features = dense(torch.cat([sequence_output, last], dim=2), state, "com_dense")
    bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    context = bert_attention(features, state, "self_attention.", 1, bias)
    return dense(dense(context, state, "dense"), state, "out_proj")


@pytest.fixture(scope="module")
def roberta_base(base_dirs):
    return base_dirs["roberta"]


def base_states(base_dir: str, input_ids: torch.Tensor):
    """The frozen base's hidden states, straight from transformers (not through hf_kadapter)."""
    base = AutoModel.from_pretrained(base_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        return base(input_ids, output_hidden_states=True).hidden_states


INPUT_IDS = torch.tensor([[0, 5, 9, 14, 22, 31, 7, 2], [0, 40, 41, 17, 8, 3, 29, 2]])
MASK = torch.ones_like(INPUT_IDS)  # unpadded: the official adapter attends to everything


# ----- tests --------------------------------------------------------------------------------------------------------
def test_factual_adapter_and_head_match_the_official_forward(roberta_base):
    state = official_state_dict("factual")
    hidden = base_states(roberta_base, INPUT_IDS)
    expected = official_adapter(hidden, state)

    model = convert_kadapter_original(state, roberta_base, tap_layers=TAPS, num_attention_heads=HEADS)
    assert isinstance(model, hk.KAdapterModel) and list(model.config.adapters) == ["factual"]
    spec = model.config.get_adapter_config("factual")
    assert (spec.hidden_size, spec.num_layers, spec.intermediate_size, spec.tap_layers) == (A, LAYERS, FFN, TAPS)
    with torch.no_grad():
        out = model(input_ids=INPUT_IDS, attention_mask=MASK)
    torch.testing.assert_close(out.adapter_hidden_states[0], expected, atol=1e-5, rtol=1e-5)

    pretraining = convert_kadapter_original(
        state, roberta_base, tap_layers=TAPS, num_attention_heads=HEADS, with_head=True
    )
    assert isinstance(pretraining, hk.KAdapterForFactualPretraining) and pretraining.config.num_labels == RELATIONS
    subject, obj = torch.tensor([1, 2]), torch.tensor([4, 6])
    with torch.no_grad():
        logits = pretraining(
            input_ids=INPUT_IDS, attention_mask=MASK, subject_positions=subject, object_positions=obj
        ).logits
    reference = official_factual_logits(hidden[-1], expected, state, subject, obj)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_linguistic_adapter_and_head_match_the_official_forward(roberta_base):
    state = official_state_dict("linguistic", seed=1)
    hidden = base_states(roberta_base, INPUT_IDS)
    expected = official_adapter(hidden, state)
    converted = convert_kadapter_original_state_dict(state, tap_layers=TAPS, num_attention_heads=HEADS)
    assert converted.kind == "linguistic" and converted.num_labels == POSITIONS

    model = convert_kadapter_original(state, roberta_base, tap_layers=TAPS, num_attention_heads=HEADS, with_head=True)
    assert isinstance(model, hk.KAdapterForDependencyPretraining)
    assert list(model.config.adapters) == ["linguistic"] and model.config.max_head_positions == POSITIONS
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS, attention_mask=MASK).logits
    reference = official_linguistic_logits(hidden[-1], expected, state, MASK)
    length = INPUT_IDS.shape[1]
    torch.testing.assert_close(logits, reference[..., :length], atol=1e-5, rtol=1e-5)


def test_added_to_an_existing_model_beside_other_adapters(roberta_base):
    torch.manual_seed(0)
    model = hk.KAdapterModel.from_base(roberta_base, adapters={"mine": tiny_adapter()}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = official_state_dict("linguistic", seed=2)
    same = convert_kadapter_original(
        state, model, adapter_name="syntax", kind="adapter", tap_layers=TAPS, num_attention_heads=HEADS, freeze=True
    )
    assert same is model and list(model.config.adapters) == ["mine", "syntax"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing else changed
    assert not any(p.requires_grad for p in model.adapters["syntax"].parameters())
    assert model.adapters["mine"].training and model.adapters["syntax"].training  # the caller's model keeps its mode
    model.eval()
    convert_kadapter_original(
        state, model, adapter_name="again", kind="adapter", tap_layers=TAPS, num_attention_heads=HEADS
    )
    assert not model.adapters["again"].training  # a new adapter follows the model's mode (no dropout in eval)
    model.set_adapter(["syntax"])
    with torch.no_grad():
        out = model(input_ids=INPUT_IDS, attention_mask=MASK)
    expected = official_adapter(base_states(roberta_base, INPUT_IDS), state)
    torch.testing.assert_close(out.adapter_hidden_states[0], expected, atol=1e-5, rtol=1e-5)


def test_official_file_through_the_cli_and_back(tmp_path, roberta_base, capsys):
    """The .bin as the official scripts wrote it (torch.save of the state dict, from a DataParallel wrapper here),
    converted by the CLI, saved as safetensors and reloaded."""
    state = official_state_dict("factual", seed=3)
    folder = tmp_path / "fac-adapter"
    folder.mkdir()
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "pytorch_model.bin")
    output = tmp_path / "converted"
    argv = [str(folder), "--base", roberta_base, "--output-dir", str(output), "--tap_layers", *map(str, TAPS)]
    main([*argv, "--num_attention_heads", str(HEADS), "--adapter_name", "fac"])
    assert "saved KAdapterModel with adapter(s) ['fac']" in capsys.readouterr().out
    assert (output / "model.safetensors").is_file() and not list(output.glob("*.bin"))
    reloaded = hk.KAdapterModel.from_pretrained(output).eval()
    with torch.no_grad():
        out = reloaded(input_ids=INPUT_IDS, attention_mask=MASK)
    expected = official_adapter(base_states(roberta_base, INPUT_IDS), state)
    torch.testing.assert_close(out.adapter_hidden_states[0], expected, atol=1e-5, rtol=1e-5)


def test_python_m_cli_help():
    """`python -m` in a fresh interpreter: works, and runs the module once (hf_kadapter imports converters lazily,
    so runpy does not warn about a module imported twice)."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_kadapter.kadapter.convert_original", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "--tap_layers" in result.stdout and "RuntimeWarning" not in result.stderr


def test_bad_layouts_name_the_problem_and_the_fix(tmp_path, roberta_base):
    state = official_state_dict("factual")
    with pytest.raises(ValueError, match=r"no key 'adapter.<i>.down_project.weight'"):
        convert_kadapter_original_state_dict({"adapters.factual.layers.0.down_project.weight": torch.zeros(2, 2)})
    nested = {f"fac_adapter.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"prefix='fac_adapter\.'"):
        convert_kadapter_original_state_dict(nested, tap_layers=TAPS, num_attention_heads=HEADS)
    assert convert_kadapter_original_state_dict(nested, tap_layers=TAPS, num_attention_heads=HEADS, prefix="fac_adapter.").kind == "factual"  # fmt: skip
    broken = {k: v for k, v in state.items() if "up_project" not in k or not k.startswith("adapter.1.")}
    with pytest.raises(ValueError, match=r"lacks 2 tensors .*adapter\.1\.up_project\.weight"):
        convert_kadapter_original_state_dict(broken, tap_layers=TAPS, num_attention_heads=HEADS)
    with pytest.raises(ValueError, match=r"3 adapter layers but tap_layers=\[0, 11\].*--adapter_list"):
        convert_kadapter_original_state_dict(state, tap_layers=[0, 11], num_attention_heads=HEADS)
    with pytest.raises(ValueError, match=r"not divisible by num_attention_heads=12"):
        convert_kadapter_original_state_dict(state, tap_layers=TAPS)
    headless = {k: v for k, v in state.items() if k.startswith("adapter.")}
    with pytest.raises(ValueError, match=r"lacks the official linguistic pretraining head"):
        convert_kadapter_original_state_dict(headless, tap_layers=TAPS, num_attention_heads=HEADS, kind="linguistic")
    with pytest.raises(ValueError, match="holds no official pretraining head"):
        convert_kadapter_original(headless, roberta_base, tap_layers=TAPS, num_attention_heads=HEADS, with_head=True)
    with pytest.raises(hk.KAdapterBaseMismatchError, match=r"layers \[0, 2, 9\].*4 layers"):
        convert_kadapter_original(state, roberta_base, tap_layers=[0, 2, 9], num_attention_heads=HEADS)
    pickled = tmp_path / "pytorch_model.bin"
    torch.save({"args": argparse.Namespace(adapter_size=768)}, pickled)  # training_args-like: not tensors
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_original_state_dict(pickled)
    with pytest.raises(FileNotFoundError, match="neither pytorch_model.bin nor model.safetensors"):
        load_original_state_dict(tmp_path / "nothing-here" if (tmp_path / "nothing-here").mkdir() is None else "")

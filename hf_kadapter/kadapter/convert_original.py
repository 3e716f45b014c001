"""Convert the official K-Adapter checkpoints (microsoft/K-Adapter: fac-adapter, lin-adapter) into hf_kadapter.

The official scripts saved `AdapterModel.state_dict()` with `torch.save` as `pytorch_model.bin`. Its layout, for a
base of hidden size H (1024, RoBERTa-large) and an adapter of width A (`--adapter_size 768`):

- one adapter layer per tapped hidden state (`--adapter_list 0,11,22`), each `adapter.{i}.`:
  `down_project` (H -> A), `encoder.layer.{l}.*` (`--adapter_transformer_layers 2` BERT layers of width A, with
  pytorch_transformers' names: attention.self.query/key/value, attention.output.dense/LayerNorm,
  intermediate.dense, output.dense/LayerNorm), `up_project` (A -> H);
- the pretraining head: fac-adapter `com_dense` (2H -> H), `dense` (2H -> H), `out_proj` (H -> relations);
  lin-adapter `com_dense`, a one-head `self_attention` (BertAttention names), `dense` (H -> H), `out_proj`
  (H -> max_seq_length positions). The fine-tuning scripts drop the head and keep `adapter.*`.

The adapter maths is K-Adapter's (see docs/kadapter.md): layer i reads tap_i + previous output, returns that plus
up(encoder(down(.))); it maps one to one onto `KnowledgeAdapter` (input_mode "sum"). Two things the checkpoint
cannot tell and the converter therefore asks for: the taps (`tap_layers`, default the released 0, 11, 22) and the
adapter's head count (`num_attention_heads`, 12 in every released run). The released runs use
`--adapter_skip_layers 0`; adapters trained with skip connections have another forward and are not supported.
The official adapter attends to padding (all-ones mask); hf_kadapter honours the attention mask, so outputs agree
exactly on unpadded inputs.

Only tensors are read: `torch.load(..., weights_only=True)` (or a safetensors file), never arbitrary pickles.

    python -m hf_kadapter.kadapter.convert_original fac-adapter/pytorch_model.bin --base roberta-large \\
        --output_dir fac-adapter-hf --adapter_name factual
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from ..utils.io import load_safetensors
from .configuration_kadapter import KnowledgeAdapterConfig
from .modeling_kadapter import (
    _DOWNLOAD_KWARGS,
    KAdapterBaseMismatchError,
    KAdapterForDependencyPretraining,
    KAdapterForFactualPretraining,
    KAdapterModel,
    KAdapterPreTrainedModel,
    _bare_encoder,
)

__all__ = [
    "LAYER_KEYS",
    "FACTUAL_HEAD_KEYS",
    "LINGUISTIC_HEAD_KEYS",
    "OriginalKAdapter",
    "convert_kadapter_original",
    "convert_kadapter_original_state_dict",
    "load_original_state_dict",
    "main",
]

RELEASED_TAP_LAYERS = (0, 11, 22)
# Official names inside `adapter.{i}.encoder.layer.{l}.` -> hf_kadapter names inside `layers.{i}.encoder.{l}.`.
LAYER_KEYS: dict[str, str] = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.output",
    "attention.output.LayerNorm": "attention.LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "LayerNorm",
}
# Pretraining heads: official module -> the module of KAdapterForFactualPretraining / KAdapterForDependencyPretraining.
FACTUAL_HEAD_KEYS: dict[str, str] = {
    "com_dense": "com_dense",
    "dense": "classifier.dense",
    "out_proj": "classifier.out_proj",
}
LINGUISTIC_HEAD_KEYS: dict[str, str] = {
    "com_dense": "com_dense",
    "self_attention.self.query": "self_attention.query",
    "self_attention.self.key": "self_attention.key",
    "self_attention.self.value": "self_attention.value",
    "self_attention.output.dense": "self_attention.output",
    "self_attention.output.LayerNorm": "self_attention.LayerNorm",
    "dense": "classifier.dense",
    "out_proj": "classifier.out_proj",
}
_KINDS = ("auto", "factual", "linguistic", "adapter")
_ADAPTER_LAYER = re.compile(r"^adapter\.(\d+)\.down_project\.weight$")
_ENCODER_LAYER = re.compile(r"^adapter\.0\.encoder\.layer\.(\d+)\.")


@dataclass
class OriginalKAdapter:
    """An official checkpoint mapped to hf_kadapter names.

    `adapter_config` describes the adapter; `adapter_state` is the state dict of a `KnowledgeAdapter` module;
    `kind` is "factual" / "linguistic" when the checkpoint holds that pretraining head (`head_state`, keyed as the
    head modules of the matching pretraining class, and `num_labels`: relations or head positions), else "adapter".
    """

    kind: str
    adapter_config: KnowledgeAdapterConfig
    adapter_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)
    num_labels: int | None = None
    base_hidden_size: int = 0


def load_original_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint: a state dict, a `pytorch_model.bin` (read with weights_only=True),
    a `.safetensors` file, or a folder holding either. A `module.` prefix (DataParallel) is removed."""
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
        source = "the state dict given"
    else:
        path = Path(checkpoint)
        if path.is_dir():
            candidates = [path / name for name in ("pytorch_model.bin", "model.safetensors") if (path / name).is_file()]
            if not candidates:
                raise FileNotFoundError(
                    f"{path} holds neither pytorch_model.bin nor model.safetensors: give the official checkpoint file "
                    "(e.g. pretrained_models/fac-adapter/pytorch_model.bin)."
                )
            path = candidates[0]
        if not path.is_file():
            raise FileNotFoundError(f"No checkpoint at {path}: give the official pytorch_model.bin (or its folder).")
        source = str(path)
        if path.suffix == ".safetensors":
            state = load_safetensors(path)  # a file cut short is named
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - re-raised with the fix
                raise ValueError(
                    f"{path} could not be read as a plain tensor checkpoint with torch.load(weights_only=True) "
                    f"({type(error).__name__}: {error}). Only state dicts of tensors are read (the official "
                    "pytorch_model.bin files are); a file that pickles other objects is refused for safety."
                ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state dict of tensors (got {type(state).__name__}).")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def convert_kadapter_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    tap_layers: Sequence[int] = RELEASED_TAP_LAYERS,
    num_attention_heads: int = 12,
    kind: str = "auto",
    prefix: str = "",
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-5,
) -> OriginalKAdapter:
    """Map an official `AdapterModel` state dict to hf_kadapter names (no model is built).

    `prefix` selects the adapter inside a larger state dict (e.g. "fac_adapter." in a fine-tuned ETModel's);
    `kind` is "auto" (from the head's keys), "factual", "linguistic" or "adapter" (ignore any head). Sizes are read
    from the tensors; `hidden_act` and `layer_norm_eps` are the official AdapterConfig's ("gelu", 1e-5).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not known; use one of {_KINDS}.")
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    layer_indices = sorted(int(m.group(1)) for k in state if (m := _ADAPTER_LAYER.match(k)))
    if not layer_indices:
        hint = _prefix_hint(state_dict)
        raise ValueError(
            f"Not an official K-Adapter AdapterModel state dict: no key 'adapter.<i>.down_project.weight' under "
            f"prefix {prefix!r} (keys start with {sorted({k.split('.')[0] for k in state_dict})[:8]}). Give the "
            "fac-adapter / lin-adapter pytorch_model.bin" + (f", or pass prefix={hint!r}" if hint else "") + "."
        )
    if layer_indices != list(range(len(layer_indices))):
        raise ValueError(f"Adapter layers {layer_indices} are not numbered 0..{len(layer_indices) - 1}: damaged file?")
    tap_layers = [int(t) for t in tap_layers]
    if len(tap_layers) != len(layer_indices):
        raise ValueError(
            f"The checkpoint has {len(layer_indices)} adapter layers but tap_layers={tap_layers} names "
            f"{len(tap_layers)}: pass the --adapter_list it was trained with (released: 0,11,22)."
        )
    down = state["adapter.0.down_project.weight"]
    adapter_size, base_hidden = down.shape
    transformer_layers = sorted({int(m.group(1)) for k in state if (m := _ENCODER_LAYER.match(k))})
    if not transformer_layers:
        raise ValueError(
            "The checkpoint's adapter layer 0 has no 'encoder.layer.<l>.' tensors: not an official K-Adapter "
            "AdapterModel (adapter_transformer_layers >= 1)."
        )
    expected: dict[str, str] = {}  # official key -> hf_kadapter key (inside the KnowledgeAdapter module)
    for i in layer_indices:
        for part in ("down_project", "up_project"):
            for leaf in ("weight", "bias"):
                expected[f"adapter.{i}.{part}.{leaf}"] = f"layers.{i}.{part}.{leaf}"
        for layer in transformer_layers:
            for official, ours in LAYER_KEYS.items():
                for leaf in ("weight", "bias"):
                    expected[f"adapter.{i}.encoder.layer.{layer}.{official}.{leaf}"] = (
                        f"layers.{i}.encoder.{layer}.{ours}.{leaf}"
                    )
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensors of the official adapter layout, e.g. {missing[:6]}: it is "
            "not a complete fac-adapter / lin-adapter AdapterModel state dict (damaged or another layout)."
        )
    if adapter_size % num_attention_heads:
        raise ValueError(
            f"Adapter width {adapter_size} is not divisible by num_attention_heads={num_attention_heads}: pass the "
            "head count the adapter was trained with (12 in the released runs)."
        )
    intermediate = state["adapter.0.encoder.layer.0.intermediate.dense.weight"].shape[0]
    config = KnowledgeAdapterConfig(
        tap_layers=tap_layers,
        num_layers=len(transformer_layers),
        hidden_size=int(adapter_size),
        num_attention_heads=num_attention_heads,
        intermediate_size=int(intermediate),
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        input_mode="sum",
    )
    adapter_state = {ours: state[official].clone() for official, ours in expected.items()}
    result = OriginalKAdapter("adapter", config, adapter_state, base_hidden_size=int(base_hidden))

    rest = set(state) - set(expected)
    if kind == "auto":
        if "self_attention.self.query.weight" in rest:
            kind = "linguistic"
        elif {"com_dense.weight", "dense.weight", "out_proj.weight"} <= rest:
            kind = "factual"
        else:
            kind = "adapter"
    if kind != "adapter":
        names = FACTUAL_HEAD_KEYS if kind == "factual" else LINGUISTIC_HEAD_KEYS
        head_keys = {f"{a}.{leaf}": f"{b}.{leaf}" for a, b in names.items() for leaf in ("weight", "bias")}
        missing = [k for k in head_keys if k not in rest]
        if missing:
            raise ValueError(
                f"kind={kind!r} but the checkpoint lacks the official {kind} pretraining head tensors {missing}: pass "
                "kind='adapter' to convert the adapter alone, or the other kind."
            )
        result.kind = kind
        result.head_state = {ours: state[official].clone() for official, ours in head_keys.items()}
        result.num_labels = int(state["out_proj.weight"].shape[0])
    return result


def convert_kadapter_original(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    base: str | os.PathLike | PreTrainedModel,
    *,
    adapter_name: str | None = None,
    kind: str = "auto",
    tap_layers: Sequence[int] = RELEASED_TAP_LAYERS,
    num_attention_heads: int = 12,
    prefix: str = "",
    with_head: bool = False,
    freeze: bool = False,
    output_dir: str | os.PathLike | None = None,
    base_kwargs: dict[str, Any] | None = None,
) -> KAdapterPreTrainedModel:
    """Load an official fac-adapter / lin-adapter checkpoint as an hf_kadapter adapter.

    `base` is the base the adapter was trained on (`"roberta-large"` for the released ones: a name, a folder or a
    loaded model), giving a new `KAdapterModel` with that one adapter; or an existing K-Adapter model, to which the
    adapter is added (`adapter_name`, default "factual" / "linguistic" / "adapter" after the head found).
    `with_head=True` returns the matching pretraining model (`KAdapterForFactualPretraining` /
    `KAdapterForDependencyPretraining`) with the official head's weights, e.g. to continue pretraining.
    A new model's fusion layers are freshly initialised: they are task weights, trained when fine-tuning.
    `output_dir` saves the result with `save_pretrained` (safetensors, adapter-only: the base is referenced).
    """
    converted = convert_kadapter_original_state_dict(
        load_original_state_dict(checkpoint),
        tap_layers=tap_layers,
        num_attention_heads=num_attention_heads,
        kind=kind,
        prefix=prefix,
    )
    name = adapter_name or (converted.kind if converted.kind != "adapter" else "adapter")
    if with_head and converted.kind == "adapter":
        raise ValueError(
            "with_head=True but the checkpoint holds no official pretraining head (com_dense, dense, out_proj): "
            "convert the adapter alone (with_head=False)."
        )
    if isinstance(base, KAdapterPreTrainedModel):
        if with_head:
            raise ValueError(
                "with_head=True builds a new pretraining model: pass the base encoder (e.g. 'roberta-large') as "
                "base, not an existing K-Adapter model."
            )
        model = base
        _check_base(converted, model.config.base_config, str(model.config.base_model_name_or_path))
        module = model.add_adapter(name, converted.adapter_config)
        module.load_state_dict(converted.adapter_state, strict=True)
        module.train(model.training)  # add_adapter leaves a new module in training mode, whatever the model's
    else:
        head_kwargs: dict[str, Any] = {}
        model_class: type[KAdapterPreTrainedModel] = KAdapterModel
        if with_head and converted.kind == "factual":
            model_class, head_kwargs = KAdapterForFactualPretraining, {"num_labels": converted.num_labels}
        elif with_head:
            model_class, head_kwargs = KAdapterForDependencyPretraining, {"max_head_positions": converted.num_labels}
        if isinstance(base, PreTrainedModel):
            _check_base(converted, _bare_encoder(base).config, type(base).__name__)
        else:
            download = {k: v for k, v in (base_kwargs or {}).items() if k in _DOWNLOAD_KWARGS}
            _check_base(converted, AutoConfig.from_pretrained(str(base), **download), str(base))
        model = model_class.from_base(
            base, adapters={name: converted.adapter_config}, base_kwargs=base_kwargs, **head_kwargs
        )
        model._core().adapters[name].load_state_dict(converted.adapter_state, strict=True)
        if with_head:
            head_modules = ("com_dense", "classifier", "self_attention")
            head = {k for k in model.state_dict() if k.split(".")[0] in head_modules}
            if head != set(converted.head_state):
                raise ValueError(
                    f"The official head does not fit {model_class.__name__}'s head (model {sorted(head)[:4]}, "
                    f"checkpoint {sorted(converted.head_state)[:4]})."
                )
            model.load_state_dict(converted.head_state, strict=False)
        model.eval()  # a new model, for inference; a model passed in keeps its mode
    if freeze:
        model.freeze_adapter(name)
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def _check_base(converted: OriginalKAdapter, base_config: Any, base_name: str) -> None:
    """The adapter's input width must be the base's hidden size, and every tap must exist in the base."""
    taps = converted.adapter_config.tap_layers
    if base_config.hidden_size != converted.base_hidden_size or max(taps) > base_config.num_hidden_layers:
        raise KAdapterBaseMismatchError(
            f"The adapter reads hidden states of size {converted.base_hidden_size} at layers {taps}, but the base "
            f"{base_name} has hidden size {base_config.hidden_size} and {base_config.num_hidden_layers} layers: "
            "pass the base it was trained on (roberta-large for the released adapters) and its --adapter_list."
        )


def _prefix_hint(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The prefix under which an adapter sits, when there is one (fine-tuned models hold fac_adapter., ...)."""
    for key in state_dict:
        head, sep, _ = key.partition("adapter.0.down_project.weight")
        if sep and head and key.endswith("adapter.0.down_project.weight"):
            return head
    return None


def main(argv: list[str] | None = None) -> KAdapterPreTrainedModel:
    parser = argparse.ArgumentParser(
        prog="python -m hf_kadapter.kadapter.convert_original",
        description="Convert an official K-Adapter checkpoint (fac-adapter / lin-adapter pytorch_model.bin) into an "
        "hf_kadapter K-Adapter folder.",
    )
    parser.add_argument("checkpoint", help="the official pytorch_model.bin (or its folder)")
    parser.add_argument("--base", required=True, help="the base it was trained on (Hub id or folder): roberta-large")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="where to save the hf_kadapter model")
    parser.add_argument(
        "--adapter-name", "--adapter_name", help="name of the adapter (default: factual / linguistic / adapter)"
    )
    parser.add_argument("--kind", choices=_KINDS, default="auto", help="which pretraining head (auto: detect)")
    parser.add_argument(
        "--tap-layers", "--tap_layers", type=int, nargs="+", default=list(RELEASED_TAP_LAYERS),
        help="the --adapter_list used",
    )
    parser.add_argument(
        "--num-attention-heads", "--num_attention_heads", type=int, default=12, help="adapter heads (12 in released runs)"
    )
    parser.add_argument("--prefix", default="", help="key prefix of the adapter (e.g. fac_adapter. in ETModel)")
    parser.add_argument("--with-head", "--with_head", action="store_true", help="keep the official pretraining head")
    args = parser.parse_args(argv)
    model = convert_kadapter_original(
        args.checkpoint,
        args.base,
        adapter_name=args.adapter_name,
        kind=args.kind,
        tap_layers=args.tap_layers,
        num_attention_heads=args.num_attention_heads,
        prefix=args.prefix,
        with_head=args.with_head,
        output_dir=args.output_dir,
    )
    print(f"saved {type(model).__name__} with adapter(s) {list(model.config.adapters)} to {args.output_dir}")
    return model


if __name__ == "__main__":
    main()

"""Configuration of K-Adapter models (Wang et al., 2021).

This file is shipped next to saved checkpoints as remote code, so it imports only from transformers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

INPUT_MODES = ("sum", "concat")
FUSION_MODES = ("concat", "add")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclasses.dataclass
class KnowledgeAdapterConfig:
    """One knowledge adapter: K adapter layers, each fed by one tapped hidden state of the frozen base.

    Defaults are the released K-Adapter settings for RoBERTa-large (adapter hidden 768, 2 transformer layers
    of 12 heads and FFN 3072 per adapter layer, projections initialised with std 2e-4, "sum" input).
    `tap_layers` index `hidden_states` of the base: 0 is the embedding output, k the output of layer k.
    `input_mode="sum"` adds the tapped state to the previous adapter layer's output (official code);
    `"concat"` concatenates them and lets the down projection map 2H -> adapter hidden (the paper).
    `base_fingerprint` records the base the adapter was created on, so it is never loaded onto another.
    """

    tap_layers: list[int]
    num_layers: int = 2
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-5
    init_std: float = 2e-4
    input_mode: str = "sum"
    base_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.tap_layers = [int(t) for t in self.tap_layers]
        if not self.tap_layers:
            raise ValueError(
                "KnowledgeAdapterConfig.tap_layers is empty: give at least one hidden_states index to tap."
            )
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode={self.input_mode!r} is not supported; use one of {INPUT_MODES}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"adapter hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides it."
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers}: an adapter layer needs at least one transformer layer.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeAdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown knowledge-adapter settings {sorted(unknown)}; known settings are {sorted(known)}."
            )
        return cls(**data)


def default_tap_layers(num_hidden_layers: int, variant: str = "released") -> list[int]:
    """Taps scaled from RoBERTa-large's: released scripts use {0, 11, 22}, the paper {0, 11, 23}."""
    if variant not in ("released", "paper"):
        raise ValueError(f"tap variant {variant!r} is not known; use 'released' or 'paper'.")
    last = num_hidden_layers - (2 if variant == "released" else 1)
    taps = [0, num_hidden_layers // 2 - 1, last]
    return sorted({max(0, t) for t in taps})


@strict
class KAdapterConfig(PreTrainedConfig):
    r"""
    Configuration of a K-Adapter model: a frozen pretrained encoder (`base_config`) plus named knowledge adapters.

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Configuration of the pretrained encoder (any BERT-like or RoBERTa-like model).
        base_model_name_or_path (`str`, *optional*):
            Where the base weights come from; adapter-only checkpoints rebuild the base from it.
        base_fingerprint (`str`, *optional*):
            Digest of the base weights the adapters were trained on.
        adapters (`dict[str, dict]`):
            Adapter name -> `KnowledgeAdapterConfig` fields.
        active_adapters (`list[str]`, *optional*):
            Adapters used in the forward pass, in fusion order; `None` means all, in insertion order.
        fusion (`str`):
            "concat" (official): per adapter dense(concat(base, adapter)) then a dense over their concatenation;
            "add": base output plus the sum of adapter outputs.
        freeze_base (`bool`):
            Keep the base frozen (and under no_grad); re-applied after every load.
        frozen_adapters (`list[str]`, *optional*):
            Adapters whose weights are frozen (fine-tuning freezes them all by default in the paper).
        pretraining_adapter (`str`, *optional*):
            The adapter a pretraining head trains; `None` means the only adapter.
        max_head_positions (`int`, *optional*):
            Size of the dependency head's position classifier (the official code used max_seq_length).
        base_lora (`dict`, *optional*):
            peft LoraConfig fields of LoRA added to the base's attention (see `add_base_lora`).
    """

    model_type = "kadapter"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="roberta")}

    base_config: PreTrainedConfig | dict | None = None
    base_model_name_or_path: str | None = None
    base_fingerprint: str | None = None
    adapters: dict | None = None
    active_adapters: list | None = None
    fusion: str = "concat"
    freeze_base: bool = True
    frozen_adapters: list | None = None
    pretraining_adapter: str | None = None
    max_head_positions: int | None = None
    classifier_dropout: float | None = None
    base_lora: dict | None = None

    def __post_init__(self, **kwargs):
        # PreTrainedConfig dispatches attn_implementation (None when not given) to sub-configs: keep the base's own.
        base_attn = getattr(self.base_config, "_attn_implementation_internal", None)
        super().__post_init__(**kwargs)
        if "attn_implementation" not in kwargs and base_attn is not None:
            self.base_config._attn_implementation_internal = base_attn
        self.adapters = {
            name: (spec.to_dict() if isinstance(spec, KnowledgeAdapterConfig) else dict(spec))
            for name, spec in (self.adapters or {}).items()
        }
        self.frozen_adapters = list(self.frozen_adapters or [])
        if self.active_adapters is not None:
            self.active_adapters = list(self.active_adapters)
        self.validate_kadapter()

    # ----------------------------------------------------------------------------------------------------------
    def validate_kadapter(self) -> None:
        """Raise a ValueError naming the bad setting and its fix; cheap, so it runs on every change."""
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion={self.fusion!r} is not supported; use one of {FUSION_MODES}.")
        num_layers = getattr(self.base_config, "num_hidden_layers", None)
        for name, spec in self.adapters.items():
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"adapter name {name!r} is not valid: use letters, digits, '_' or '-', starting with a letter."
                )
            spec = KnowledgeAdapterConfig.from_dict(spec)
            if num_layers is not None:
                bad = [t for t in spec.tap_layers if not 0 <= t <= num_layers]
                if bad:
                    raise ValueError(
                        f"adapter {name!r} taps hidden_states {bad}, but the base has {num_layers} layers "
                        f"(valid taps are 0..{num_layers}, 0 being the embedding output)."
                    )
        for label, names in (
            ("active_adapters", self.active_adapters or []),
            ("frozen_adapters", self.frozen_adapters),
        ):
            missing = [n for n in names if n not in self.adapters]
            if missing:
                raise ValueError(f"{label} names unknown adapters {missing}; the model has {list(self.adapters)}.")

    def get_adapter_config(self, name: str) -> KnowledgeAdapterConfig:
        if name not in self.adapters:
            raise KeyError(f"No adapter named {name!r}; the model has {list(self.adapters)}.")
        return KnowledgeAdapterConfig.from_dict(self.adapters[name])

    def get_active_adapters(self) -> list[str]:
        return list(self.adapters) if self.active_adapters is None else list(self.active_adapters)

    @property
    def hidden_size(self) -> int:
        """The base's hidden size: the width of every K-Adapter output (used by DeepSpeed 'auto' and heads)."""
        return self.base_config.hidden_size

    @classmethod
    def from_paper(
        cls,
        base_config: PreTrainedConfig,
        adapters: tuple[str, ...] = ("factual", "linguistic"),
        taps: str = "released",
        **kwargs: Any,
    ) -> KAdapterConfig:
        """The paper's setup: factual + linguistic adapters with the released taps ({0,11,22} on 24 layers).

        `taps="paper"` gives the paper's {0,11,23}; other adapter fields can be overridden through `adapter_kwargs`.
        """
        adapter_kwargs = kwargs.pop("adapter_kwargs", {})
        taps_list = default_tap_layers(base_config.num_hidden_layers, taps)
        specs = {name: KnowledgeAdapterConfig(tap_layers=taps_list, **adapter_kwargs).to_dict() for name in adapters}
        return cls(base_config=base_config, adapters=specs, **kwargs)


__all__ = ["KAdapterConfig", "KnowledgeAdapterConfig", "default_tap_layers"]

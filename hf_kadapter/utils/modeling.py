"""Plumbing shared by the package's composite models: a `PreTrainedModel` around another transformers model.

`PELTModel` (around any model), `OpenQAReader` (around an encoder) and `RealmKnowledgeAugmentedMLM` (around a
masked LM and a retriever embedder) keep the inner model's config as a sub-config and record its class, so that
`from_pretrained` can rebuild it; the inner model's tied weights are declared by the inner model itself
(transformers 5 gathers `_tied_weights_keys` from sub-models), so checkpoints never hit "tensors share memory".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init


class CompositeConfig(PreTrainedConfig):
    """A config holding other models' configs (`sub_configs_defaults`).

    Why: `PreTrainedConfig` hands its own `attn_implementation` (None when not given) down to every sub-config,
    which would silently change the attention of an inner model that was loaded with, say, "eager". Each
    sub-config keeps its own unless `attn_implementation` is given explicitly.
    """

    def __post_init__(self, **kwargs):
        own = [(sub, sub._attn_implementation_internal) for sub in _nested_configs(self)]
        super().__post_init__(**kwargs)
        if "attn_implementation" in kwargs:
            return
        for sub, attn in own:
            if attn is not None:
                sub._attn_implementation_internal = attn


def _nested_configs(config: Any) -> list[PreTrainedConfig]:
    """Every config inside `config` (a K-Adapter config inside a PELT config holds its base's config too)."""
    found = []
    for key in getattr(config, "sub_configs_defaults", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PreTrainedConfig):
            found += [sub, *_nested_configs(sub)]
    return found


class config_property:
    """A model attribute that lives in its config, so it is saved and restored with it (`reader.max_span_width`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        return self if model is None else getattr(model.config, self.name)

    def __set__(self, model: Any, value: Any) -> None:
        setattr(model.config, self.name, value)


def source_name(model: nn.Module) -> str | None:
    """Where an inner model came from: a K-Adapter model's base, else its own checkpoint name (None if random)."""
    config = getattr(model, "config", None)
    return getattr(config, "base_model_name_or_path", None) or getattr(config, "name_or_path", None) or None


def model_init_kwargs(model: nn.Module) -> dict[str, Any]:
    """Constructor keywords that rebuild `model`'s architecture from its config (a bare encoder without pooler)."""
    accepts = inspect.signature(type(model).__init__).parameters
    if "add_pooling_layer" in accepts and getattr(model, "pooler", "absent") is None:
        return {"add_pooling_layer": False}
    return {}


def resolve_model_class(name: str) -> type[PreTrainedModel]:
    """A transformers or hf_kadapter model class by name (nothing else is imported from a downloaded config)."""
    import transformers

    import hf_kadapter

    for namespace in (transformers, hf_kadapter):
        klass = getattr(namespace, name, None)
        if isinstance(klass, type) and issubclass(klass, PreTrainedModel):
            return klass
    raise ValueError(
        f"Cannot rebuild an inner model of class {name!r}: only transformers and hf_kadapter model classes are "
        "rebuilt from a saved config. Build the model yourself and wrap it again (e.g. PELTModel(model, table))."
    )


def build_inner_model(name: str, config: PreTrainedConfig, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """The inner model of a composite checkpoint, with random weights (from_pretrained fills them)."""
    return resolve_model_class(name)(config, **(init_kwargs or {}))


def keep_pretrained_weights(module: nn.Module) -> None:
    """Mark a pretrained module's weights as initialised, so the wrapper's `post_init` leaves them alone."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor._is_hf_initialized = True
    for sub in module.modules():
        sub._is_hf_initialized = True


@torch.no_grad()
def default_linear_init(module: nn.Module) -> None:
    """PyTorch's own nn.Linear init (what the new layers of the package's composite models start from), through
    transformers' init functions so that weights loaded by from_pretrained are never overwritten."""
    if isinstance(module, nn.Linear):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            bound = 1.0 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)


def reapply_freezing(model: nn.Module) -> None:
    """K-Adapter models inside a composite model re-freeze after loading (from_pretrained recreates parameters)."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "_apply_trainability", None)):
            module._apply_trainability()


def save_with_companion(
    save_weights: Callable[[], None], config: PreTrainedConfig, field: str, save: bool | None, what: str
) -> bool:
    """Save a composite model whose non-module part (an entity table, a retriever) is a `field` of its config:
    None means "saved beside the weights", otherwise a Hub id or folder it is loaded from.

    `save=None` saves the companion unless the config points elsewhere (then checkpoints stay small); the saved
    config says None while the companion is saved beside it. Returns whether the caller must save the companion.
    """
    recorded = getattr(config, field)
    if save is None:
        save = recorded is None
    if not save and recorded is None:
        raise ValueError(
            f"Saving without the {what} needs config.{field}: the Hub id or folder of the saved {what} that "
            f"from_pretrained should load instead (e.g. model.config.{field} = 'me/my-{what.replace(' ', '-')}')."
        )
    if save:
        setattr(config, field, None)
    try:
        save_weights()
    finally:
        setattr(config, field, recorded)
    return save


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """No dropout inside inference helpers; every module gets its previous mode back afterwards."""
    previous = [(module, module.training) for module in modules if isinstance(module, nn.Module)]
    for module, _ in previous:
        module.eval()
    try:
        yield
    finally:
        for module, mode in previous:
            module.train(mode)


__all__ = [
    "CompositeConfig",
    "build_inner_model",
    "config_property",
    "default_linear_init",
    "eval_mode",
    "keep_pretrained_weights",
    "model_init_kwargs",
    "reapply_freezing",
    "resolve_model_class",
    "save_with_companion",
    "source_name",
]

"""The masked LM head's transform (dense -> activation -> layer norm, before the decoder): where PELT's entity vectors
come from, and therefore part of what a table's fingerprint records; plus the wrappers a model may come in."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel


def _unwrap(model: nn.Module) -> nn.Module:
    """Look through wrappers that are not the encoder's model themselves (DDP's `.module`, PELTModel's `.model`)."""
    while not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) == "pelt":
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _is_kadapter(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "kadapter"


def _module_gelu(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation the head's own code applies (RoBERTa-style heads call their module's `gelu`)."""
    gelu = getattr(sys.modules.get(type(module).__module__), "gelu", None)
    return gelu if callable(gelu) else F.gelu


def _find_transform(model: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], list[str]] | None:
    """(kind, function, names of the modules holding its weights) of a masked LM's head transform, or None."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if isinstance(getattr(predictions, "transform", None), nn.Module):  # BERT family: cls.predictions.transform
        return "bert", predictions.transform, ["cls.predictions.transform"]
    head = getattr(model, "lm_head", None)
    if all(isinstance(getattr(head, name, None), nn.Module) for name in ("dense", "layer_norm")):  # RoBERTa family
        activation = _module_gelu(head)
        return "roberta", lambda h: head.layer_norm(activation(head.dense(h))), ["lm_head.dense", "lm_head.layer_norm"]
    generator = getattr(model, "generator_predictions", None)
    if all(isinstance(getattr(generator, n, None), nn.Module) for n in ("dense", "activation", "LayerNorm")):
        return "electra", generator, ["generator_predictions"]  # ELECTRA generator: its forward is the transform
    head = getattr(model, "predictions", None)
    if all(isinstance(getattr(head, n, None), nn.Module) for n in ("dense", "activation", "LayerNorm", "decoder")):
        function = lambda h: head.LayerNorm(head.activation(head.dense(h)))  # noqa: E731
        return "albert", function, ["predictions.dense", "predictions.LayerNorm"]
    if all(isinstance(getattr(model, n, None), nn.Module) for n in ("vocab_transform", "vocab_layer_norm")):
        activation = getattr(model, "activation", None) or F.gelu
        function = lambda h: model.vocab_layer_norm(activation(model.vocab_transform(h)))  # noqa: E731
        return "distilbert", function, ["vocab_transform", "vocab_layer_norm"]
    return None


def _resolve_transform(model: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(kind, function) of the masked LM's head transform: dense -> activation -> layer norm, no decoder."""
    model = _unwrap(model)
    if _is_kadapter(model):
        raise TypeError(
            f"{type(model).__name__} is a K-Adapter model: it has no masked-LM head. Build the table with the masked "
            "LM of its base (AutoModelForMaskedLM.from_pretrained(model.config.base_model_name_or_path)); the table "
            "then works with the K-Adapter model, which shares that base's fingerprint."
        )
    found = _find_transform(model)
    if found is None:
        raise TypeError(
            f"{type(model).__name__} has no masked-LM head transform that PELT knows. Supported: BERT-style "
            "`cls.predictions.transform` (BertForMaskedLM ...), RoBERTa-style `lm_head.dense` + `lm_head.layer_norm` "
            "(RobertaForMaskedLM, XLMRobertaForMaskedLM ...), ELECTRA `generator_predictions`, ALBERT `predictions`, "
            "DistilBERT `vocab_transform` + `vocab_layer_norm`. Load the model with AutoModelForMaskedLM (a bare "
            "encoder has no head)."
        )
    return found[0], found[1]


def lm_head_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]] | None:
    """The named weights of a masked LM's head transform (what turns encoder states into PELT vectors), or None
    for a model without one (a bare encoder, a K-Adapter model)."""
    model = _unwrap(model)
    found = None if _is_kadapter(model) else _find_transform(model)
    if found is None:
        return None
    return [
        (f"{name}.{key}", tensor) for name in found[2] for key, tensor in model.get_submodule(name).state_dict().items()
    ]


def lm_head_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The masked LM head's transform of encoder states (dense -> gelu -> layer norm), before the decoder.

    Its output lives in the word-embedding space (the decoder is tied to the input embeddings), which is why PELT's
    entity vectors can be plugged into the input.
    """
    return _resolve_transform(model)[1](hidden)


__all__ = ["lm_head_tensors", "lm_head_transform"]

"""Convert transformers v4 REALM checkpoints (the google/realm-* models) into this package's classes.

transformers removed its Realm* classes in v5, so the released REALM weights no longer load. Their v4 layout:

- `RealmEmbedder` (google/realm-cc-news-pretrained-embedder; `embedder.` inside RealmScorer / RealmForOpenQA, e.g.
  google/realm-orqa-nq-openqa): `realm.*` a BERT model with its pooler, `cls.dense` (hidden -> 128) and
  `cls.LayerNorm`; the embedding is LayerNorm(dense(pooler_output)), pooler_output = tanh(dense([CLS])).
  -> `RetrieverEmbedder` with `pooling="pooler"`, a projection and `projection_layer_norm_eps` (shared towers:
  REALM embeds queries and documents with the same embedder). `cls.predictions.*` is unused by that forward.
- `RealmKnowledgeAugEncoder` (google/realm-cc-news-pretrained-encoder): `realm.*` + `cls.predictions.*`, a BERT
  masked LM -> `BertForMaskedLM` (the knowledge-augmented MLM reads "[CLS] x [SEP] z [SEP]" pairs; marginalising
  over retrieved z is `hf_kadapter.retrieval.realm`'s job).
- `RealmReader` (google/realm-orqa-nq-reader; `reader.` inside RealmForOpenQA): `realm.*` + `qa_outputs`:
  `dense_intermediate` (hidden -> 2 x span_hidden, the start and end projections side by side), ReLU of their sum,
  `layer_normalization`, `dense_output` (span_hidden -> 1); the retrieval score is added.
  -> `OpenQAReader` (encoder + span scorer, mapping in `READER_SPAN_SCORER`); `cls.*` is unused by the reader.

Activations and epsilons come from the checkpoint's config.json (RealmConfig: hidden_act "gelu_new", layer_norm_eps
1e-12, reader_layer_norm_eps 1e-3); only tensors are read (`torch.load(..., weights_only=True)` or safetensors).

    python -m hf_kadapter.retrieval.convert_realm_v4 embedder ./realm-cc-news-pretrained-embedder ./embedder
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from ..utils.io import load_safetensors, read_json
from .configuration_retriever import RetrieverEmbedderConfig
from .modeling_retriever import RetrieverEmbedder
from .reader import OpenQAReader

__all__ = [
    "EMBEDDER_PROJECTION",
    "READER_SPAN_SCORER",
    "convert_realm_v4_embedder",
    "convert_realm_v4_encoder",
    "convert_realm_v4_reader",
    "load_realm_v4_checkpoint",
    "main",
]

Tensors = dict[str, torch.Tensor]

# RetrieverTower parameter <- REALM RealmScorerProjection parameter (under the embedder's prefix).
EMBEDDER_PROJECTION: dict[str, str] = {
    "projection.weight": "cls.dense.weight",
    "projection.bias": "cls.dense.bias",
    "projection_norm.weight": "cls.LayerNorm.weight",
    "projection_norm.bias": "cls.LayerNorm.bias",
}
# OpenQAReader span-scorer parameter <- function of REALM's reader tensors and span_hidden_size. REALM adds a start
# projection of h_s and an end projection of h_e, both halves of one dense layer: its two bias halves add up, so
# the reader's start projection carries their sum and its end projection has no bias.
READER_SPAN_SCORER: dict[str, Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]] = {
    "start_projection.weight": lambda t, span: t["qa_outputs.dense_intermediate.weight"][:span],
    "start_projection.bias": lambda t, span: (
        t["qa_outputs.dense_intermediate.bias"][:span] + t["qa_outputs.dense_intermediate.bias"][span:]
    ),
    "end_projection.weight": lambda t, span: t["qa_outputs.dense_intermediate.weight"][span:],
    "span_norm.weight": lambda t, span: t["qa_outputs.layer_normalization.weight"],
    "span_norm.bias": lambda t, span: t["qa_outputs.layer_normalization.bias"],
    "span_output.weight": lambda t, span: t["qa_outputs.dense_output.weight"],
    "span_output.bias": lambda t, span: t["qa_outputs.dense_output.bias"],
}
_READER_SOURCES = (
    "qa_outputs.dense_intermediate.weight",
    "qa_outputs.dense_intermediate.bias",
    "qa_outputs.layer_normalization.weight",
    "qa_outputs.layer_normalization.bias",
    "qa_outputs.dense_output.weight",
    "qa_outputs.dense_output.bias",
)
# Buffers of v4's RealmEmbeddings that some checkpoints carry; recomputed, never weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)
# RealmConfig's defaults, for fields a config.json may omit (transformers writes only non-default values).
_REALM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "retriever_proj_size": 128,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu_new",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "span_hidden_size": 256,
    "max_span_width": 10,
    "reader_layer_norm_eps": 1e-3,
    "pad_token_id": 1,
}


def load_realm_v4_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], config: str | os.PathLike | Mapping | None = None
) -> tuple[Tensors, dict[str, Any]]:
    """(tensors, RealmConfig fields) of a v4 REALM checkpoint: a folder (config.json + pytorch_model.bin or
    model.safetensors), a weights file (config.json beside it), or a state dict with `config` given."""
    config_path: Path | None = None
    if isinstance(checkpoint, Mapping):
        state, source = dict(checkpoint), "the state dict given"
    else:
        path = Path(checkpoint)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not files:
                raise FileNotFoundError(
                    f"{path} holds neither model.safetensors nor pytorch_model.bin: give a downloaded google/realm-* "
                    "folder (huggingface_hub.snapshot_download) or the weights file."
                )
            path = files[0]
        if not path.is_file():
            raise FileNotFoundError(f"No REALM checkpoint at {path}.")
        source = str(path)
        # (a safetensors file cut short is named by load_safetensors)
        state = load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
        if (folder / "config.json").is_file():
            config_path = folder / "config.json"
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state dict of tensors.")
    if config is None and config_path is None:
        raise ValueError(
            f"No REALM config for {source}: the head count, activation and epsilons are not in the weights. Keep the "
            "checkpoint's config.json beside it, or pass config= (its path or its fields as a dict)."
        )
    if config is None or isinstance(config, (str, os.PathLike)):
        fields = read_json(Path(config or config_path))
    else:
        fields = dict(config)
    if fields.get("model_type", "realm") != "realm":
        raise ValueError(f"The config is for model_type {fields['model_type']!r}, not a REALM checkpoint ('realm').")
    return state, {**_REALM_DEFAULTS, **fields}


def convert_realm_v4_embedder(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: str | os.PathLike | Mapping | None = None,
    output_dir: str | os.PathLike | None = None,
) -> RetrieverEmbedder:
    """A v4 RealmEmbedder (or the embedder inside RealmScorer / RealmForOpenQA) as a `RetrieverEmbedder` whose
    `embed_queries` / `embed_documents` give REALM's 128-d embeddings; `output_dir` saves it (safetensors)."""
    state, fields = load_realm_v4_checkpoint(checkpoint, config)
    prefix = _find_prefix(state, ("", "embedder."), "cls.dense.weight", "embedder", "RealmEmbedder (cls.dense)")
    bert_config = _bert_config(fields, state, prefix + "realm.")
    projection = state[prefix + "cls.dense.weight"]
    embedder_config = RetrieverEmbedderConfig(
        encoder_config=bert_config,
        projection_dim=int(projection.shape[0]),
        pooling="pooler",
        shared=True,
        projection_layer_norm_eps=float(fields["layer_norm_eps"]),
    )
    model = RetrieverEmbedder(embedder_config)
    tensors = _bert_tensors(state, prefix + "realm.", model.query_tower.encoder, "query_tower.encoder.")
    _require(state, [prefix + k for k in EMBEDDER_PROJECTION.values()], "embedder projection")
    tensors.update({f"query_tower.{ours}": state[prefix + theirs] for ours, theirs in EMBEDDER_PROJECTION.items()})
    _load_exactly(model, tensors, "RetrieverEmbedder")
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def convert_realm_v4_reader(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: str | os.PathLike | Mapping | None = None,
    output_dir: str | os.PathLike | None = None,
) -> OpenQAReader:
    """A v4 RealmReader (or the reader inside RealmForOpenQA) as an `OpenQAReader`: a BertModel encoder and REALM's
    span scorer (`span_layer_norm_eps` set, max span width and span hidden size from the config)."""
    state, fields = load_realm_v4_checkpoint(checkpoint, config)
    prefix = _find_prefix(
        state, ("", "reader."), "qa_outputs.dense_intermediate.weight", "reader", "RealmReader (qa_outputs)"
    )
    _require(state, [prefix + k for k in _READER_SOURCES], "reader span scorer")
    span = int(state[prefix + "qa_outputs.dense_output.weight"].shape[1])
    if state[prefix + "qa_outputs.dense_intermediate.weight"].shape[0] != 2 * span:
        raise ValueError(
            "qa_outputs.dense_intermediate should map to 2 x span_hidden_size "
            f"({2 * span}) features, has {state[prefix + 'qa_outputs.dense_intermediate.weight'].shape[0]}."
        )
    bert_config = _bert_config(fields, state, prefix + "realm.")
    reader = OpenQAReader(
        BertModel(bert_config, add_pooling_layer=False),
        span_hidden_size=span,
        max_span_width=int(fields["max_span_width"]),
        span_layer_norm_eps=float(fields["reader_layer_norm_eps"]),
    )
    tensors = _bert_tensors(state, prefix + "realm.", reader.encoder, "encoder.")
    scorer = {k: v for k, v in state.items() if k.startswith(prefix + "qa_outputs.")}
    scorer = {k[len(prefix) :]: v for k, v in scorer.items()}
    tensors.update({ours: make(scorer, span).clone() for ours, make in READER_SPAN_SCORER.items()})
    _load_exactly(reader, tensors, "OpenQAReader")
    reader.eval()
    if output_dir is not None:
        reader.save_pretrained(output_dir)
    return reader


def convert_realm_v4_encoder(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: str | os.PathLike | Mapping | None = None,
    output_dir: str | os.PathLike | None = None,
) -> BertForMaskedLM:
    """A v4 RealmKnowledgeAugEncoder as a `BertForMaskedLM` (same logits): the knowledge-augmented MLM of
    `hf_kadapter.retrieval.realm`, or a base for K-Adapter / PELT."""
    state, fields = load_realm_v4_checkpoint(checkpoint, config)
    prefix = _find_prefix(
        state, ("",), "cls.predictions.transform.dense.weight", "encoder", "RealmKnowledgeAugEncoder (cls.predictions)"
    )
    bert_config = _bert_config(fields, state, prefix + "realm.")
    words = state[prefix + "realm.embeddings.word_embeddings.weight"]
    decoder = state.get(prefix + "cls.predictions.decoder.weight")
    bert_config.tie_word_embeddings = decoder is None or torch.equal(decoder, words)
    model = BertForMaskedLM(bert_config)
    tensors = _bert_tensors(state, prefix + "realm.", model.bert, "bert.")
    head = [
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    ]
    _require(state, [prefix + k for k in head], "masked-LM head")
    tensors.update({k: state[prefix + k] for k in head})
    tensors["cls.predictions.decoder.bias"] = state[prefix + "cls.predictions.bias"]
    tensors["cls.predictions.decoder.weight"] = words if decoder is None else decoder
    _load_exactly(model, tensors, "BertForMaskedLM")
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


# ----- helpers -----------------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """Tensors only (weights_only=True); memory-mapped when the file allows it: RealmForOpenQA's file also holds
    the 13M x 128 `block_emb` buffer, which no converter reads."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files in torch's legacy format cannot be memory-mapped: read them whole
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(error).__name__}: {error}); only "
            "plain tensor checkpoints are read."
        ) from error


def _find_prefix(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], key: str, kind: str, what: str) -> str:
    for prefix in prefixes:
        if prefix + key in state and prefix + "realm.embeddings.word_embeddings.weight" in state:
            return prefix
    others = {
        "embedder": "cls.dense.weight",
        "reader": "qa_outputs.dense_intermediate.weight",
        "encoder": "cls.predictions.transform.dense.weight",
    }
    found = [name for name, probe in others.items() if name != kind and any(k.endswith(probe) for k in state)]
    hint = f" It looks like a REALM {found[0]} checkpoint: use convert_realm_v4_{found[0]}." if found else ""
    raise ValueError(
        f"Not a v4 {what} state dict: no '{key}' next to 'realm.embeddings.*' (under prefixes {list(prefixes)}); "
        f"keys start with {sorted({k.split('.')[0] for k in state})[:8]}.{hint}"
    )


def _require(state: Mapping[str, torch.Tensor], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"The checkpoint lacks the {what} tensors {missing}: damaged, or another REALM model.")


def _bert_config(fields: dict[str, Any], state: Mapping[str, torch.Tensor], prefix: str) -> BertConfig:
    """The BERT config of REALM's encoder, checked against the tensors it must describe."""
    config = BertConfig(**{k: fields[k] for k in _BERT_FIELDS})
    words = state.get(prefix + "embeddings.word_embeddings.weight")
    layers = {int(k[len(prefix) :].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layer.")}
    intermediate = state.get(prefix + "encoder.layer.0.intermediate.dense.weight")
    found = {
        "vocab_size": None if words is None else words.shape[0],
        "hidden_size": None if words is None else words.shape[1],
        "num_hidden_layers": len(layers),
        "intermediate_size": None if intermediate is None else intermediate.shape[0],
        "max_position_embeddings": state[prefix + "embeddings.position_embeddings.weight"].shape[0]
        if prefix + "embeddings.position_embeddings.weight" in state
        else None,
        "type_vocab_size": state[prefix + "embeddings.token_type_embeddings.weight"].shape[0]
        if prefix + "embeddings.token_type_embeddings.weight" in state
        else None,
    }
    wrong = {k: (getattr(config, k), v) for k, v in found.items() if v != getattr(config, k)}
    if wrong:
        detail = ", ".join(f"{k}: config {c}, tensors {t}" for k, (c, t) in wrong.items())
        raise ValueError(f"The REALM config does not describe these weights ({detail}): give the checkpoint's config.")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}."
        )
    return config


def _bert_tensors(state: Mapping[str, torch.Tensor], prefix: str, target: torch.nn.Module, into: str) -> Tensors:
    """REALM's `realm.*` BERT tensors renamed for `target` (a BertModel) under `into`; a pooler only if it has one."""
    wanted = set(target.state_dict())
    source = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    source = {k: v for k, v in source.items() if k not in _BUFFERS and (k in wanted or not k.startswith("pooler."))}
    return {into + k: v for k, v in source.items()}


def _load_exactly(model: torch.nn.Module, tensors: Tensors, name: str) -> None:
    """Every weight of `model` from the checkpoint, and nothing left over."""
    expected = {k for k in model.state_dict() if not k.endswith(("position_ids", "token_type_ids"))}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The REALM checkpoint does not fill the {name} exactly: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]} (a damaged checkpoint, or the config's layer count does not match)."
        )
    model.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=False)


def main(argv: list[str] | None = None) -> torch.nn.Module:
    parser = argparse.ArgumentParser(
        prog="python -m hf_kadapter.retrieval.convert_realm_v4",
        description="Convert a transformers v4 REALM checkpoint (google/realm-*) into hf_kadapter: the embedder "
        "(RetrieverEmbedder), the reader (OpenQAReader) or the knowledge-augmented encoder (BertForMaskedLM).",
    )
    parser.add_argument("kind", choices=("embedder", "reader", "encoder"), help="which REALM model to convert")
    parser.add_argument("checkpoint", help="the checkpoint folder (config.json + weights) or weights file")
    parser.add_argument("output_dir", help="where to save the converted model")
    parser.add_argument("--config", help="the REALM config.json, when it is not beside the weights")
    args = parser.parse_args(argv)
    convert = {
        "embedder": convert_realm_v4_embedder,
        "reader": convert_realm_v4_reader,
        "encoder": convert_realm_v4_encoder,
    }[args.kind]
    model = convert(args.checkpoint, config=args.config, output_dir=args.output_dir)
    print(f"saved {type(model).__name__} converted from {args.checkpoint} to {args.output_dir}")
    return model


if __name__ == "__main__":
    main()

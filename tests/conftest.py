"""Tiny random BERT and RoBERTa bases (hidden 32, 4 layers) saved to local folders, as a Hub stand-in."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import hf_kadapter as hk

# Tiny models: one thread is faster than two fighting over a shared 2-core machine (and deterministic).
torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 32
LAYERS = 4

BASES = {
    "bert": (
        BertConfig,
        BertModel,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    ),
    "roberta": (
        RobertaConfig,
        RobertaModel,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=1,
        ),
    ),
}


def tiny_adapter(**overrides) -> hk.KnowledgeAdapterConfig:
    settings = dict(tap_layers=[0, 2, 3], hidden_size=16, num_attention_heads=2, intermediate_size=32)
    settings.update(overrides)
    return hk.KnowledgeAdapterConfig(**settings)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory) -> dict[str, str]:
    """One saved tiny base per architecture (seeded, so every test sees the same weights)."""
    dirs = {}
    for name, (config_class, model_class, kwargs) in BASES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"base-{name}")
        model_class(config_class(**kwargs), add_pooling_layer=False).save_pretrained(folder)
        dirs[name] = str(folder)
    return dirs


@pytest.fixture(params=sorted(BASES))
def base_dir(request, base_dirs) -> str:
    return base_dirs[request.param]


def batch(seed: int = 0, size: int = 3, length: int = 9, pad_last: int = 3) -> dict[str, torch.Tensor]:
    """Random ids (avoiding special ids 0-3) with the last example right-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (size, length), generator=generator)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    if pad_last:
        attention_mask[-1, -pad_last:] = 0
        input_ids[-1, -pad_last:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def make_model(base_dir: str, cls=None, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    cls = cls or hk.KAdapterModel
    config_kwargs.setdefault("adapters", {"factual": tiny_adapter()})
    return cls.from_base(base_dir, **config_kwargs).eval()

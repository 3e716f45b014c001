"""Tiny random BERT and RoBERTa bases (hidden 32, 4 layers) saved to local folders, as a Hub stand-in."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import string
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaModel

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


# ----- a character-level WordPiece tokenizer and tiny BERT configs (retrieval, PELT, Trainer runs) -------------------
CHARS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *string.ascii_lowercase,
    *[f"##{c}" for c in string.ascii_lowercase],
]
CHARS += [".", "?", "(", ")"]
DOCS = [("d0", "paris", "paris is in france."), ("d1", "rome", "rome is in italy."), ("d2", "oslo", "oslo is cold.")]


def char_tokenizer(folder: Path) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(CHARS) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def tiny_bert_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(CHARS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=96,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


class FakeHub:
    """A local stand-in for the Hub. The package calls the real APIs: `HfApi.create_repo` / `HfApi.upload_folder`
    land here and write a private HF cache laid out like the real one (models--owner--name/snapshots/<commit>/ and
    refs/main), which snapshot_download / hf_hub_download / transformers then read with HF_HUB_OFFLINE."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.commits: list[dict] = []
        self._counter = itertools.count()

    def repo_folder(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str) -> Path:
        folder = self.repo_folder(repo_id)
        return folder / "snapshots" / (folder / "refs" / "main").read_text()

    def create_repo(self, api: HfApi, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api: HfApi, *, repo_id: str, folder_path: str, commit_message: str | None = None, **kwargs):
        folder = self.repo_folder(repo_id)
        commit = hashlib.sha1(f"{repo_id}-{next(self._counter)}".encode()).hexdigest()
        if (folder / "refs" / "main").exists():  # like the Hub: files not in this upload stay
            shutil.copytree(self.snapshot(repo_id), folder / "snapshots" / commit)
        shutil.copytree(folder_path, folder / "snapshots" / commit, dirs_exist_ok=True)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{commit}"

    def card(self, repo_id: str) -> huggingface_hub.ModelCard:
        return huggingface_hub.ModelCard.load(self.snapshot(repo_id) / "README.md")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    """Uploads go to a private hub cache; loading by repo id then reads it offline (HF_HUB_OFFLINE)."""
    hub = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub

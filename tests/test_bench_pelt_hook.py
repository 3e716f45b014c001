"""The tokenizer-hook benchmark runs and writes its figures (a smoke test on a tiny grid: timings are never
asserted, they are the benchmark's output)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_hook_benchmark_writes_its_figures(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_pelt
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "hook.json"
    bench_pelt.main(
        ["--hook", "--hook-lengths", "100", "--hook-mentions", "0", "10", "--hook-budget", "0.002", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "pelt_tokenizer_hook" and "--hook" in figures["command"]
    assert {"machine", "torch_threads", "transformers", "tokenizers", "torch", "python"} <= set(figures)
    rows = figures["rows"]
    assert len(rows) == 4 and {r["mentions"] for r in rows} == {0, 10}  # 2 tokenizers x 2 mention counts
    for row in rows:
        assert row["hook_tokens"] >= row["plain_tokens"] + 3 * row["mentions"]  # a group is 3 tokens or more
        assert row["ratio"] == pytest.approx(row["hook_ms"] / row["plain_ms"]) and row["ratio"] > 0
    assert "worst ratio hook / plain" in printed and "command:" in printed

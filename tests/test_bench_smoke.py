"""The knowledge benchmark end to end on the real packaged weights (smoke mode: one seed, tiny sizes).

This is what `hf-kadapter bench --quick` runs, at a size CI affords: all-MiniLM-L6-v2 as the encoder, SPLADE-tiny as
the masked LM, the shipped WordNet suite. It catches a broken pipeline (a changed API, a crash on real weights),
not a regression in the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_kadapter.bench.models import default_encoder, default_mlm

ROOT = Path(__file__).resolve().parent.parent


def _models_installed() -> bool:
    try:
        default_encoder()
        default_mlm()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _models_installed(), reason="pip install -e '.[bench]' (the packaged models)")


def run_cli(*args: str, output: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "hf_kadapter.cli", "bench", "--smoke", "--output-dir", str(output), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_benchmark_runs_end_to_end_and_resumes(tmp_path):
    output = tmp_path / "bench"
    first = run_cli(output=output)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| method | comparison |" in first.stdout and "difference [95% CI]" in first.stdout

    results = json.loads((output / "results.json").read_text())
    assert results["run"]["mode"] == "smoke" and results["run"]["seeds"] == [0]
    assert results["models"]["encoder"].endswith("model") and results["models"]["mlm"].endswith("model")
    assert results["data"]["checksum"].startswith("sha256:")
    assert results["machine"]["versions"]["torch"] and results["machine"]["cpu_count"]
    assert set(results["methods"]) == {"kadapter", "pelt", "realm", "composed"}
    for method, result in results["methods"].items():
        assert results["wall_seconds"][method] > 0 and result["phases_seconds"]
        for metric, by_condition in result["metrics"].items():
            for condition, summary in by_condition.items():
                assert set(summary) >= {"per_seed", "mean", "std", "n_examples"}, (method, metric, condition)
                assert list(summary["per_seed"]) == ["0"]
        claims = [g for g in result["gains"] if g["kind"] == "gain"]
        assert claims and all({"baseline", "ci_low", "ci_high", "verdict"} <= set(g) for g in claims)
    kadapter = results["methods"]["kadapter"]["metrics"]
    assert set(kadapter["coarse_accuracy"]) == {"head_only", "fresh_adapter", "pretrained_adapter", "shuffled_adapter"}
    assert set(results["methods"]["pelt"]["metrics"]["coarse_accuracy"]) == {
        "name_only", "mask_slot", "shuffled_table", "pelt_slot"
    }  # fmt: skip
    assert set(results["methods"]["composed"]["metrics"]["coarse_accuracy"]) == {
        "kadapter", "kadapter_shuffled_table", "kadapter_pelt"
    }  # fmt: skip
    realm = results["methods"]["realm"]["metrics"]
    assert set(realm["statement_recall@5"]) == {"untrained", "refreshed", "stale"}
    assert set(realm["qa_exact_match"]) == {"closed_book_reader", "reader_untrained_retriever", "reader_trained_retriever"}
    assert "## Gains and controls" in (output / "results.md").read_text()
    assert {"kadapter_conditions.png", "pelt_conditions.png", "realm_recall_at_k.png"} <= set(results["plots"])
    assert all((output / name).stat().st_size > 1000 for name in results["plots"])

    # A rerun resumes: every unit of work is read back, none is recomputed.
    units = sorted((output / "work").rglob("units/*.json"))
    stamps = {path: path.stat().st_mtime_ns for path in units}
    second = run_cli(output=output)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in units} == stamps
    again = json.loads((output / "results.json").read_text())
    assert again["methods"]["pelt"]["metrics"] == results["methods"]["pelt"]["metrics"]
    # ... and the report says so: this invocation's wall time covers none of the work, the units' own times do.
    for method in results["methods"]:
        first_units, second_units = results["methods"][method]["units"], again["methods"][method]["units"]
        assert first_units["computed"] > 0 and first_units["resumed"] == 0, method
        assert second_units == {"computed": 0, "resumed": first_units["computed"], "resumed_without_timing": 0,
                                "resumed_seconds": second_units["resumed_seconds"]}, method  # fmt: skip
        assert second_units["resumed_seconds"] > 0
    assert "read back from an earlier one" in (output / "results.md").read_text()

    # Another setting in the same folder is refused, naming the fix, instead of mixing runs.
    other = run_cli("--methods", "pelt", "--set", "pelt.epochs=3", output=output)
    assert other.returncode != 0 and "another --output-dir" in other.stderr

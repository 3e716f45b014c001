"""The benchmark's statistics: reducers, paired bootstrap intervals, verdicts of gains and controls."""

from __future__ import annotations

import numpy as np
import pytest

from hf_kadapter.bench.core import ExperimentResult, GainSpec
from hf_kadapter.bench.stats import MetricRuns, micro_f1_metric, paired_bootstrap


def runs(scores_by_seed: dict[int, list[float]]) -> MetricRuns:
    metric = MetricRuns()
    for seed, scores in scores_by_seed.items():
        metric.add(seed, score=scores)
    return metric


def test_micro_f1_from_per_example_counts():
    columns = {"tp": np.array([1, 0, 2]), "fp": np.array([0, 1, 1]), "fn": np.array([1, 1, 0])}
    assert micro_f1_metric(columns) == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    metric = MetricRuns(reducer="micro_f1")
    metric.add(0, **columns)
    assert metric.value(0) == pytest.approx(0.6) and metric.value(0, rows=np.array([2])) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="different lengths"):
        metric.add(1, tp=[1, 2], fp=[0], fn=[0, 0])


def test_a_real_difference_is_found_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    base = {s: (rng.random(400) < 0.6).astype(float).tolist() for s in range(3)}
    better = {s: [max(v, float(rng.random() < 0.3)) for v in base[s]] for s in range(3)}  # ~+12 points, paired
    gain = paired_bootstrap(runs(better), runs(base), replicates=500)
    assert gain["ci_low"] > 0.05 and gain["excludes_zero"] and gain["seeds"] == 3 and gain["examples"] == 400
    same = paired_bootstrap(runs(base), runs(base), replicates=200)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0 and not same["excludes_zero"]
    noise = {s: (rng.random(400) < 0.6).astype(float).tolist() for s in range(3)}
    independent = paired_bootstrap(runs(noise), runs(base), replicates=500)
    assert independent["ci_low"] < 0 < independent["ci_high"]


def test_pairing_needs_shared_seeds_and_examples():
    with pytest.raises(ValueError, match="No seed is shared"):
        paired_bootstrap(runs({0: [1.0]}), runs({1: [1.0]}))
    with pytest.raises(ValueError, match="different numbers of examples"):
        paired_bootstrap(runs({0: [1.0, 0.0]}), runs({0: [1.0]}))


def test_verdicts_of_gains_controls_and_lower_is_better_metrics():
    result = ExperimentResult(method="m", description="d")
    for seed in range(3):
        result.runs("acc", "method").add(seed, score=[1.0] * 50 + [0.0] * 50)
        result.runs("acc", "control").add(seed, score=[0.0] * 100)
        result.runs("acc", "base").add(seed, score=[0.0] * 100)
        result.runs("nll", "method", higher_is_better=False).add(seed, score=[1.0] * 100)
        result.runs("nll", "base", higher_is_better=False).add(seed, score=[2.0] * 100)
    result.gains = [
        GainSpec("method − base", "method", "base", "acc"),
        GainSpec("control − base", "control", "base", "acc", kind="control"),
        GainSpec("method − control (flagged if a control)", "method", "control", "acc", kind="control"),
        GainSpec("nll", "method", "base", "nll"),
        GainSpec("missing condition is skipped", "method", "absent", "acc"),
    ]
    verdicts = {g["name"]: g["verdict"] for g in result.to_json(replicates=100)["gains"]}
    assert verdicts == {
        "method − base": "gain",
        "control − base": "ok",
        "method − control (flagged if a control)": "flagged: control differs from its baseline",
        "nll": "gain",
    }

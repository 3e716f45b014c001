"""Statistics of the knowledge benchmark: per-example scores, seeds, paired differences, bootstrap intervals.

Every condition of an experiment is run with the same seeds on the same test examples, and keeps per-example
scores (not only the aggregate), so a gain is estimated PAIRED: for each bootstrap replicate the seeds and the
test examples are resampled once and both conditions are scored on that same resample. The interval thus covers
both sources of noise, the run (seed) and the finite test set, without pretending they are independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def mean_metric(columns: Mapping[str, np.ndarray]) -> float:
    """The mean of the per-example `score` column (accuracy, exact match, recall@k, NLL ...)."""
    return float(np.mean(columns["score"])) if len(columns["score"]) else float("nan")


def micro_f1_metric(columns: Mapping[str, np.ndarray]) -> float:
    """Micro F1 from per-example true positive / false positive / false negative counts."""
    tp, fp, fn = (float(np.sum(columns[k])) for k in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


REDUCERS: dict[str, Callable[[Mapping[str, np.ndarray]], float]] = {"mean": mean_metric, "micro_f1": micro_f1_metric}


@dataclass
class MetricRuns:
    """One metric of one condition: per seed, the per-example columns the metric is reduced from."""

    reducer: str = "mean"
    higher_is_better: bool = True
    runs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, seed: int, **columns: Sequence[float]) -> None:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"per-example columns of different lengths: { {k: len(a) for k, a in arrays.items()} }")
        self.runs[int(seed)] = arrays

    def value(self, seed: int, rows: np.ndarray | None = None) -> float:
        columns = self.runs[seed]
        if rows is not None:
            columns = {k: a[rows] for k, a in columns.items()}
        return REDUCERS[self.reducer](columns)

    def values(self) -> dict[int, float]:
        return {seed: self.value(seed) for seed in sorted(self.runs)}

    def summary(self) -> dict[str, Any]:
        per_seed = self.values()
        values = np.array(list(per_seed.values()))
        return {
            "per_seed": {str(s): v for s, v in per_seed.items()},
            "mean": float(values.mean()) if len(values) else float("nan"),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n_examples": int(len(next(iter(self.runs.values()))["score" if self.reducer == "mean" else "tp"]))
            if self.runs
            else 0,
        }


def paired_bootstrap(
    treatment: MetricRuns,
    baseline: MetricRuns,
    *,
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean paired difference treatment − baseline over the shared seeds, with a hierarchical bootstrap interval
    (seeds and test examples resampled together in each replicate)."""
    seeds = sorted(set(treatment.runs) & set(baseline.runs))
    if not seeds:
        raise ValueError("No seed is shared by the two conditions: they cannot be paired.")
    n = {len(next(iter(treatment.runs[s].values()))) for s in seeds} | {
        len(next(iter(baseline.runs[s].values()))) for s in seeds
    }
    if len(n) != 1:
        raise ValueError(f"The conditions were scored on different numbers of examples {sorted(n)}: not paired.")
    examples = n.pop()
    differences = np.array([treatment.value(s) - baseline.value(s) for s in seeds])
    rng = np.random.default_rng(seed)
    samples = np.empty(replicates)
    for b in range(replicates):
        chosen = rng.choice(seeds, size=len(seeds), replace=True)
        rows = rng.integers(0, examples, size=examples)
        samples[b] = np.mean([treatment.value(int(s), rows) - baseline.value(int(s), rows) for s in chosen])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return {
        "difference": float(differences.mean()),
        "per_seed": {str(s): float(d) for s, d in zip(seeds, differences, strict=True)},
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "excludes_zero": bool(low > 0 or high < 0),
        "replicates": replicates,
        "seeds": len(seeds),
        "examples": examples,
    }


def fmt_mean_std(summary: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = summary["mean"], summary["std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def fmt_ci(gain: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    return (
        f"{gain['difference'] * scale:+.{digits}f} "
        f"[{gain['ci_low'] * scale:+.{digits}f}, {gain['ci_high'] * scale:+.{digits}f}]"
    )


__all__ = ["MetricRuns", "REDUCERS", "fmt_ci", "fmt_mean_std", "mean_metric", "micro_f1_metric", "paired_bootstrap"]

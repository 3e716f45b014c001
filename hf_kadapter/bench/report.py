"""The benchmark's outputs: results.json (everything), results.md (the tables) and plots (*.png)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .stats import fmt_ci, fmt_mean_std

# Metrics kept on a 0..1 scale are shown in percent; NLL as is.
_RAW_METRICS = ("masked_entity_nll",)


def _scale(metric: str) -> float:
    return 1.0 if metric in _RAW_METRICS else 100.0


def gain_table(results: dict[str, Any], kinds: tuple[str, ...] = ("gain", "control", "info")) -> list[str]:
    """Markdown rows: each gain with its paired difference, 95% CI and verdict."""
    lines = [
        "| method | comparison | metric | difference [95% CI] | seeds | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for method, result in results["methods"].items():
        for gain in result["gains"]:
            if gain["kind"] not in kinds:
                continue
            scale = _scale(gain["metric"])
            lines.append(
                f"| {method} | {gain['treatment']} − {gain['baseline']} | {gain['metric']} | "
                f"{fmt_ci(gain, scale=scale, digits=2 if scale == 1.0 else 1)} | {gain['seeds']} | "
                f"{gain['verdict']} |"
            )
    return lines


def metric_table(result: dict[str, Any]) -> list[str]:
    metrics = list(result["metrics"])
    conditions = list(dict.fromkeys(c for m in metrics for c in result["metrics"][m]))
    lines = ["| condition | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for condition in conditions:
        cells = []
        for metric in metrics:
            summary = result["metrics"][metric].get(condition)
            scale = _scale(metric)
            cells.append("" if summary is None else fmt_mean_std(summary, scale=scale, digits=2 if scale == 1 else 1))
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    run = results["run"]
    lines = [
        "# hf_kadapter knowledge benchmark",
        "",
        f"Mode `{run['mode']}`, seeds {run['seeds']}, evaluated on the `{run['eval_split']}` split of the WordNet suite "
        f"{results['data']['suite_version']} (`{results['data']['checksum'][:19]}…`).",
        f"Command: `{run['command']}`",
        f"Machine: {results['machine']['summary']}; wall time {results['wall_seconds']['total']:.0f} s.",
        "",
        "Metrics in percent (mean ± std over seeds) except NLL; a difference is paired by seed, with a 95% bootstrap "
        "interval over seeds and test examples. A gain is claimed only when its interval excludes zero; a control "
        "must include zero.",
        "",
        "## Gains and controls",
        "",
        *gain_table(results),
        "",
    ]
    for method, result in results["methods"].items():
        lines += [f"## {method}: {result['description']}", ""]
        lines += [f"- `{name}`: {what}" for name, what in result["conditions"].items()]
        lines += [""] + metric_table(result) + [""]
        lines += [f"- `{metric}`: {note}" for metric, note in result["metric_notes"].items()]
        if result["notes"]:
            lines += [""] + [f"- {note}" for note in result["notes"]]
        lines += ["", f"Data: {_inline(result['data'])}", ""]
        lines += [f"Phases (s): {_inline(result['phases_seconds'])}", ""]
        units = result.get("units")
        if units and units["resumed"]:
            untimed = units["resumed_without_timing"]
            timed = units["resumed"] - untimed
            earlier = ", ".join(
                ([f"{timed} took {units['resumed_seconds']:.0f} s when computed"] if timed else [])
                + ([f"{untimed} stored before unit times were recorded"] if untimed else [])
            )
            lines += [f"Units of work: {units['computed']} computed in this invocation, {units['resumed']} read back "
                      f"from an earlier one ({earlier}); the phase times above cover this invocation only.", ""]  # fmt: skip
    return "\n".join(lines)


def _inline(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
MAIN_METRICS = {
    "kadapter": ("coarse_accuracy", "name_coarse_accuracy", "type_micro_f1"),
    "pelt": ("coarse_accuracy", "type_micro_f1"),
    "composed": ("coarse_accuracy", "type_micro_f1"),
    "realm": ("masked_entity_accuracy", "statement_recall@5", "qa_exact_match"),
}


def _tick(condition: str) -> str:
    """A bar's label, one word per line (a "[paper]" suffix on its own line), so that neighbours never overlap."""
    name, _, variant = condition.partition("[")
    return "\n".join([*name.split("_"), *([f"[{variant}"] if variant else [])])


def plot(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """Per-condition bars with error bars per method, training curves and REALM's recall@k; returns the files."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    written = []
    for method, result in results["methods"].items():
        metrics = [m for m in MAIN_METRICS.get(method, ()) if m in result["metrics"]]
        if metrics:
            figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
            for axis, metric in zip(axes[0], metrics, strict=True):
                by_condition = result["metrics"][metric]
                names = list(by_condition)
                means = [by_condition[n]["mean"] * _scale(metric) for n in names]
                stds = [by_condition[n]["std"] * _scale(metric) for n in names]
                axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4C72B0")
                for i, n in enumerate(names):
                    values = [v * _scale(metric) for v in by_condition[n]["per_seed"].values()]
                    axis.scatter([i] * len(values), values, color="black", s=8, zorder=3)
                axis.set_xticks(range(len(names)), [_tick(n) for n in names], fontsize=7)
                axis.set_title(metric, fontsize=9)
                finite = [m for m in means if not math.isnan(m)]
                if finite:
                    low = min(m - s for m, s in zip(means, stds, strict=True) if not math.isnan(m))
                    axis.set_ylim(max(0.0, low - 5), max(finite) + max(stds) + 3)
            figure.suptitle(f"{method}: mean ± std over seeds (dots: seeds)", fontsize=10)
            figure.tight_layout()
            path = output_dir / f"{method}_conditions.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
        curves = {k: v for k, v in result["curves"].items() if k.endswith("_loss")}
        if curves:
            figure, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
            for axis, (name, by_condition) in zip(axes[0], curves.items(), strict=True):
                for index, (condition, by_seed) in enumerate(by_condition.items()):
                    for seed_index, points in enumerate(by_seed.values()):
                        if points:
                            xs, ys = zip(*points, strict=True)
                            axis.plot(xs, ys, color=f"C{index}", alpha=0.8, lw=1,
                                      label=condition if seed_index == 0 else None)  # fmt: skip
                axis.set_title(name.replace("_", " "), fontsize=9)
                axis.set_xlabel("step")
                axis.legend(fontsize=7)
            figure.tight_layout()
            path = output_dir / f"{method}_training_curves.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
        recall = result["curves"].get("recall_at_k")
        if recall:
            figure, axis = plt.subplots(figsize=(4.5, 3.4))
            for index, (condition, by_seed) in enumerate(recall.items()):
                ks = sorted({int(k) for curve in by_seed.values() for k in curve})
                means = [sum(curve[str(k)] for curve in by_seed.values()) / len(by_seed) * 100 for k in ks]
                axis.plot(ks, means, marker="o", color=f"C{index}", label=condition)
            axis.set_xlabel("k")
            axis.set_ylabel("statement recall@k (%)")
            axis.set_xscale("log")
            axis.set_xticks(ks, [str(k) for k in ks])  # the k measured, not powers of ten
            axis.legend(fontsize=7)
            figure.tight_layout()
            path = output_dir / f"{method}_recall_at_k.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    return written


__all__ = ["gain_table", "markdown", "metric_table", "plot"]

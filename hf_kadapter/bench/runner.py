"""Running the knowledge benchmark: modes, the run folder, the environment record, the printed gain table.

`run_benchmark("quick")` runs the three methods' experiments on the packaged WordNet suite and the packaged small
models, writes `results.json`, `results.md` and plots into the output folder and returns the results. Every unit of
work is stored as it finishes, so an interrupted run resumes (a rerun of a finished one only re-reports).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..utils.io import write_json_atomic
from .compose_exp import ComposeSettings, run_compose
from .core import quiet_transformers
from .kadapter_exp import KAdapterSettings, run_kadapter
from .models import resolve
from .pelt_exp import PELTSettings, run_pelt
from .realm_exp import RealmSettings, run_realm
from .report import gain_table, markdown, plot
from .wordnet import SUITE_DIR, suite_checksum, suite_manifest

METHODS = ("kadapter", "pelt", "realm", "composed")
MODES = ("smoke", "quick", "full")
DEFAULT_SEEDS = {"smoke": 1, "quick": 3, "full": 5}

# Per mode, the settings that differ from each experiment's defaults (the full mode uses the whole suite).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "kadapter": dict(fact_limit=160, typing_train_limit=160, typing_test_limit=120, adapter_hidden=32,
                         adapter_layers=1, adapter_heads=2, max_length=48, pretrain_epochs=1.0, head_epochs=2.0),
        "pelt": dict(train_limit=160, eval_limit=80, max_occurrences=2, epochs=1.0, batch_size=32),
        "realm": dict(num_documents=200, train_limit=48, eval_limit=32, k=2, steps=6, refresh_every=3,
                      doc_max_length=32, reader_k=2, reader_epochs=1.0),
        "composed": dict(fact_limit=120, train_limit=120, eval_limit=60, max_occurrences=2, adapter_hidden=16,
                         pretrain_epochs=1.0, head_epochs=1.0),
    },
    "quick": {
        "kadapter": dict(fact_limit=800, typing_train_limit=1500, typing_test_limit=1000, adapter_hidden=128,
                         adapter_layers=1, adapter_heads=4, max_length=48, pretrain_epochs=2.0, head_epochs=5.0,
                         head_batch=64),
        "pelt": dict(train_limit=1500, eval_limit=None, max_occurrences=8),
        "realm": dict(num_documents=800, train_limit=400, eval_limit=150, k=3, batch_size=4, steps=36,
                      refresh_every=12, doc_max_length=32, reader_k=3, reader_epochs=1.0),
        "composed": dict(fact_limit=1200, train_limit=1000, max_occurrences=8, head_epochs=5.0),
    },
    "full": {
        "kadapter": dict(adapter_hidden=128, adapter_layers=1, adapter_heads=4, pretrain_epochs=3.0, head_epochs=10.0,
                         head_batch=64, paper_regime_seeds=3, paper_train_limit=1500),
        "pelt": dict(max_occurrences=32),
        "realm": dict(num_documents=2000, train_limit=2000, k=3, batch_size=8, steps=80, refresh_every=20,
                      reader_k=4, reader_epochs=2.0),
        "composed": dict(pretrain_epochs=3.0, max_occurrences=32),
    },
}  # fmt: skip


def environment() -> dict[str, Any]:
    """Machine, threads and versions: what a reader needs to compare a run with theirs."""
    versions = {}
    for package in ("hf_kadapter", "torch", "transformers", "datasets", "peft", "accelerate", "faiss-cpu", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cores = os.cpu_count()
    summary = f"{platform.machine()} {platform.processor() or ''} {cores} CPU cores".strip()
    if torch.cuda.is_available():
        summary += f", {torch.cuda.get_device_name(0)}"
    return {
        "summary": summary,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": cores,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def settings_for(
    method: str, mode: str, seeds: list[int], encoder: str, mlm: str, eval_split: str, overrides: dict[str, Any]
) -> Any:
    preset = dict(PRESETS[mode][method])
    preset.update(overrides.get(method, {}))
    preset.update(seeds=seeds, eval_split=eval_split)
    if method == "kadapter":
        return KAdapterSettings(encoder=encoder, **preset)
    if method == "pelt":
        return PELTSettings(mlm=mlm, **preset)
    if method == "composed":
        return ComposeSettings(mlm=mlm, **preset)
    return RealmSettings(encoder=encoder, mlm=mlm, **preset)


RUNNERS: dict[str, Callable[..., Any]] = {
    "kadapter": run_kadapter, "pelt": run_pelt, "realm": run_realm, "composed": run_compose,
}  # fmt: skip


def run_benchmark(
    mode: str = "quick",
    *,
    methods: Sequence[str] = METHODS,
    seeds: int | None = None,
    output_dir: str | os.PathLike = "hf-kadapter-bench",
    encoder: str | None = None,
    mlm: str | None = None,
    eval_split: str = "test",
    suite_dir: str | os.PathLike = SUITE_DIR,
    overrides: dict[str, dict[str, Any]] | None = None,
    command: str | None = None,
    progress: Callable[[str], None] = print,
    replicates: int = 2000,
) -> dict[str, Any]:
    """Run the benchmark and write results.json, results.md and plots into `output_dir`; returns the results.

    `mode`: "smoke" (one seed, tiny sizes: checks the pipeline), "quick" (3 seeds, minutes) or "full" (5 seeds, the
    whole suite). `eval_split="dev"` is for development: tune there, never on the test split.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)}: choose among {METHODS}.")
    if eval_split not in ("dev", "test"):
        raise ValueError(f"eval_split={eval_split!r}: use 'test' (reported) or 'dev' (development).")
    count = DEFAULT_SEEDS[mode] if seeds is None else seeds
    if count < 1:
        raise ValueError(f"seeds={count}: at least one seed is needed.")
    seed_list = list(range(count))
    encoder = resolve(encoder, "encoder") if "kadapter" in methods or "realm" in methods else (encoder or "")
    mlm = resolve(mlm, "mlm") if {"pelt", "realm", "composed"} & set(methods) else (mlm or "")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    suite_dir = Path(suite_dir)
    results: dict[str, Any] = {
        "run": {
            "mode": mode,
            "methods": list(methods),
            "seeds": seed_list,
            "eval_split": eval_split,
            "command": command or " ".join(shlex.quote(a) for a in sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "machine": environment(),
        "models": {"encoder": encoder, "mlm": mlm},
        "data": {
            "suite": "WordNet knowledge suite",
            "suite_version": suite_manifest(suite_dir)["version"],
            "checksum": suite_checksum(suite_dir),
        },
        "settings": {},
        "methods": {},
        "wall_seconds": {},
    }
    with quiet_transformers():
        for method in methods:
            settings = settings_for(method, mode, seed_list, encoder, mlm, eval_split, overrides or {})
            results["settings"][method] = dataclasses.asdict(settings)
            progress(f"[{method}] {mode} mode, seeds {seed_list}")
            began = time.perf_counter()
            result = RUNNERS[method](settings, suite_dir, output / "work" / method, progress=progress)
            results["methods"][method] = result.to_json(replicates=replicates)
            results["wall_seconds"][method] = round(time.perf_counter() - began, 1)
            progress(f"[{method}] done in {results['wall_seconds'][method]:.0f} s")
    results["wall_seconds"]["total"] = round(time.perf_counter() - started, 1)
    write_json_atomic(output / "results.json", results)
    (output / "results.md").write_text(markdown(results) + "\n", encoding="utf-8")
    results["plots"] = [p.name for p in plot(results, output)]
    write_json_atomic(output / "results.json", results)
    return results


def print_summary(results: dict[str, Any], output_dir: str | os.PathLike, stream: Any = None) -> None:
    stream = stream or sys.stdout
    print("", file=stream)
    print("\n".join(gain_table(results, kinds=("gain", "control"))), file=stream)
    print(
        f"\nWall time {results['wall_seconds']['total']:.0f} s. Results: {Path(output_dir) / 'results.json'}, "
        f"{Path(output_dir) / 'results.md'}" + (f", plots: {', '.join(results['plots'])}" if results["plots"] else
                                                " (no plots: pip install matplotlib)"),
        file=stream,
    )  # fmt: skip


def load_results(output_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(output_dir) / "results.json").read_text(encoding="utf-8"))


__all__ = ["METHODS", "MODES", "PRESETS", "environment", "load_results", "print_summary", "run_benchmark"]

"""What every experiment of the knowledge benchmark shares: its result, resumable units of work, small Trainer runs.

An experiment is a set of CONDITIONS (the method and its no-knowledge controls) run with the same seeds and scored
per example on the same test set; its GAINS name which condition is compared with which. Each unit of work (a
pretraining run, one condition at one seed) stores its outcome as JSON under the run folder, so an interrupted
benchmark resumes where it stopped and a finished one is only re-reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import write_json_atomic
from .stats import MetricRuns, paired_bootstrap

logger = logging.getLogger(__name__)


@dataclass
class GainSpec:
    """`treatment` − `baseline` on `metric`. kind "gain": a claim of the method (its CI must exclude zero to be
    claimed); kind "control": a control against its plain baseline (its CI must include zero, or it is flagged);
    kind "info": a difference worth reporting that is neither."""

    name: str
    treatment: str
    baseline: str
    metric: str
    kind: str = "gain"


@dataclass
class ExperimentResult:
    method: str
    description: str
    conditions: dict[str, str] = field(default_factory=dict)  # name -> what it is
    metrics: dict[str, dict[str, MetricRuns]] = field(default_factory=dict)  # metric -> condition -> runs
    metric_notes: dict[str, str] = field(default_factory=dict)
    gains: list[GainSpec] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)  # for plots: training losses, recall@k ...
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    data: dict[str, Any] = field(default_factory=dict)  # sizes and provenance
    notes: list[str] = field(default_factory=list)
    units: UnitStore | None = None  # the experiment's stored units: the report says how many were resumed

    def runs(self, metric: str, condition: str, reducer: str = "mean", higher_is_better: bool = True) -> MetricRuns:
        by_condition = self.metrics.setdefault(metric, {})
        if condition not in by_condition:
            by_condition[condition] = MetricRuns(reducer=reducer, higher_is_better=higher_is_better)
        return by_condition[condition]

    def add_typing_scores(
        self,
        condition: str,
        seed: int,
        logits: np.ndarray,
        gold: np.ndarray,
        coarse_ids: np.ndarray,
        gold_coarse: np.ndarray,
        prefix: str = "",
    ) -> np.ndarray:
        """Score multi-label typing logits [N, types] against `gold` [N, types] (bool): `{prefix}coarse_accuracy`
        (the argmax over the coarse types `coarse_ids` equals `gold_coarse`) and `{prefix}type_micro_f1` (logit > 0).
        Returns the per-example coarse correctness, for subsets and progress lines."""
        correct = (coarse_ids[logits[:, coarse_ids].argmax(-1)] == gold_coarse).astype(float)
        predicted = logits > 0
        self.runs(f"{prefix}coarse_accuracy", condition).add(seed, score=correct)
        self.runs(f"{prefix}type_micro_f1", condition, reducer="micro_f1").add(
            seed, tp=(predicted & gold).sum(-1), fp=(predicted & ~gold).sum(-1), fn=(~predicted & gold).sum(-1)
        )
        return correct

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def to_json(self, replicates: int = 2000) -> dict[str, Any]:
        metrics = {
            metric: {condition: runs.summary() for condition, runs in by_condition.items()}
            for metric, by_condition in self.metrics.items()
        }
        gains = []
        for spec in self.gains:
            by_condition = self.metrics.get(spec.metric, {})
            if spec.treatment not in by_condition or spec.baseline not in by_condition:
                continue
            treatment, baseline = by_condition[spec.treatment], by_condition[spec.baseline]
            result = paired_bootstrap(treatment, baseline, replicates=replicates)
            if not treatment.higher_is_better:
                result["note"] = "lower is better: a negative difference is an improvement"
            if spec.kind == "gain":
                improves = result["ci_low"] > 0 if treatment.higher_is_better else result["ci_high"] < 0
                result["verdict"] = "gain" if improves else ("loss" if result["excludes_zero"] else "no gain")
            elif spec.kind == "control":
                result["verdict"] = "flagged: control differs from its baseline" if result["excludes_zero"] else "ok"
            else:
                result["verdict"] = "differs" if result["excludes_zero"] else "no difference"
            gains.append({"name": spec.name, "kind": spec.kind, "treatment": spec.treatment,
                          "baseline": spec.baseline, "metric": spec.metric, **result})  # fmt: skip
        return {
            "method": self.method,
            "description": self.description,
            "conditions": self.conditions,
            "metrics": metrics,
            "metric_notes": self.metric_notes,
            "gains": gains,
            "curves": self.curves,
            "phases_seconds": {k: round(v, 2) for k, v in self.phases.items()},
            "units": self.units.summary() if self.units is not None else None,
            "data": self.data,
            "notes": self.notes,
        }


class UnitStore:
    """Finished units of work as JSON files: `get_or_run(name, fn)` runs fn once and reads it back on later runs."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        marker = self.folder / "settings.json"
        if marker.is_file():
            previous = json.loads(marker.read_text(encoding="utf-8"))
            if previous != fingerprint:
                changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{self.folder} holds units of a run with other settings (changed: {changed}). Use another "
                    "--output-dir, or delete that folder to start over."
                )
        else:
            write_json_atomic(marker, fingerprint, sort_keys=True)

        # What this invocation computed and what it read back: a resumed run's wall time covers only the former, so
        # the report says how much was resumed and what those units cost when they ran (`unit_seconds.json`).
        self.timings_path = self.folder / "unit_seconds.json"
        self.timings = json.loads(self.timings_path.read_text(encoding="utf-8")) if self.timings_path.is_file() else {}
        self.computed: list[str] = []
        self.resumed: list[str] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{name.replace('/', '__')}.json"

    def get_or_run(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.path(name)
        if path.is_file():
            self.resumed.append(name)
            return json.loads(path.read_text(encoding="utf-8"))
        started = time.perf_counter()
        value = run()
        write_json_atomic(path, value)
        self.timings[name] = round(time.perf_counter() - started, 2)
        write_json_atomic(self.timings_path, self.timings, sort_keys=True)
        self.computed.append(name)
        return value

    def summary(self) -> dict[str, Any]:
        """Units computed now and read back; `resumed_seconds` sums what the read-back units took when they ran
        (units stored before timings were recorded count as unknown)."""
        known = [self.timings[name] for name in self.resumed if name in self.timings]
        return {
            "computed": len(self.computed),
            "resumed": len(self.resumed),
            "resumed_seconds": round(sum(known), 1),
            "resumed_without_timing": len(self.resumed) - len(known),
        }


def seed_everything(seed: int) -> None:
    from transformers import set_seed  # noqa: PLC0415

    set_seed(seed)


def train_small(
    model: torch.nn.Module,
    train_dataset: Any,
    collator: Callable,
    *,
    output_dir: str | os.PathLike,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    max_steps: int = -1,
    callbacks: list[Any] | None = None,
) -> list[tuple[int, float]]:
    """Train with the standard Trainer (no checkpoints, no reporting) and return the logged (step, loss) curve."""
    from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: PLC0415

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,
        lr_scheduler_type="linear",
        max_steps=max_steps,
        logging_steps=max(1, (max_steps if max_steps > 0 else int(len(train_dataset) * epochs / batch_size)) // 20),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, callbacks=callbacks or None
    )
    trainer.remove_callback(PrinterCallback)  # the benchmark reports its own progress
    trainer.train()
    return [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module, dataset: Any, collator: Callable, batch_size: int, output: Callable[[Any], torch.Tensor]
) -> np.ndarray:
    """Run `model` in eval mode over `dataset` in order and stack `output(model_output)` per example."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows)
            batch.pop("labels", None)
            parts.append(output(model(**batch)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0,))


class LinearProbe(torch.nn.Module):
    """A multi-label linear probe over frozen features (what a frozen model's representation makes readable)."""

    def __init__(self, in_features: int, num_labels: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.linear(features)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return {"loss": loss, "logits": logits}

    @staticmethod
    def rows(features: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{"features": features[i], "labels": labels[i]} for i in range(len(labels))]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self(features)["logits"]


@torch.no_grad()
def encode_frozen(model: torch.nn.Module, rows: list[dict[str, Any]], collate: Callable, batch_size: int = 256):
    """[N, 2H] features of a frozen model: its last hidden state at [CLS] and mean-pooled over the real tokens."""
    model.eval()
    parts = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        batch.pop("labels", None)
        out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        parts.append(torch.cat([hidden[:, 0], mean], dim=-1).float())
    return torch.cat(parts)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """The benchmark prints its own progress: transformers' per-run banners and datasets' bars would drown it. The
    caller's settings come back afterwards."""
    import datasets  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    package = logging.getLogger("hf_kadapter")
    saved = (transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
             datasets.is_progress_bar_enabled(), package.level)  # fmt: skip
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(saved[0])
        datasets.logging.set_verbosity(saved[1])
        if saved[2]:
            datasets.enable_progress_bars()
        package.setLevel(saved[3])


__all__ = [
    "ExperimentResult",
    "GainSpec",
    "LinearProbe",
    "UnitStore",
    "encode_frozen",
    "predict_batches",
    "seed_everything",
    "train_small",
]

"""Offline evaluation metrics for the K-Adapter tasks, and `compute_metrics` builders for `transformers.Trainer`.

`evaluate.load("accuracy")` fetches its script from the Hub; each metric here is an evaluate module in its
own folder of this package, loaded from that local path, so evaluation works offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import evaluate
import numpy as np

if TYPE_CHECKING:
    from transformers import EvalPrediction

__all__ = [
    "METRICS",
    "accuracy_compute_metrics",
    "argmax_logits",
    "entity_typing_compute_metrics",
    "load_metric",
    "metric_path",
    "relation_compute_metrics",
]

METRICS: tuple[str, ...] = ("accuracy", "entity_typing_f1", "relation_f1", "squad_em_f1")
"""Names accepted by `load_metric`, one folder each next to this file."""

_METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Local folder of metric `name` (what `evaluate.load` gets), so it can also be used without this helper."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; available metrics: {', '.join(METRICS)}")
    return str(_METRICS_DIR / name)


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """`evaluate.load` of a metric shipped with this package, from its local folder (no Hub access).

    Extra keyword arguments go to `evaluate.load` (keep_in_memory, cache_dir, num_process, process_id ...).
    """
    return evaluate.load(metric_path(name), **kwargs)


def _first(value: Any) -> np.ndarray:
    """The logits (or labels) of an EvalPrediction field: models returning extra outputs give a tuple, logits first."""
    if isinstance(value, tuple):
        value = value[0]
    return np.asarray(value)


def _floats(result: dict[str, Any]) -> dict[str, float]:
    """Trainer logs metrics as JSON: plain floats, not numpy scalars."""
    return {key: float(value) for key, value in result.items()}


def entity_typing_compute_metrics(
    threshold: float = 0.0,
    predict_top_if_empty: bool = False,
    macro_denominator: str = "all",
) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for multi-label entity typing: strict accuracy and loose macro/micro P/R/F1.

    A type is predicted when its logit is > `threshold` (0.0 = sigmoid probability 0.5, as the official
    Open Entity evaluation does). When no logit passes, the example is left with NO predicted type by default,
    like the official Open Entity code: it then scores 0 macro precision and recall for that example (see
    the entity_typing_f1 module). `predict_top_if_empty=True` predicts the arg-max type in that case instead,
    as the official FIGER evaluation does (every mention has at least one type). A gold type is present when
    its label value is > 0.5 (0/1 targets, int or float). `macro_denominator` is passed to the metric.
    """
    metric = load_metric("entity_typing_f1", keep_in_memory=True)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = _first(eval_pred.predictions)
        labels = _first(eval_pred.label_ids)
        if logits.ndim != 2 or logits.shape != labels.shape:
            raise ValueError(
                f"entity typing expects (examples, types) logits and labels, got {logits.shape} and {labels.shape}"
            )
        predicted = logits > threshold
        if predict_top_if_empty:
            empty = ~predicted.any(axis=-1)
            predicted[empty, logits[empty].argmax(axis=-1)] = True
        result = metric.compute(
            predictions=predicted.astype(np.int32).tolist(),
            references=(labels > 0.5).astype(np.int32).tolist(),
            macro_denominator=macro_denominator,
        )
        return _floats(result)

    return compute_metrics


def relation_compute_metrics(no_relation_id: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for relation classification: arg-max label, micro P/R/F1 excluding `no_relation_id`."""
    if isinstance(no_relation_id, bool) or not isinstance(no_relation_id, (int, np.integer)):
        raise ValueError(f"no_relation_id must be the int id of the no_relation label, got {no_relation_id!r}")
    metric = load_metric("relation_f1", keep_in_memory=True)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = _first(eval_pred.predictions).argmax(axis=-1)
        references = _first(eval_pred.label_ids)
        result = metric.compute(
            predictions=predictions.reshape(-1).tolist(),
            references=references.reshape(-1).tolist(),
            no_relation_id=int(no_relation_id),
        )
        return _floats(result)

    return compute_metrics


def argmax_logits(logits: Any, labels: Any = None) -> Any:
    """`preprocess_logits_for_metrics` for heads with per-token logits: keep the arg-max ids, not the logits.

    Why: Trainer joins evaluation batches by padding their second axis (with -100); the dependency head's logits
    are (batch, L, L), so batches of other lengths differ in two axes and cannot be joined (and would keep L x L
    floats per example). The ids are (batch, L), padded like the labels; `accuracy_compute_metrics` reads them.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy_compute_metrics(ignore_index: int = -100) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for classification and multiple choice: accuracy of the arg-max over the last axis.

    Works for (examples, labels) and (examples, choices) logits, and for token-level logits too: predictions
    and labels are flattened and positions labelled `ignore_index` (padding, -100) are left out. Predictions that
    are already ids (integers, e.g. from `argmax_logits`) are used as they are.
    """
    metric = load_metric("accuracy", keep_in_memory=True)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = _first(eval_pred.predictions)
        if not np.issubdtype(predictions.dtype, np.integer):
            predictions = predictions.argmax(axis=-1)
        predictions = predictions.reshape(-1)
        references = _first(eval_pred.label_ids).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.size} arg-max predictions for {references.size} labels")
        keep = references != ignore_index
        result = metric.compute(predictions=predictions[keep].tolist(), references=references[keep].tolist())
        return _floats(result)

    return compute_metrics

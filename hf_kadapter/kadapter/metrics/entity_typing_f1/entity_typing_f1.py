"""Strict accuracy and loose macro/micro P/R/F1 for multi-label entity typing (Open Entity, FIGER).

An evaluate module loaded from its local folder (the Hub is not needed); it is self-contained on purpose,
because evaluate copies only this file into its module cache.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{ling2012fine,
  title={Fine-Grained Entity Recognition},
  author={Ling, Xiao and Weld, Daniel S.},
  booktitle={Proceedings of the Twenty-Sixth AAAI Conference on Artificial Intelligence},
  year={2012}
}
@inproceedings{wang2021kadapter,
  title={K-Adapter: Infusing Knowledge into Pre-Trained Models with Adapters},
  author={Wang, Ruize and Tang, Duyu and Duan, Nan and Wei, Zhongyu and Huang, Xuanjing and Ji, Jianshu and
          Cao, Guihong and Jiang, Daxin and Zhou, Ming},
  booktitle={Findings of the Association for Computational Linguistics: ACL-IJCNLP 2021},
  year={2021}
}
"""

_DESCRIPTION = """\
Entity typing scores of Ling & Weld (2012) as computed by the K-Adapter evaluation of Open Entity and FIGER.
For every example i let P_i be the set of predicted types, G_i the set of gold types and C_i = P_i & G_i.

- strict_accuracy: fraction of examples with P_i == G_i (two empty sets count as equal).
- loose macro: precision = mean over examples of |C_i| / |P_i|, recall = mean of |C_i| / |G_i|,
  F1 = harmonic mean of that precision and recall (not the mean of per-example F1).
- loose micro: precision = sum |C_i| / sum |P_i|, recall = sum |C_i| / sum |G_i|, F1 = harmonic mean.

Examples with no predicted type: with macro_denominator="all" (the default, what the K-Adapter code does) such
an example adds 0 to the macro precision sum but still counts in its denominator (all examples), so it lowers
macro precision; an example with no gold type likewise adds 0 to macro recall. With
macro_denominator="nonempty" (the wording of Ling & Weld 2012) macro precision averages only over examples
with at least one predicted type and macro recall only over examples with at least one gold type.
Micro scores are unaffected by that choice: an empty prediction adds 0 predicted and 0 correct labels.
Every ratio whose denominator is 0 is reported as 0.0 (the official code gives precision 0.0 when nothing is
predicted and raises ZeroDivisionError when there are no gold labels at all).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): one multi-hot 0/1 vector per example (1 = type predicted).
    references (`list` of `list` of `int`): one multi-hot 0/1 vector per example (1 = gold type); each must be
        as long as the matching prediction.
    macro_denominator (`str`, defaults to `"all"`): `"all"` (K-Adapter code) or `"nonempty"` (Ling & Weld 2012),
        see the description.
Returns:
    strict_accuracy, loose_macro_precision, loose_macro_recall, loose_macro_f1, loose_micro_precision,
    loose_micro_recall, loose_micro_f1 (`float`, all in [0, 1]).
Examples:
    >>> metric = evaluate.load("path/to/entity_typing_f1")
    >>> metric.compute(predictions=[[1, 0, 1]], references=[[1, 1, 0]])["loose_micro_f1"]
    0.5
"""

_MACRO_DENOMINATORS = ("all", "nonempty")


def _ratio(numerator: float, denominator: float) -> float:
    """Zero instead of a division error: an empty denominator means nothing to score."""
    return float(numerator) / float(denominator) if denominator else 0.0


def _harmonic(precision: float, recall: float) -> float:
    """F1 from a precision and a recall, 0.0 when both are 0."""
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _as_binary(row: list[int], what: str, index: int) -> np.ndarray:
    """Checks a multi-hot row, so that logits or probabilities passed by mistake fail loudly."""
    array = np.asarray(row)
    if array.ndim != 1 or not np.isin(array, (0, 1)).all():
        raise ValueError(
            f"{what}[{index}] must be a multi-hot vector of 0/1 values, got {row!r}; threshold logits first "
            "(hf_kadapter.kadapter.metrics.entity_typing_compute_metrics does that)."
        )
    return array.astype(bool)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EntityTypingF1(evaluate.Metric):
    """Loose micro/macro F1 of Ling & Weld (2012), the Open Entity / FIGER metric of K-Adapter."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            ),
            reference_urls=["https://github.com/microsoft/K-Adapter"],
        )

    def _compute(
        self,
        predictions: list[list[int]],
        references: list[list[int]],
        macro_denominator: str = "all",
    ) -> dict[str, float]:
        if macro_denominator not in _MACRO_DENOMINATORS:
            raise ValueError(f"macro_denominator must be one of {_MACRO_DENOMINATORS}, got {macro_denominator!r}")
        exact = 0
        macro_precision_sum = macro_recall_sum = 0.0
        with_prediction = with_gold = 0
        correct_total = predicted_total = gold_total = 0
        for index, (prediction_row, reference_row) in enumerate(zip(predictions, references, strict=True)):
            predicted = _as_binary(prediction_row, "predictions", index)
            gold = _as_binary(reference_row, "references", index)
            if predicted.shape != gold.shape:
                raise ValueError(
                    f"predictions[{index}] has {predicted.size} labels but references[{index}] has {gold.size}"
                )
            n_predicted = int(predicted.sum())
            n_gold = int(gold.sum())
            n_correct = int((predicted & gold).sum())
            exact += bool((predicted == gold).all())
            if n_predicted:
                macro_precision_sum += n_correct / n_predicted
                with_prediction += 1
            if n_gold:
                macro_recall_sum += n_correct / n_gold
                with_gold += 1
            correct_total += n_correct
            predicted_total += n_predicted
            gold_total += n_gold

        n_examples = len(predictions)
        if macro_denominator == "all":
            macro_precision = _ratio(macro_precision_sum, n_examples)
            macro_recall = _ratio(macro_recall_sum, n_examples)
        else:
            macro_precision = _ratio(macro_precision_sum, with_prediction)
            macro_recall = _ratio(macro_recall_sum, with_gold)
        micro_precision = _ratio(correct_total, predicted_total)
        micro_recall = _ratio(correct_total, gold_total)
        return {
            "strict_accuracy": _ratio(exact, n_examples),
            "loose_macro_precision": macro_precision,
            "loose_macro_recall": macro_recall,
            "loose_macro_f1": _harmonic(macro_precision, macro_recall),
            "loose_micro_precision": micro_precision,
            "loose_micro_recall": micro_recall,
            "loose_micro_f1": _harmonic(micro_precision, micro_recall),
        }

"""Micro precision/recall/F1 over relation labels, ignoring the no_relation class (TACRED convention).

An evaluate module loaded from its local folder (the Hub is not needed); it is self-contained on purpose,
because evaluate copies only this file into its module cache.
"""

import datasets
import evaluate

_CITATION = """\
@inproceedings{zhang2017tacred,
  title={Position-aware Attention and Supervised Data Improve Slot Filling},
  author={Zhang, Yuhao and Zhong, Victor and Chen, Danqi and Angeli, Gabor and Manning, Christopher D.},
  booktitle={Proceedings of the 2017 Conference on Empirical Methods in Natural Language Processing},
  year={2017}
}
"""

_DESCRIPTION = """\
Micro-averaged precision, recall and F1 for relation classification where one label means "no relation"
(TACRED), as scored by the TACRED scorer and the K-Adapter evaluation.

- a prediction is a "predicted relation" when it is not no_relation;
- a gold relation is any reference that is not no_relation;
- a prediction is correct when it equals the reference and the reference is not no_relation.
precision = correct / predicted relations, recall = correct / gold relations, F1 = harmonic mean.

Edge cases follow the official scorer: when no relation is predicted at all, precision is 1.0 (nothing
predicted, nothing wrong) and F1 is 0.0 as soon as there is a gold relation; when there is no gold relation,
recall is 0.0 (so F1 is 0.0 even when everything is correctly no_relation).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted label ids.
    references (`list` of `int`): gold label ids.
    no_relation_id (`int`): the id of the no_relation label (required; 28 in the K-Adapter TACRED label list).
Returns:
    precision, recall, f1 (`float`, in [0, 1]).
Examples:
    >>> metric = evaluate.load("path/to/relation_f1")
    >>> metric.compute(predictions=[1, 0, 2], references=[1, 2, 0], no_relation_id=0)["f1"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RelationF1(evaluate.Metric):
    """TACRED micro F1: accuracy alone is dominated by the no_relation majority class."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://nlp.stanford.edu/projects/tacred/", "https://github.com/microsoft/K-Adapter"],
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        no_relation_id: int | None = None,
    ) -> dict[str, float]:
        if no_relation_id is None or isinstance(no_relation_id, bool) or not isinstance(no_relation_id, int):
            raise ValueError(
                f"relation_f1 needs no_relation_id=<int id of the no_relation label>, got {no_relation_id!r}"
            )
        predicted = gold = correct = 0
        for guess, label in zip(predictions, references, strict=True):
            if guess != no_relation_id:
                predicted += 1
            if label != no_relation_id:
                gold += 1
                if guess == label:
                    correct += 1
        precision = correct / predicted if predicted else 1.0
        recall = correct / gold if gold else 0.0
        f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}

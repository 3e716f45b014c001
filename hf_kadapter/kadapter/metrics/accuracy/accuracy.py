"""Accuracy: the fraction of predictions equal to their reference.

An evaluate module loaded from its local folder, so that `load_metric("accuracy")` works offline where
`evaluate.load("accuracy")` would fetch the Hub's module.
"""

import datasets
import evaluate

_CITATION = ""

_DESCRIPTION = """\
Accuracy = number of predictions equal to their reference / number of examples (0.0 for no examples).
Used for classification and multiple choice (CosmosQA): the predictions are the argmax label / choice ids.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted label ids.
    references (`list` of `int`): gold label ids.
Returns:
    accuracy (`float`, in [0, 1]).
Examples:
    >>> metric = evaluate.load("path/to/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Plain accuracy, shipped locally because the Hub's `accuracy` module cannot be fetched offline."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        matches = sum(int(guess == label) for guess, label in zip(predictions, references, strict=True))
        return {"accuracy": matches / len(references) if references else 0.0}

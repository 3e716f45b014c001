"""Exact match and token F1 of extractive QA answers, as the official SQuAD v1.1 evaluation script scores them.

An evaluate module loaded from its local folder (the Hub is not needed); it is self-contained on purpose,
because evaluate copies only this file into its module cache.
"""

import collections
import re
import string

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar2016squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year={2016}
}
"""

_DESCRIPTION = """\
SQuAD v1.1 exact match (EM) and token F1, in percent (0-100) like the official script. Used for span-extraction
QA (SQuAD, SearchQA, Quasar-T).

Both answers are normalised first: lowercase, drop punctuation (string.punctuation), drop the articles
a / an / the (whole words), collapse whitespace. EM: normalised strings equal. F1: bag-of-tokens overlap of
the normalised strings (0 when no token is shared, so also when either side normalises to nothing). Each
question takes the maximum over its gold answers. Scores are averaged over the references; a reference
whose id has no prediction scores 0, predictions for unknown ids are ignored, and when an id is predicted
twice the last prediction counts (the official script reads predictions into a dict).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`): {"id": str, "prediction_text": str} per question.
    references (`list` of `dict`): {"id": str, "answers": {"text": [str, ...]}} per question ("answer_start"
        may be present and is ignored); every question needs at least one gold answer.
Returns:
    exact_match, f1 (`float`, in [0, 100]).
Examples:
    >>> metric = evaluate.load("path/to/squad_em_f1")
    >>> metric.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "The Eiffel Tower!"}],
    ...     references=[{"id": "q1", "answers": {"text": ["Eiffel Tower"]}}],
    ... )
    {'exact_match': 100.0, 'f1': 100.0}
"""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation, so that case, punctuation and articles do not decide a match."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (partial credit for partly right spans)."""
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    shared = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(prediction_tokens)
    recall = shared / len(gold_tokens)
    return 2.0 * precision * recall / (precision + recall)


def _texts_only(references: list[dict] | None) -> list[dict] | None:
    """References reduced to {"id", "answers": {"text"}}, the fields that are scored."""
    if references is None:
        return None
    return [{"id": reference["id"], "answers": {"text": reference["answers"]["text"]}} for reference in references]


def _prediction_fields(predictions: list[dict] | None) -> list[dict] | None:
    """Predictions reduced to {"id", "prediction_text"} (drops e.g. a SQuAD v2 no_answer_probability)."""
    if predictions is None:
        return None
    return [{"id": prediction["id"], "prediction_text": prediction["prediction_text"]} for prediction in predictions]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadEmF1(evaluate.Metric):
    """SQuAD v1.1 EM/F1 that runs offline (the Hub's `squad` module cannot be fetched here)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": {"text": datasets.Sequence(datasets.Value("string"))},
                    },
                }
            ),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def add_batch(
        self, *, predictions: list[dict] | None = None, references: list[dict] | None = None, **kwargs: object
    ) -> None:
        """Keeps only the scored fields: evaluate rejects dict keys its features do not list (answer_start)."""
        super().add_batch(predictions=_prediction_fields(predictions), references=_texts_only(references), **kwargs)

    def add(self, *, prediction: dict | None = None, reference: dict | None = None, **kwargs: object) -> None:
        """Same as add_batch, for one question."""
        super().add(
            prediction=_prediction_fields([prediction])[0] if prediction else None,
            reference=_texts_only([reference])[0] if reference else None,
            **kwargs,
        )

    def _compute(self, predictions: list[dict], references: list[dict]) -> dict[str, float]:
        predicted_text = {prediction["id"]: prediction["prediction_text"] for prediction in predictions}
        exact_total = f1_total = 0.0
        for reference in references:
            golds = list(reference["answers"]["text"] or [])
            if not golds:
                raise ValueError(
                    f"reference {reference['id']!r} has no gold answer; SQuAD v1.1 scoring needs at least one"
                )
            if reference["id"] not in predicted_text:
                continue
            prediction = predicted_text[reference["id"]]
            exact_total += max(exact_match_score(prediction, gold) for gold in golds)
            f1_total += max(f1_score(prediction, gold) for gold in golds)
        count = len(references)
        return {
            "exact_match": 100.0 * exact_total / count if count else 0.0,
            "f1": 100.0 * f1_total / count if count else 0.0,
        }

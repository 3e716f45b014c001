"""The offline evaluate metrics and Trainer compute_metrics builders, checked against hand-computed values."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from hf_kadapter.kadapter.metrics import (
    METRICS,
    accuracy_compute_metrics,
    entity_typing_compute_metrics,
    load_metric,
    metric_path,
    relation_compute_metrics,
)


@pytest.fixture(scope="module")
def metrics() -> dict[str, evaluate.EvaluationModule]:
    """Every metric once per module (in memory: nothing written to the cache folder)."""
    return {name: load_metric(name, keep_in_memory=True) for name in METRICS}


# ---------------------------------------------------------------- loading


def test_metric_folders_hold_a_script_of_the_same_name() -> None:
    for name in METRICS:
        folder = Path(metric_path(name))
        assert (folder / f"{name}.py").is_file()


def test_metric_scripts_import_one_module_per_line() -> None:
    # evaluate reads the imports of a script line by line to check its dependencies: keep them simple.
    for name in METRICS:
        script = Path(metric_path(name)) / f"{name}.py"
        for line in script.read_text(encoding="utf-8").splitlines():
            if re.match(r"^(import|from)\s", line):
                assert "," not in line and "(" not in line, f"{script.name}: {line!r}"
        for kind, library, _, _ in evaluate.loading.get_imports(str(script)):
            assert kind == "library"
            assert library in {"collections", "datasets", "evaluate", "numpy", "re", "string"}


def test_unknown_metric_lists_the_available_names() -> None:
    with pytest.raises(ValueError, match="available metrics: accuracy, entity_typing_f1, relation_f1, squad_em_f1"):
        load_metric("f1")


def test_load_works_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while loading a local metric")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in METRICS:
        metric = load_metric(name, keep_in_memory=True)
        assert metric.name == name
    assert load_metric("accuracy", keep_in_memory=True).compute(predictions=[1, 0], references=[1, 1]) == {
        "accuracy": 0.5
    }


def test_default_load_writes_its_cache_where_asked(tmp_path: Path) -> None:
    metric = load_metric("accuracy", cache_dir=str(tmp_path))
    # 3 of 4 equal: 3 / 4 = 0.75
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2]) == {"accuracy": 0.75}


# ---------------------------------------------------------------- entity_typing_f1

# 4 examples, 3 types.                      P (predicted)  G (gold)   C = P & G  |C|/|P|   |C|/|G|
ET_PREDICTIONS = [[1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]]  # {0,1} {0}  -> {0}  1/2      1/1
ET_REFERENCES = [[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1]]  #   {}   {1}  -> {}   (empty)  0/1
#                                                                 {1,2} {1,2} -> {1,2} 2/2  2/2
#                                                                 {2}  {0,1,2} -> {2}  1/1  1/3


def test_entity_typing_by_hand(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    result = metrics["entity_typing_f1"].compute(predictions=ET_PREDICTIONS, references=ET_REFERENCES)
    # strict: only example 3 has P == G -> 1/4
    assert result["strict_accuracy"] == pytest.approx(0.25)
    # macro (official: every example in both denominators, the empty prediction adds 0 precision):
    # P = (1/2 + 0 + 1 + 1) / 4 = 5/8, R = (1 + 0 + 1 + 1/3) / 4 = 7/12
    # F1 = 2 * 5/8 * 7/12 / (5/8 + 7/12) = (70/96) / (29/24) = 35/58
    assert result["loose_macro_precision"] == pytest.approx(5 / 8)
    assert result["loose_macro_recall"] == pytest.approx(7 / 12)
    assert result["loose_macro_f1"] == pytest.approx(35 / 58)
    # micro: correct 1+0+2+1 = 4, predicted 2+0+2+1 = 5, gold 1+1+2+3 = 7
    # P = 4/5, R = 4/7, F1 = 2 * 4/5 * 4/7 / (4/5 + 4/7) = (32/35) / (48/35) = 2/3
    assert result["loose_micro_precision"] == pytest.approx(4 / 5)
    assert result["loose_micro_recall"] == pytest.approx(4 / 7)
    assert result["loose_micro_f1"] == pytest.approx(2 / 3)
    assert all(isinstance(value, float) for value in result.values())


def test_entity_typing_nonempty_macro_denominator(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    result = metrics["entity_typing_f1"].compute(
        predictions=ET_PREDICTIONS, references=ET_REFERENCES, macro_denominator="nonempty"
    )
    # Ling & Weld wording: precision over the 3 examples with a prediction: (1/2 + 1 + 1) / 3 = 5/6;
    # recall over the 4 examples with gold types: 7/12 as before.
    # F1 = 2 * 5/6 * 7/12 / (5/6 + 7/12) = (70/72) / (17/12) = 35/51
    assert result["loose_macro_precision"] == pytest.approx(5 / 6)
    assert result["loose_macro_recall"] == pytest.approx(7 / 12)
    assert result["loose_macro_f1"] == pytest.approx(35 / 51)
    # micro does not depend on it: 2/3
    assert result["loose_micro_f1"] == pytest.approx(2 / 3)


def test_entity_typing_nothing_predicted(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    result = metrics["entity_typing_f1"].compute(predictions=[[0, 0], [0, 0]], references=[[1, 0], [0, 0]])
    # example 2 has P = G = {} -> strict 1/2; no prediction anywhere -> every precision 0 (official), recall
    # 0/1 -> 0, F1 0
    assert result["strict_accuracy"] == pytest.approx(0.5)
    for key in ("precision", "recall", "f1"):
        assert result[f"loose_macro_{key}"] == 0.0
        assert result[f"loose_micro_{key}"] == 0.0


def test_entity_typing_no_gold_type_at_all(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # No gold label: the official code divides by zero; here recall is 0.0. Predicted {0}: precision 0/1 = 0.
    result = metrics["entity_typing_f1"].compute(predictions=[[1, 0]], references=[[0, 0]])
    assert result["loose_micro_recall"] == 0.0
    assert result["loose_micro_precision"] == 0.0
    assert result["loose_macro_f1"] == 0.0
    assert result["strict_accuracy"] == 0.0


def test_entity_typing_rejects_bad_input(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    metric = metrics["entity_typing_f1"]
    with pytest.raises(ValueError, match="0/1"):
        metric.compute(predictions=[[2, 0]], references=[[1, 0]])
    with pytest.raises(ValueError, match="labels"):
        metric.compute(predictions=[[1, 0, 0]], references=[[1, 0]])
    with pytest.raises(ValueError, match="macro_denominator"):
        metric.compute(predictions=[[1, 0]], references=[[1, 0]], macro_denominator="paper")


# ---------------------------------------------------------------- relation_f1


def test_relation_f1_by_hand(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # no_relation = 0.   guess gold  predicted? gold? correct?
    predictions = [1, 2, 0, 1, 0, 3, 0]  # 1 1   yes yes yes
    references = [1, 1, 2, 0, 0, 3, 3]  #  2 1   yes yes no
    #                                      0 2   no  yes no
    #                                      1 0   yes no  no
    #                                      0 0   no  no  no
    #                                      3 3   yes yes yes
    #                                      0 3   no  yes no
    # predicted 4, gold 5, correct 2: P = 2/4, R = 2/5, F1 = 2 * 0.5 * 0.4 / 0.9 = 4/9
    result = metrics["relation_f1"].compute(predictions=predictions, references=references, no_relation_id=0)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.4)
    assert result["f1"] == pytest.approx(4 / 9)


def test_relation_f1_uses_the_given_no_relation_id(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # TACRED's no_relation is 28 in the K-Adapter label list. guesses [28, 5], gold [5, 5]:
    # predicted 1, gold 2, correct 1 -> P = 1, R = 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    result = metrics["relation_f1"].compute(predictions=[28, 5], references=[5, 5], no_relation_id=28)
    assert result == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})


def test_relation_f1_no_predicted_relation(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # nothing predicted: precision 1.0 (official scorer), 0 of 2 gold relations found -> recall 0, F1 0
    result = metrics["relation_f1"].compute(predictions=[0, 0, 0], references=[1, 0, 2], no_relation_id=0)
    assert result == {"precision": 1.0, "recall": 0.0, "f1": 0.0}


def test_relation_f1_all_no_relation(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # everything (correctly) no_relation: no predicted and no gold relation -> P 1.0, R 0.0, F1 0.0
    result = metrics["relation_f1"].compute(predictions=[0, 0], references=[0, 0], no_relation_id=0)
    assert result == {"precision": 1.0, "recall": 0.0, "f1": 0.0}


def test_relation_f1_needs_no_relation_id(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    with pytest.raises(ValueError, match="no_relation_id"):
        metrics["relation_f1"].compute(predictions=[0], references=[0])


# ---------------------------------------------------------------- squad_em_f1


def _squad(predicted: list[tuple[str, str]], gold: list[tuple[str, list[str]]]) -> dict[str, list[dict]]:
    return {
        "predictions": [{"id": qid, "prediction_text": text} for qid, text in predicted],
        "references": [{"id": qid, "answers": {"text": texts}} for qid, texts in gold],
    }


def test_squad_by_hand(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    inputs = _squad(
        [
            ("q1", "The Eiffel Tower!"),
            ("q2", "in the city of Paris"),
            ("q3", "an apple"),
            ("q4", "Another answer"),
            ("zzz", "unknown id, ignored"),
        ],
        [
            ("q1", ["Eiffel Tower"]),
            ("q2", ["Paris", "the city of Paris, France"]),
            ("q3", ["Apple."]),
            ("q4", ["answer"]),
            ("q5", ["never predicted"]),
        ],
    )
    # q1: "the eiffel tower!" -> no punctuation -> drop "the" -> "eiffel tower" == "eiffel tower": EM 1, F1 1
    # q2: prediction -> "in city of paris" (4 tokens).
    #     vs "paris": 1 shared, P 1/4, R 1/1, F1 = 2 * 1/4 / (5/4) = 0.4
    #     vs "city of paris france": 3 shared, P 3/4, R 3/4, F1 0.75  -> max F1 0.75, EM 0
    # q3: "an apple" -> "apple"; "Apple." -> "apple": EM 1, F1 1
    # q4: "another" is not the article "an": "another answer" vs "answer": 1 shared, P 1/2, R 1, F1 2/3, EM 0
    # q5: no prediction -> 0, 0
    # EM = 100 * (1 + 0 + 1 + 0 + 0) / 5 = 40; F1 = 100 * (1 + 0.75 + 1 + 2/3 + 0) / 5 = 68.333...
    result = metrics["squad_em_f1"].compute(**inputs)
    assert result["exact_match"] == pytest.approx(40.0)
    assert result["f1"] == pytest.approx(100 * (1 + 0.75 + 1 + 2 / 3) / 5)


def test_squad_normalisation_and_max_over_gold_answers(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    inputs = _squad(
        [("a", "  THE  quick, brown fox!! "), ("b", "the")],
        [("a", ["a slow fox", "Quick brown fox"]), ("b", ["A"])],
    )
    # a: "quick brown fox" equals gold 2 after normalisation: EM 1, F1 1 (gold 1 alone: F1 2 * 1/3 * 1/2 / (5/6) = 0.4)
    # b: both normalise to "" -> EM 1 (equal strings) but F1 0 (no shared token), as in SQuAD v1.1
    # EM = 100 * 2 / 2 = 100, F1 = 100 * (1 + 0) / 2 = 50
    result = metrics["squad_em_f1"].compute(**inputs)
    assert result == pytest.approx({"exact_match": 100.0, "f1": 50.0})


def test_squad_ignores_unscored_fields_and_needs_a_gold_answer(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    references = [{"id": "q", "answers": {"text": ["Paris"], "answer_start": [7]}}]
    predictions = [{"id": "q", "prediction_text": "paris", "no_answer_probability": 0.0}]
    assert metrics["squad_em_f1"].compute(predictions=predictions, references=references) == {
        "exact_match": 100.0,
        "f1": 100.0,
    }
    # the incremental API too (datasets' SQuAD rows carry answer_start): "Paris" vs "paris" -> 100 / 100
    metric = metrics["squad_em_f1"]
    metric.add(prediction=predictions[0], reference=references[0])
    assert metric.compute() == {"exact_match": 100.0, "f1": 100.0}
    metric.add_batch(predictions=predictions, references=references)
    assert metric.compute() == {"exact_match": 100.0, "f1": 100.0}
    with pytest.raises(ValueError, match="no gold answer"):
        metrics["squad_em_f1"].compute(**_squad([("q", "x")], [("q", [])]))


# ---------------------------------------------------------------- accuracy


def test_accuracy_by_hand(metrics: dict[str, evaluate.EvaluationModule]) -> None:
    # equal at positions 0, 1, 3 of 4 -> 3/4
    assert metrics["accuracy"].compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2]) == {"accuracy": 0.75}


# ---------------------------------------------------------------- compute_metrics builders

ET_LOGITS = np.array(
    [
        [2.0, -1.0, 0.5],  # > 0: {0, 2}
        [-0.3, -0.1, -2.0],  # none > 0 (arg-max 1)
        [0.0, 3.0, -1.0],  # {1} (0.0 is not > 0)
    ],
    dtype=np.float32,
)
ET_LABELS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)


def test_entity_typing_compute_metrics_official_threshold() -> None:
    compute = entity_typing_compute_metrics()
    result = compute(EvalPrediction(predictions=(ET_LOGITS, np.zeros((3, 4))), label_ids=ET_LABELS))
    # P / G / C:  {0,2} {0} {0}: p 1/2, r 1  |  {} {1} {}: p 0 (empty), r 0  |  {1} {0,1} {1}: p 1, r 1/2
    # strict 0/3; macro P = (1/2 + 0 + 1)/3 = 1/2, R = (1 + 0 + 1/2)/3 = 1/2, F1 1/2
    # micro: correct 2, predicted 3, gold 4 -> P 2/3, R 1/2, F1 = (2/3) / (7/6) = 4/7
    assert result == pytest.approx(
        {
            "strict_accuracy": 0.0,
            "loose_macro_precision": 0.5,
            "loose_macro_recall": 0.5,
            "loose_macro_f1": 0.5,
            "loose_micro_precision": 2 / 3,
            "loose_micro_recall": 0.5,
            "loose_micro_f1": 4 / 7,
        }
    )
    assert all(type(value) is float for value in result.values())


def test_entity_typing_compute_metrics_top_if_empty_and_threshold() -> None:
    result = entity_typing_compute_metrics(predict_top_if_empty=True)(
        EvalPrediction(predictions=ET_LOGITS, label_ids=ET_LABELS)
    )
    # example 2 now predicts its arg-max {1} == gold: p 1, r 1; strict 1/3
    # macro P = (1/2 + 1 + 1)/3 = 5/6, R = (1 + 1 + 1/2)/3 = 5/6, F1 5/6
    # micro: correct 3, predicted 4, gold 4 -> 3/4 each
    assert result["strict_accuracy"] == pytest.approx(1 / 3)
    assert result["loose_macro_f1"] == pytest.approx(5 / 6)
    assert result["loose_micro_precision"] == pytest.approx(0.75)
    assert result["loose_micro_f1"] == pytest.approx(0.75)

    lowered = entity_typing_compute_metrics(threshold=-0.2)(EvalPrediction(predictions=ET_LOGITS, label_ids=ET_LABELS))
    # > -0.2: {0, 2}, {1}, {0, 1} -> examples 2 and 3 exact: strict 2/3
    assert lowered["strict_accuracy"] == pytest.approx(2 / 3)


def test_relation_compute_metrics() -> None:
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    labels = np.array([1, 2, 0, 1])
    # arg-max [1, 0, 2, 1] vs gold [1, 2, 0, 1], no_relation 0:
    # predicted (guess != 0): 3, gold (label != 0): 3, correct: 2 -> P = R = F1 = 2/3
    result = relation_compute_metrics(no_relation_id=0)(EvalPrediction(predictions=(logits,), label_ids=labels))
    assert result == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    with pytest.raises(ValueError, match="no_relation_id"):
        relation_compute_metrics(no_relation_id="no_relation")  # type: ignore[arg-type]


def test_accuracy_compute_metrics_classification_choice_and_tokens() -> None:
    compute = accuracy_compute_metrics()
    # classification: arg-max [1, 0, 1] vs [1, 1, 1] -> 2/3
    logits = np.array([[0.0, 1.0], [2.0, 1.0], [-1.0, 0.0]])
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([1, 1, 1]))) == pytest.approx(
        {"accuracy": 2 / 3}
    )
    # multiple choice, (examples, choices): arg-max [3, 0] vs [3, 2] -> 1/2
    choices = np.array([[0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.0, 0.0]])
    assert compute(EvalPrediction(predictions=(choices,), label_ids=np.array([3, 2]))) == {"accuracy": 0.5}
    # tokens, (examples, positions, labels) with -100 padding: arg-max [[1, 0, 1]] vs [[1, -100, 0]]
    # -> positions 0 and 2 count: 1 of 2 -> 1/2
    tokens = np.array([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    assert compute(EvalPrediction(predictions=tokens, label_ids=np.array([[1, -100, 0]]))) == {"accuracy": 0.5}

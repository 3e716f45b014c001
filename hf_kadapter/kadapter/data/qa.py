"""Question-answering data: SQuAD v1.1 span extraction and CosmosQA-style multiple choice.

The paper evaluates K-Adapter on span QA (SearchQA, Quasar-T; code never released) and CosmosQA multiple
choice. SQuAD v1.1 JSON is the common span format those sets are converted to; the sliding-window features and
the n-best postprocessing follow transformers' question-answering examples so results are comparable.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from ...utils.records import check_decoded, read_text
from .records import (
    DataFormatError,
    DataReport,
    RecordError,
    check_on_error,
    load_records,
    require,
    require_fast_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


def _input_names(tokenizer: PreTrainedTokenizerBase, pair: bool = True) -> list[str]:
    """The model inputs this tokenizer returns (fixed up front so every map batch gives the same columns)."""
    probe = tokenizer("a", "b") if pair else tokenizer("a")
    return [name for name in _INPUT_NAMES if name in probe]


# ----- SQuAD v1.1 ---------------------------------------------------------------------------------------------
class _LineFinder:
    """Line numbers for records of a nested JSON file (json.load gives none): the line where a question's id
    (or an article's title) is written, searched forward so repeated strings resolve in file order."""

    def __init__(self, text: str):
        self.text = text
        self.position = 0

    def line(self, value: Any) -> int:
        if isinstance(value, str) and value:
            found = self.text.find(json.dumps(value, ensure_ascii=False), self.position)
            if found < 0:
                found = self.text.find(json.dumps(value), self.position)
            if found >= 0:
                self.position = found
        return self.text.count("\n", 0, self.position) + 1


def _squad_answers(context: str, answers: Any) -> dict[str, list]:
    if not isinstance(answers, list):
        raise RecordError("answers", f"expected list, got {type(answers).__name__}")
    if not answers:
        raise RecordError("answers", "no answer (SQuAD 2.0 unanswerable questions are not supported)")
    texts, starts = [], []
    for k, answer in enumerate(answers):
        if not isinstance(answer, dict):
            raise RecordError(f"answers[{k}]", f"expected an object, got {type(answer).__name__}")
        text = answer.get("text")
        if not isinstance(text, str) or not text:
            raise RecordError(f"answers[{k}].text", "missing or empty")
        start = answer.get("answer_start")
        if isinstance(start, bool) or not isinstance(start, int):
            raise RecordError(f"answers[{k}].answer_start", f"expected int, got {type(start).__name__}")
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            raise RecordError(
                f"answers[{k}].answer_start",
                f"answer text {text!r} is not at character {start} of the context (found {found!r})",
            )
        texts.append(text)
        starts.append(start)
    return {"text": texts, "answer_start": starts}


def load_squad(path: str | Path, *, on_error: str = "raise", report: DataReport | None = None) -> datasets.Dataset:
    """Flatten a SQuAD v1.1 JSON file (data -> paragraphs -> qas) into one row per question:
    {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}.

    Every answer must sit at its answer_start in the context; question ids must be unique. A malformed question
    raises a DataFormatError naming the file, the line of the question's id, the field path and the id, or is
    skipped and counted with on_error="skip" (report.read counts questions).
    """
    check_on_error(on_error)
    report = report if report is not None else DataReport()
    path = Path(path)
    text = read_text(path)  # bytes that are not UTF-8 are named (or skipped) with the question holding them
    try:
        root = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(str(path), error.lineno, "<json>", f"invalid JSON ({error.msg})") from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataFormatError(str(path), 1, "data", "expected a SQuAD object {'version': ..., 'data': [...]}")
    lines = _LineFinder(text)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def problem(where: str, error: RecordError, line: int, record: str = "") -> None:
        if on_error == "raise":
            raise DataFormatError(str(path), line, f"{where}.{error.field}", f"{record}{error.why}")
        report.skip(f"{error.field}: {error.why}")

    for a, article in enumerate(root["data"]):
        where = f"data[{a}]"
        try:
            if not isinstance(article, dict):
                raise RecordError("<article>", f"expected an object, got {type(article).__name__}")
            title = article.get("title", "")
            line = lines.line(title)
            title = title if isinstance(title, str) else str(title)
            paragraphs = require(article, "paragraphs", list)
        except RecordError as error:
            report.read += 1
            problem(where, error, lines.line(None))
            continue
        for p, paragraph in enumerate(paragraphs):
            p_where = f"{where}.paragraphs[{p}]"
            try:
                if not isinstance(paragraph, dict):
                    raise RecordError("<paragraph>", f"expected an object, got {type(paragraph).__name__}")
                context = require(paragraph, "context", str)
                check_decoded(context)
                if not context.strip():
                    raise RecordError("context", "empty")
                questions = require(paragraph, "qas", list)
            except RecordError as error:
                report.read += 1
                problem(p_where, error, line)
                continue
            for q, qa in enumerate(questions):
                q_where = f"{p_where}.qas[{q}]"
                report.read += 1
                qid = qa.get("id") if isinstance(qa, dict) else None
                q_line = lines.line(qid)
                record = f"question {qid!r}: " if isinstance(qid, str) else ""
                try:
                    if not isinstance(qa, dict):
                        raise RecordError("<question>", f"expected an object, got {type(qa).__name__}")
                    check_decoded(qa)
                    require(qa, "id", str)
                    if qid in seen:
                        raise RecordError("id", "duplicate question id")
                    question = require(qa, "question", str)
                    if not question.strip():
                        raise RecordError("question", "empty")
                    if qa.get("is_impossible"):
                        raise RecordError("is_impossible", "SQuAD 2.0 unanswerable questions are not supported")
                    answers = _squad_answers(context, qa.get("answers"))
                except RecordError as error:
                    problem(q_where, error, q_line, record)
                    continue
                seen.add(qid)
                rows.append({"id": qid, "title": title, "context": context, "question": question, "answers": answers})
                report.kept += 1
    if report.skipped:
        logger.warning("%s: %s", path, report.summary())
    if not rows:
        raise DataFormatError(str(path), 0, "<file>", "no usable questions")
    return datasets.Dataset.from_list(rows)


def _question_budget(
    tokenizer: PreTrainedTokenizerBase, max_length: int, doc_stride: int, max_question_length: int
) -> int:
    """Question tokens that still leave every window more than `doc_stride` context tokens (the fast tokenizer
    panics otherwise)."""
    budget = min(max_question_length, max_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a question with doc_stride={doc_stride}: use a larger "
            "max_length or a smaller doc_stride."
        )
    return budget


def _tokenize_squad(
    examples: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    doc_stride: int,
    padding,
    max_question_length: int,
    report: DataReport | None,
):
    # Leading whitespace (SQuAD has some) only wastes window space; over-long questions are cut to the budget,
    # as BERT's run_squad cut queries to max_query_length=64.
    require_fast_tokenizer(tokenizer)  # offsets and sequence ids come from the fast tokenizer
    budget = _question_budget(tokenizer, max_length, doc_stride, max_question_length)
    questions = [question.lstrip() for question in examples["question"]]
    measured = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    for i, offsets in enumerate(measured["offset_mapping"]):
        if len(offsets) > budget:
            questions[i] = questions[i][: offsets[budget - 1][1]]
            if report is not None:
                report.note(f"question cut to {budget} tokens")
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )


def preprocess_squad_train(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    padding: bool | str = False,
    max_question_length: int = 64,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Training features: question + context windows (`doc_stride` tokens of overlap between windows) with
    start_positions/end_positions of the first gold answer; a window that does not contain the whole answer
    points both at the [CLS]/<s> position, as transformers' QA examples do. Leave padding to the collator
    (padding=False) or pad here ("max_length"). Questions longer than `max_question_length` tokens (or than
    the window allows) are cut and counted in `report.notes`."""
    names = _input_names(tokenizer)

    def features(examples: dict[str, list]) -> dict[str, list]:
        encoded = _tokenize_squad(examples, tokenizer, max_length, doc_stride, padding, max_question_length, report)
        out: dict[str, list] = {name: encoded[name] for name in names}
        out["start_positions"], out["end_positions"] = [], []
        for i, offsets in enumerate(encoded["offset_mapping"]):
            input_ids = encoded["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            answers = examples["answers"][encoded["overflow_to_sample_mapping"][i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            sequence_ids = encoded.sequence_ids(i)
            context = [k for k, sequence in enumerate(sequence_ids) if sequence == 1]
            first, last = (context[0], context[-1]) if context else (0, -1)
            if not context or not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
                out["start_positions"].append(cls_index)
                out["end_positions"].append(cls_index)
                continue
            start = first
            while start <= last and offsets[start][0] <= start_char:
                start += 1
            end = last
            while end >= first and offsets[end][1] >= end_char:
                end -= 1
            out["start_positions"].append(start - 1)
            out["end_positions"].append(end + 1)
        return out

    return dataset.map(features, batched=True, remove_columns=dataset.column_names, desc="SQuAD train features")


def preprocess_squad_eval(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    padding: bool | str = False,
    max_question_length: int = 64,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Evaluation features: the same windows, plus example_id and offset_mapping (None outside the context) that
    `postprocess_squad_predictions` needs. Drop those two columns before feeding the model."""
    names = _input_names(tokenizer)

    def features(examples: dict[str, list]) -> dict[str, list]:
        encoded = _tokenize_squad(examples, tokenizer, max_length, doc_stride, padding, max_question_length, report)
        out: dict[str, list] = {name: encoded[name] for name in names}
        out["example_id"], out["offset_mapping"] = [], []
        for i, offsets in enumerate(encoded["offset_mapping"]):
            sequence_ids = encoded.sequence_ids(i)
            out["example_id"].append(examples["id"][encoded["overflow_to_sample_mapping"][i]])
            out["offset_mapping"].append(
                [list(offset) if sequence_ids[k] == 1 else None for k, offset in enumerate(offsets)]
            )
        return out

    return dataset.map(features, batched=True, remove_columns=dataset.column_names, desc="SQuAD eval features")


def postprocess_squad_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: np.ndarray | Sequence[Sequence[float]],
    end_logits: np.ndarray | Sequence[Sequence[float]],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best answer text per example id from per-feature logits (rows in `features` order; rows may be longer
    than a feature, e.g. padded by Trainer, the extra positions are ignored). Only spans inside the context,
    end >= start and at most `max_answer_length` tokens count; the best start + end logit over all windows of
    an example wins; "" when no valid span exists."""
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"Got {len(start_logits)} start and {len(end_logits)} end logit rows for {len(features)} features: "
            "predict on the preprocess_squad_eval features, in order."
        )
    by_example: dict[str, list[int]] = defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(index)
    all_offsets = features["offset_mapping"]
    predictions: dict[str, str] = {}
    for example in examples:
        context = example["context"]
        best_score, best_text = -np.inf, ""
        for index in by_example.get(example["id"], []):
            offsets = all_offsets[index]
            starts = np.asarray(start_logits[index], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[index], dtype=np.float64)[: len(offsets)]
            for start in np.argsort(starts)[::-1][:n_best]:
                if offsets[start] is None:
                    continue
                for end in np.argsort(ends)[::-1][:n_best]:
                    if offsets[end] is None or end < start or end - start + 1 > max_answer_length:
                        continue
                    score = starts[start] + ends[end]
                    if score > best_score:
                        best_score = score
                        best_text = context[offsets[start][0] : offsets[end][1]]
        predictions[example["id"]] = best_text
    return predictions


# ----- multiple choice (CosmosQA) -----------------------------------------------------------------------------
def _multiple_choice_validator(
    num_choices: int | None, with_labels: bool
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    state = {"expected": num_choices, "count": 0}

    def validate(record: dict[str, Any]) -> dict[str, Any]:
        context = require(record, "context", str)
        question = require(record, "question", str)
        if "choices" in record:
            choices = require(record, "choices", list)
            field_name = "choices"
            for k, choice in enumerate(choices):
                if not isinstance(choice, str):
                    raise RecordError("choices", f"choice {k} is {type(choice).__name__}, expected str")
        else:
            choices = []
            while f"answer{len(choices)}" in record:
                choices.append(require(record, f"answer{len(choices)}", str))
            field_name = "answer0"
        if len(choices) < 2:
            raise RecordError(
                field_name, f"expected at least 2 choices ('choices' or answer0, answer1, ...), got {len(choices)}"
            )
        if state["expected"] is None:
            state["expected"] = len(choices)
        elif len(choices) != state["expected"]:
            raise RecordError(field_name, f"{len(choices)} choices, expected {state['expected']} like the rest")
        row: dict[str, Any] = {
            "id": str(record.get("id", state["count"])),
            "context": context,
            "question": question,
            "choices": choices,
        }
        if with_labels:
            label = require(record, "label", (int, str))
            if isinstance(label, str):
                if not label.strip().isdigit():
                    raise RecordError("label", f"{label!r} is not a choice index")
                label = int(label)
            if not 0 <= label < len(choices):
                raise RecordError("label", f"{label} is outside [0, {len(choices)})")
            row["label"] = label
        state["count"] += 1
        return row

    return validate


def load_multiple_choice(
    path: str | Path,
    *,
    on_error: str = "raise",
    report: DataReport | None = None,
    num_choices: int | None = None,
    with_labels: bool = True,
) -> datasets.Dataset:
    """Load CosmosQA-style records ({"id", "context", "question", "answer0".."answerN", "label"}) or generic ones
    ({"context", "question", "choices": [...], "label"}) from JSONL/JSON into {"id", "context", "question",
    "choices", "label"}. All records must have the same number of choices (`num_choices`, else the first
    record's) so batches stack; labels may be ints or digit strings. with_labels=False reads unlabelled test
    sets (no label column). Missing ids become the record's index."""
    validate = _multiple_choice_validator(num_choices, with_labels)
    return load_records(path, validate, on_error=on_error, report=report)


def preprocess_multiple_choice(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 256,
    separator: str | None = None,
    padding: str = "longest",
) -> datasets.Dataset:
    """One [num_choices, length] block of input_ids/attention_mask(/token_type_ids) per example, plus int labels.

    Each choice is the pair (context, question + separator + answer), truncated longest-first to `max_length`
    like the official CosmosQA script, whose separator is the tokenizer's sep token (" </s> "), the default
    here. The choices of one example are padded to their longest (padding="longest"; the collator pads across
    examples) or to `max_length` (padding="max_length").
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding={padding!r} is not supported; use 'longest' or 'max_length'.")
    if separator is None:
        separator = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
    names = _input_names(tokenizer)

    def features(examples: dict[str, list]) -> dict[str, list]:
        firsts, seconds, counts = [], [], []
        for context, question, choices in zip(
            examples["context"], examples["question"], examples["choices"], strict=True
        ):
            counts.append(len(choices))
            for choice in choices:
                firsts.append(context)
                seconds.append(f"{question}{separator}{choice}" if question.strip() else choice)
        encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        out: dict[str, list] = {name: [] for name in names}
        start = 0
        for count in counts:
            block = {name: encoded[name][start : start + count] for name in names}
            start += count
            padded = tokenizer.pad(block, padding=padding, max_length=max_length if padding == "max_length" else None)
            for name in names:
                out[name].append(padded[name])
        if "label" in examples:
            out["labels"] = [int(label) for label in examples["label"]]
        return out

    return dataset.map(features, batched=True, remove_columns=dataset.column_names, desc="Multiple-choice features")


__all__ = [
    "load_multiple_choice",
    "load_squad",
    "postprocess_squad_predictions",
    "preprocess_multiple_choice",
    "preprocess_squad_eval",
    "preprocess_squad_train",
]

"""Relation and entity data for K-Adapter: T-REx (factual adapter pretraining), TACRED (relation classification)
and Open Entity / FIGER (entity typing).

Loading validates every record with `load_records`, so a bad record is reported with its file, line and field
(or skipped and counted). Preprocessing inserts the official markers as WORDS ('@' around the subject or the
mention, '#' around the object), tokenizes the pre-split words with any fast tokenizer and finds each opening
marker's token position through `word_ids`, so the position is right for every subword scheme. A marker cut
away by truncation is an error (or a counted skip), never a wrong position.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from .records import (
    DataFormatError,
    DataReport,
    RecordError,
    check_on_error,
    first_subword_positions,
    insert_markers,
    load_records,
    prepare_word_tokenizer,
    require,
    require_label,
    require_span,
    require_tokens,
)

logger = logging.getLogger(__name__)

SUBJECT_MARKER = "@"
OBJECT_MARKER = "#"
ENTITY_MARKER = "@"

_PAIR_SPANS = (("subj_start", "subj_end", "subject"), ("obj_start", "obj_end", "object"))
_ENTITY_SPANS = (("ent_start", "ent_end", "entity"),)


class PreprocessingError(DataFormatError):
    """An example of a loaded dataset cannot become model inputs: the message names its index, the field and the fix.

    A subclass of `DataFormatError`, so one `except DataFormatError` covers loading and preprocessing."""

    def __init__(self, index: int | None, field_name: str, why: str, fix: str | None = None):
        where = "dataset" if index is None else f"example {index}"
        fix = fix or "Fix the example, or preprocess with on_error='skip' to drop such examples and count them."
        ValueError.__init__(self, f"{where}, field {field_name!r}: {why}. {fix}")
        self.path = None
        self.line = None
        self.index = index
        self.field = field_name
        self.why = why


# ----- loading -------------------------------------------------------------------------------------------------
def _optional_str(record: dict[str, Any], name: str) -> str:
    """Identifier-like fields (ids, entity types, Wikidata ids) are kept as strings; absent means ''."""
    value = record.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(name, f"expected str, got {type(value).__name__}")
    return str(value)


def _check_pair(record: dict[str, Any]) -> tuple[list[str], tuple[int, int], tuple[int, int]]:
    """Words plus inclusive subject/object word spans, in range and disjoint (crossing markers would be nonsense)."""
    words = require_tokens(record, "token")
    subject = require_span(record, "subj_start", "subj_end", len(words))
    obj = require_span(record, "obj_start", "obj_end", len(words))
    if subject[0] <= obj[1] and obj[0] <= subject[1]:
        raise RecordError("obj_start", f"the object span {list(obj)} overlaps the subject span {list(subject)}")
    return words, subject, obj


def _relation_label(record: dict[str, Any], label2id: Mapping[str, int] | None) -> str:
    relation = require(record, "relation", str)
    if not relation.strip():
        raise RecordError("relation", "empty label")
    return require_label(relation, "relation", label2id)


def _pair_validator(
    label2id: Mapping[str, int] | None, extra_fields: Sequence[str]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def validate(record: dict[str, Any]) -> dict[str, Any]:
        words, subject, obj = _check_pair(record)
        row: dict[str, Any] = {name: _optional_str(record, name) for name in extra_fields}
        row.update(
            token=words,
            subj_start=subject[0],
            subj_end=subject[1],
            obj_start=obj[0],
            obj_end=obj[1],
            relation=_relation_label(record, label2id),
        )
        return row

    return validate


def load_factual(
    path: str | Path,
    *,
    label2id: Mapping[str, int] | None = None,
    on_error: str = "raise",
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Load the official T-REx relation-classification records used to pretrain the factual adapter.

    Each record: `token` (words), inclusive word spans `subj_start`/`subj_end`/`obj_start`/`obj_end` and a
    `relation` id (e.g. "P31"); `id`, `docid`, `subj_label`, `obj_label` are kept when present (so rows dropped by
    a later `on_error="skip"` step can be told apart). With `label2id`, an
    unknown relation is a record error (so dev data cannot silently hold labels the model has no output for).
    """
    return load_records(
        path,
        _pair_validator(label2id, ("id", "docid", "subj_label", "obj_label")),
        on_error=on_error,
        report=report,
    )


def load_relation(
    path: str | Path,
    *,
    label2id: Mapping[str, int] | None = None,
    no_relation_keep: float = 1.0,
    no_relation_label: str = "no_relation",
    seed: int = 0,
    on_error: str = "raise",
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Load TACRED-style relation records (same span fields as T-REx, plus `id`, `subj_type`, `obj_type`).

    `no_relation_keep` < 1 keeps that fraction of the `no_relation_label` examples (exactly
    round(keep * count), chosen with `random.Random(seed)`, original order kept), as the official code thins
    negatives for training; the number dropped is counted as a note in `report`.
    """
    if not 0.0 <= no_relation_keep <= 1.0:
        raise ValueError(f"no_relation_keep={no_relation_keep} must be a fraction in [0, 1].")
    report = report if report is not None else DataReport()
    dataset = load_records(
        path, _pair_validator(label2id, ("id", "subj_type", "obj_type")), on_error=on_error, report=report
    )
    if no_relation_keep >= 1.0:
        return dataset
    relations = dataset["relation"]
    negatives = [i for i, relation in enumerate(relations) if relation == no_relation_label]
    chosen = set(random.Random(seed).sample(negatives, round(no_relation_keep * len(negatives))))
    keep = [i for i, relation in enumerate(relations) if relation != no_relation_label or i in chosen]
    dropped = len(relations) - len(keep)
    if dropped:
        report.note(f"{no_relation_label} dropped by subsampling (keep={no_relation_keep}, seed={seed})", dropped)
        dataset = dataset.select(keep).flatten_indices()
    if len(dataset) == 0:
        raise DataFormatError(str(path), 0, "<file>", f"no records left after subsampling {no_relation_label}")
    return dataset


def _entity_validator(
    label2id: Mapping[str, int] | None, report: DataReport
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def validate(record: dict[str, Any]) -> dict[str, Any]:
        sentence = require(record, "sent", str)
        if not sentence.strip():
            raise RecordError("sent", "empty text")
        start, end = require(record, "start", int), require(record, "end", int)
        if not 0 <= start < len(sentence):
            raise RecordError("start", f"{start} is outside the {len(sentence)} characters of 'sent'")
        if not start < end <= len(sentence):
            raise RecordError(
                "end", f"{end} is outside ({start}, {len(sentence)}] (end is an exclusive character offset)"
            )
        if not sentence[start:end].strip():
            raise RecordError("end", f"the mention sent[{start}:{end}] is only whitespace")
        labels = require(record, "labels", list)
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise RecordError("labels", f"expected non-empty strings, got {label!r}")
            require_label(label, "labels", label2id)
        if not labels:
            report.note("entity typing records with no labels (all-zero target)")
        left, mention, right = sentence[:start].split(), sentence[start:end].split(), sentence[end:].split()
        if (start > 0 and not sentence[start - 1].isspace() and not sentence[start].isspace()) or (
            end < len(sentence) and not sentence[end - 1].isspace() and not sentence[end].isspace()
        ):
            report.note("entity spans splitting a word (split there)")
        return {
            "id": _optional_str(record, "id"),
            "sent": sentence,
            "start": start,
            "end": end,
            "token": left + mention + right,
            "ent_start": len(left),
            "ent_end": len(left) + len(mention) - 1,
            "labels": list(dict.fromkeys(labels)),
        }

    return validate


def load_entity_typing(
    path: str | Path,
    *,
    label2id: Mapping[str, int] | None = None,
    on_error: str = "raise",
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Load Open Entity / FIGER records as the official code reads both: `sent`, character offsets `start` and
    `end` (exclusive) of the mention, `labels` (a list of type strings).

    The sentence is split on whitespace, with the mention boundaries as extra split points, into `token`
    plus the inclusive word span `ent_start`/`ent_end`; `sent`/`start`/`end` and `id` (when present) are kept. Words (not characters)
    make the markers tokenizer-independent and reuse the relation path; a boundary inside a word is noted
    in the report. An empty `labels` list is allowed (an all-zero target) and noted.
    """
    report = report if report is not None else DataReport()
    return load_records(path, _entity_validator(label2id, report), on_error=on_error, report=report)


def build_label_vocab(*datasets_: datasets.Dataset, field: str = "relation") -> dict[str, int]:
    """Label -> id over one or more datasets, sorted so the same data always gives the same ids; list-valued
    fields (entity typing `labels`) are flattened."""
    if not datasets_:
        raise ValueError("build_label_vocab needs at least one dataset.")
    labels: set[Any] = set()
    for dataset in datasets_:
        if field not in dataset.column_names:
            raise ValueError(f"field {field!r} is not a column of the dataset (columns: {dataset.column_names}).")
        for value in dataset[field]:
            if isinstance(value, (list, tuple)):
                labels.update(value)
            elif value is not None:
                labels.add(value)
    return {label: i for i, label in enumerate(sorted(labels, key=lambda v: (str(type(v)), v)))}


# ----- tokenization ------------------------------------------------------------------------------------------------
def _check_label_ids(label2id: Mapping[str, int]) -> None:
    if not label2id:
        raise ValueError("label2id is empty: build it with build_label_vocab(train_dataset, ...).")
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise ValueError("label2id ids must be 0 .. num_labels - 1, each used once.")


def _preprocess(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    span_fields: tuple[tuple[str, str, str], ...],
    markers: tuple[str, ...],
    position_names: tuple[str, ...],
    check: Callable[[dict[str, Any]], tuple[list[str], list[tuple[int, int]]]],
    encode_label: Callable[[dict[str, Any]], Any],
    label_feature: Any,
    max_length: int,
    on_error: str,
    report: DataReport | None,
    batch_size: int,
) -> datasets.Dataset:
    """Shared marker preprocessing: mark the spans, tokenize the words, map the markers to token positions."""
    check_on_error(on_error)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be a positive int.")
    tokenizer = prepare_word_tokenizer(tokenizer)
    report = report if report is not None else DataReport()
    input_names = list(tokenizer([["a"]], is_split_into_words=True).keys())
    features = datasets.Features({name: datasets.List(datasets.Value("int32")) for name in input_names})
    for name in position_names:
        features[name] = datasets.Value("int64")
    features["labels"] = label_feature
    keep_id = "id" in dataset.column_names
    if keep_id:
        features["id"] = datasets.Value("string")

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [{name: column[i] for name, column in batch.items()} for i in range(len(indices))]
        out: dict[str, list[Any]] = {name: [] for name in features}
        checked: list[tuple[list[str], list[int], list[int], Any] | RecordError] = []
        for row in rows:
            try:
                words, spans = check(row)
                label = encode_label(row)
            except RecordError as error:
                checked.append(error)
                continue
            marked, opening = insert_markers(words, [(s, e, m) for (s, e), m in zip(spans, markers, strict=True)])
            # Spans are disjoint, so a span's closing marker follows its words right after the opening one.
            closing = [begin + (e - s) + 2 for begin, (s, e) in zip(opening, spans, strict=True)]
            checked.append((marked, opening, closing, label))
        texts = [item[0] for item in checked if not isinstance(item, RecordError)]
        encoding = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length) if texts else {}
        done = 0
        for item, index, row in zip(checked, indices, rows, strict=True):
            report.read += 1
            try:
                if isinstance(item, RecordError):
                    raise item
                marked, opening, closing, label = item
                k, done = done, done + 1
                first = first_subword_positions(encoding.word_ids(k), encoding.sequence_ids(k))
                for (_start, _end, role), marker, opens, closes in zip(
                    span_fields, markers, opening, closing, strict=True
                ):
                    if opens not in first or closes not in first:
                        needed = len(tokenizer(marked, is_split_into_words=True)["input_ids"])
                        if needed <= max_length:  # not truncation: the tokenizer makes nothing of the marker
                            raise RecordError(
                                "token", f"the {role} marker {marker!r} gives no token with this tokenizer"
                            )
                        raise _Truncated(role, marker, needed)
            except RecordError as error:
                if on_error == "raise":
                    raise PreprocessingError(index, error.field, error.why) from None
                report.skip(f"{error.field}: {error.why}")
                continue
            except _Truncated as cut:
                if on_error == "raise":
                    raise PreprocessingError(
                        index,
                        "max_length",
                        f"the {cut.role} marker {cut.marker!r} was cut away by truncation to max_length={max_length} "
                        f"(the marked example needs {cut.needed} tokens)",
                        f"Raise max_length to at least {cut.needed}, or pass on_error='skip' to drop and count "
                        "such examples.",
                    ) from None
                report.skip(f"marker cut by truncation (max_length={max_length})")
                continue
            for name in input_names:
                out[name].append(encoding[name][k])
            for name, position in zip(position_names, opening, strict=True):
                out[name].append(first[position])
            out["labels"].append(label)
            if keep_id:
                out["id"].append("" if row["id"] is None else str(row["id"]))
            report.kept += 1
        return out

    result = dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        load_from_cache_file=False,
        desc="K-Adapter markers",
    )
    if report.skipped:
        logger.warning("preprocessing: %s", report.summary())
    if len(result) == 0:
        raise PreprocessingError(None, "<dataset>", "no example left after preprocessing", report.summary())
    return result


class _Truncated(Exception):
    def __init__(self, role: str, marker: str, needed: int):
        super().__init__(role)
        self.role, self.marker, self.needed = role, marker, needed


def _check_pair_row(row: dict[str, Any]) -> tuple[list[str], list[tuple[int, int]]]:
    words, subject, obj = _check_pair(row)
    return words, [subject, obj]


def _preprocess_pairs(dataset, tokenizer, label2id, max_length, on_error, report, batch_size) -> datasets.Dataset:
    _check_label_ids(label2id)

    def encode_label(row: dict[str, Any]) -> int:
        return label2id[require_label(row.get("relation"), "relation", label2id)]

    return _preprocess(
        dataset,
        tokenizer,
        span_fields=_PAIR_SPANS,
        markers=(SUBJECT_MARKER, OBJECT_MARKER),
        position_names=("subject_positions", "object_positions"),
        check=_check_pair_row,
        encode_label=encode_label,
        label_feature=datasets.Value("int64"),
        max_length=max_length,
        on_error=on_error,
        report=report,
        batch_size=batch_size,
    )


def preprocess_factual(
    dataset: datasets.Dataset,
    tokenizer: Any,
    label2id: Mapping[str, int],
    max_length: int = 64,
    on_error: str = "raise",
    report: DataReport | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """T-REx records -> inputs for `KAdapterForFactualPretraining`: '@' around the subject, '#' around the
    object; columns input_ids, attention_mask (token_type_ids when the tokenizer makes them),
    subject_positions / object_positions (the opening markers' token positions) and labels (int).

    max_length defaults to the official 64. An example whose markers do not all fit raises
    `PreprocessingError` (or, with on_error='skip', is dropped and counted in `report`; pass a fresh report:
    read/kept/skipped count this step's examples).
    """
    return _preprocess_pairs(dataset, tokenizer, label2id, max_length, on_error, report, batch_size)


def preprocess_relation(
    dataset: datasets.Dataset,
    tokenizer: Any,
    label2id: Mapping[str, int],
    max_length: int = 184,
    on_error: str = "raise",
    report: DataReport | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """TACRED records -> inputs for `KAdapterForRelationClassification` (same columns as `preprocess_factual`,
    plus the string `id` when the data has one). max_length defaults to the official TACRED 184."""
    return _preprocess_pairs(dataset, tokenizer, label2id, max_length, on_error, report, batch_size)


def _check_entity_row(row: dict[str, Any]) -> tuple[list[str], list[tuple[int, int]]]:
    words = require_tokens(row, "token")
    return words, [require_span(row, "ent_start", "ent_end", len(words))]


def preprocess_entity_typing(
    dataset: datasets.Dataset,
    tokenizer: Any,
    label2id: Mapping[str, int],
    max_length: int = 256,
    on_error: str = "raise",
    report: DataReport | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Entity typing records (from `load_entity_typing`) -> inputs for `KAdapterForEntityTyping`: '@' before
    and after the mention; columns input_ids, attention_mask (token_type_ids), entity_positions (the opening
    '@') and labels (a multi-hot float vector over `label2id`). max_length defaults to the official 256."""
    _check_label_ids(label2id)
    size = len(label2id)

    def encode_label(row: dict[str, Any]) -> list[float]:
        labels = row.get("labels")
        if not isinstance(labels, (list, tuple)):
            raise RecordError("labels", f"expected a list, got {type(labels).__name__}")
        target = [0.0] * size
        for label in labels:
            target[label2id[require_label(label, "labels", label2id)]] = 1.0
        return target

    return _preprocess(
        dataset,
        tokenizer,
        span_fields=_ENTITY_SPANS,
        markers=(ENTITY_MARKER,),
        position_names=("entity_positions",),
        check=_check_entity_row,
        encode_label=encode_label,
        label_feature=datasets.List(datasets.Value("float32")),
        max_length=max_length,
        on_error=on_error,
        report=report,
        batch_size=batch_size,
    )

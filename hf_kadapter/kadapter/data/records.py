"""Reading record files (JSON arrays or JSON Lines) with errors that name the file, line and field.

Every K-Adapter data format goes through `load_records`: a format-specific `validate` function checks and
normalises one record and raises `RecordError(field, why)`; `load_records` turns that into a
`DataFormatError` naming where it happened, or skips and counts the record when the caller asks for it.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


class RecordError(ValueError):
    """A record is malformed; raised by validators, located by `load_records`."""

    def __init__(self, field_name: str, why: str):
        super().__init__(f"field {field_name!r}: {why}")
        self.field = field_name
        self.why = why


class DataFormatError(ValueError):
    """A data file holds a malformed record: the message names the file, the line and the field."""

    def __init__(self, path: str, line: int, field_name: str, why: str):
        super().__init__(
            f"{path}, line {line}, field {field_name!r}: {why}. Fix the record, or load with on_error='skip' to "
            "skip malformed records and count them."
        )
        self.path = path
        self.line = line
        self.field = field_name


@dataclass
class DataReport:
    """What loading or preprocessing kept and skipped, and why (filled in when on_error='skip')."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1

    def note(self, what: str, count: int = 1) -> None:
        """Count something that was handled without dropping the record (e.g. a head cut by truncation)."""
        self.notes[what] += count

    def summary(self) -> str:
        parts = [f"read {self.read}, kept {self.kept}, skipped {self.skipped}"]
        parts += [f"{reason}: {count}" for reason, count in self.reasons.most_common()]
        parts += [f"{what}: {count}" for what, count in self.notes.most_common()]
        return "; ".join(parts)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not supported; use one of {ON_ERROR}.")


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, record) from a JSON Lines file or a JSON array file (line = where the record starts)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[":
        decoder = json.JSONDecoder()
        position = text.index("[") + 1
        while True:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position >= len(text) or text[position] == "]":
                return
            line = text.count("\n", 0, position) + 1
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise DataFormatError(str(path), line, "<json>", f"invalid JSON ({error.msg})") from error
            yield line, record
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as error:
                raise DataFormatError(str(path), line, "<json>", f"invalid JSON ({error.msg})") from error


def load_records(
    path: str | Path,
    validate: Callable[[dict[str, Any]], dict[str, Any] | list[dict[str, Any]]],
    *,
    on_error: str = "raise",
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Validate every record of `path` into a datasets.Dataset; a validator may expand one record into several."""
    check_on_error(on_error)
    report = report if report is not None else DataReport()
    rows: list[dict[str, Any]] = []
    for line, record in iter_json_records(path):
        report.read += 1
        try:
            if not isinstance(record, dict):
                raise RecordError("<record>", f"expected a JSON object, got {type(record).__name__}")
            result = validate(record)
        except RecordError as error:
            if on_error == "raise":
                raise DataFormatError(str(path), line, error.field, error.why) from None
            report.skip(f"{error.field}: {error.why}")
            continue
        new_rows = result if isinstance(result, list) else [result]
        rows.extend(new_rows)
        report.kept += 1
    if report.skipped:
        logger.warning("%s: %s", path, report.summary())
    if not rows:
        raise DataFormatError(str(path), 0, "<file>", "no usable records")
    return datasets.Dataset.from_list(rows)


# ----- field checks shared by the validators ------------------------------------------------------------------
def require(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise RecordError(name, "missing")
    value = record[name]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise RecordError(name, f"expected {getattr(kind, '__name__', kind)}, got bool")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(name, f"expected {expected}, got {type(value).__name__}")
    return value


def require_tokens(record: dict[str, Any], name: str) -> list[str]:
    tokens = require(record, name, list)
    if not tokens:
        raise RecordError(name, "empty text")
    if not all(isinstance(t, str) for t in tokens):
        raise RecordError(name, "expected a list of strings")
    return tokens


def require_span(record: dict[str, Any], start: str, end: str, length: int) -> tuple[int, int]:
    """An inclusive word span [start, end] inside a text of `length` words."""
    first, last = require(record, start, int), require(record, end, int)
    if not 0 <= first < length:
        raise RecordError(start, f"{first} is outside the {length} words")
    if not first <= last < length:
        raise RecordError(end, f"{last} is outside [{first}, {length}) (spans are inclusive word indices)")
    return first, last


def require_label(value: Any, field_name: str, label2id: dict[str, int] | None) -> Any:
    if label2id is not None and value not in label2id:
        known = ", ".join(sorted(map(str, label2id))[:8])
        raise RecordError(field_name, f"unknown label {value!r} (known: {known}, ...)")
    return value


# ----- markers and subword positions -------------------------------------------------------------------------
def insert_markers(words: list[str], spans: list[tuple[int, int, str]]) -> tuple[list[str], list[int]]:
    """Put `marker` before and after each inclusive word span; return the new words and, per span, the index
    of its opening marker in the new word list (the head reads the feature there)."""
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for i, (start, end, _marker) in enumerate(spans):
        before.setdefault(start, []).append(i)
        after.setdefault(end, []).append(i)
    marked: list[str] = []
    opening = [0] * len(spans)
    for position, word in enumerate(words):
        for i in before.get(position, []):
            opening[i] = len(marked)
            marked.append(spans[i][2])
        marked.append(word)
        for i in reversed(after.get(position, [])):
            marked.append(spans[i][2])
    return marked, opening


def first_subword_positions(word_ids: list[int | None], sequence_ids: list[int | None] | None = None) -> dict[int, int]:
    """word index -> position of its first subword (first sequence only when `sequence_ids` is given)."""
    positions: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is None or (sequence_ids is not None and sequence_ids[position] != 0):
            continue
        positions.setdefault(word, position)
    return positions


def require_fast_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: word-to-subword alignment needs one "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))."
        )


def _prefix_space_off(node: Any) -> bool:
    """Switch every byte-level pre-tokenizer in a serialized pre-tokenizer to add_prefix_space=True."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel" and not node.get("add_prefix_space", False):
        node["add_prefix_space"] = True
        return True
    if node.get("type") == "Sequence":
        return any([_prefix_space_off(child) for child in node.get("pretokenizers", [])])
    return False


def prepare_word_tokenizer(tokenizer: Any) -> Any:
    """A fast tokenizer that tokenizes pre-split words correctly.

    A byte-level BPE (RoBERTa, GPT-2, BART) without add_prefix_space glues pre-split words together
    ("Barack", "Obama" -> "BarackObama"): a COPY with the prefix space switched on is returned, so every word
    (each marker included) is tokenized as in running text (" Obama"); the caller's tokenizer is untouched.
    Any other fast tokenizer is returned as is.
    """
    require_fast_tokenizer(tokenizer)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _prefix_space_off(state.get("pre_tokenizer")):
        return tokenizer
    from tokenizers import Tokenizer

    fixed = copy.deepcopy(tokenizer)
    fixed._tokenizer = Tokenizer.from_str(json.dumps(state))
    if hasattr(fixed, "add_prefix_space"):
        fixed.add_prefix_space = True
    logger.info("%s: using a copy with add_prefix_space=True for pre-split words.", type(tokenizer).__name__)
    return fixed

"""Reading record files (JSON arrays or JSON Lines) with errors that name the file, line and field.

Every data format of the package goes through `load_records`: a format-specific `validate` function checks and
normalises one record and raises `RecordError(field, why)`; `load_records` turns that into a `DataFormatError`
naming where it happened, or skips and counts the record when the caller asks for it (on_error="skip"). Bytes that
are not UTF-8 and JSON Lines lines that are not JSON are record errors like any other: named, or skipped and
counted. (A JSON array that stops parsing cannot be skipped past: its error always stops the load.)
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
# Bytes that are not UTF-8 decode (errors="surrogateescape") to lone surrogates U+DC80..U+DCFF.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


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


def _undecodable(text: str) -> RecordError | None:
    """A RecordError for the first byte that was not UTF-8 in `text` (decoded with surrogateescape), if any."""
    found = _UNDECODABLE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return RecordError(
        "<encoding>", f"byte 0x{byte:02x} at column {found.start() + 1} is not UTF-8 (re-save the file as UTF-8)"
    )


def read_text(path: str | Path) -> str:
    """A data file's text; bytes that are not UTF-8 become lone surrogates (errors="surrogateescape"), so the record
    holding them can be named (`check_decoded`) or skipped instead of the whole file failing to decode."""
    return Path(path).read_bytes().decode("utf-8", errors="surrogateescape")


def check_decoded(value: Any) -> None:
    """Raise RecordError("<encoding>") when a string anywhere in a decoded JSON value came from bytes that are not
    UTF-8 (see read_text)."""
    if isinstance(value, str):
        bad = _undecodable(value)
        if bad is not None:
            raise bad
    elif isinstance(value, dict):
        for key, item in value.items():
            check_decoded(key)
            check_decoded(item)
    elif isinstance(value, list):
        for item in value:
            check_decoded(item)


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, record) from a JSON Lines file or a JSON array file (line = where the record starts).

    A record that cannot be read (bytes that are not UTF-8, a JSON Lines line that is not JSON) is yielded as a
    RecordError instead, so the caller can name it or skip it; a JSON array that stops parsing raises
    DataFormatError (nothing after it can be located).
    """
    path = Path(path)
    text = read_text(path)
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
            start = position
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                bad = _undecodable(text[start : error.pos + 1])
                why = bad.why if bad is not None else f"invalid JSON ({error.msg})"
                raise DataFormatError(str(path), text.count("\n", 0, error.pos) + 1, "<json>", why) from error
            bad = _undecodable(text[start:position])
            yield line, (bad if bad is not None else record)
    else:
        for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
            if not raw.strip():
                continue
            bad = _undecodable(raw)
            if bad is not None:
                yield line, bad
                continue
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as error:
                yield line, RecordError("<json>", f"invalid JSON ({error.msg}, column {error.colno})")


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
            if isinstance(record, RecordError):
                raise record
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


def require(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """record[name], checked to be of `kind` (a bool is not an int); RecordError naming the field otherwise."""
    if name not in record:
        raise RecordError(name, "missing")
    value = record[name]
    if isinstance(value, bool) and kind in (int, (int,)):
        raise RecordError(name, f"expected {getattr(kind, '__name__', kind)}, got bool")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(name, f"expected {expected}, got {type(value).__name__}")
    return value


__all__ = [
    "DataFormatError",
    "DataReport",
    "ON_ERROR",
    "RecordError",
    "check_decoded",
    "check_on_error",
    "iter_json_records",
    "load_records",
    "read_text",
    "require",
]

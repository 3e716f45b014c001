"""K-Adapter record helpers: field checks for word-level formats, markers and subword positions.

The general reading (JSON / JSON Lines, file/line/field errors, counted skips) lives in hf_kadapter.utils.records;
its names are re-exported here, where the K-Adapter loaders have always found them.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from ...utils.records import (
    ON_ERROR,
    DataFormatError,
    DataReport,
    RecordError,
    check_on_error,
    iter_json_records,
    load_records,
    require,
)

logger = logging.getLogger(__name__)


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


__all__ = [
    "ON_ERROR",
    "DataFormatError",
    "DataReport",
    "RecordError",
    "check_on_error",
    "first_subword_positions",
    "insert_markers",
    "iter_json_records",
    "load_records",
    "prepare_word_tokenizer",
    "require",
    "require_fast_tokenizer",
    "require_label",
    "require_span",
    "require_tokens",
]

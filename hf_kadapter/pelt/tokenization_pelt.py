"""PELT tokenizer hook: write " (" + slot + " )" after each linked entity mention.

PELT (Ye et al., ACL 2022) plugs an entity vector into the input by appending an entity slot after the mention:
"Most people with COVID-19 (<e>) have a dry cough". Here the slot is a token of the wrapped tokenizer (the mask
token by default): the plug replaces its input embedding by the entity vector, so no vocabulary change is needed,
and `entity_positions` says which tokens are slots (other mask tokens stay real masks).

Design: the hook REWRITES the text (inserting " (" + slot + " )" after each known mention), tokenizes the
rewritten string with offsets, and finds each slot token by its character offset. The output is therefore exactly
what the wrapped tokenizer gives for the rewritten string: no hand-assembled subword units that could disagree with
the tokenizer's own normalisation, pre-tokenization or BPE merges. Truncation is left to the tokenizer too; a slot
group that truncation would cut in half is removed from the rewritten string (its mention stays as plain text) and
the text is tokenized again, until every group is either whole or entirely cut away.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BatchEncoding
from transformers.utils import TensorType, cached_file

from ..utils.io import FolderCommit, read_json, reading_local

__all__ = ["AliasLinker", "PELTEncoding", "PELTTokenizer", "PELT_TOKENIZER_CONFIG_NAME"]

PELT_TOKENIZER_CONFIG_NAME = "pelt_tokenizer_config.json"
_FORMAT_VERSION = 1
_OPEN, _CLOSE = " (", " )"
_DOWNLOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "local_files_only",
    "subfolder",
)
# Word-level units for the linker: runs of word characters, or single punctuation characters. Whitespace never
# belongs to a unit, so a match always starts and ends at a word boundary.
_WORD = re.compile(r"\w+|[^\w\s]")


# ----- linker ----------------------------------------------------------------------------------------------------
class AliasLinker:
    """A simple dictionary linker: longest non-overlapping alias matches at word boundaries.

    `names_and_aliases` maps an entity id to its strings; the FIRST string of each list is taken as the entity's
    name. When two entities share a string, a name beats another entity's alias, and otherwise the entity listed
    first wins (deterministic, no silent randomness). Matching compares word units (`\\w+` runs and single
    punctuation characters): "Obama" never matches inside "Obamacare"; whitespace between units must be present in
    the text exactly where the alias has some (any amount), so "New York" matches "New  York" but "U.S." does not
    match "U. S.". Among overlapping candidates the longest (in characters) wins, then the leftmost.
    Scripts written without spaces (CJK) only match whole runs; use a real linker there.
    """

    def __init__(self, names_and_aliases: Mapping[str, Iterable[str | None]], case_sensitive: bool = False) -> None:
        self.case_sensitive = case_sensitive
        self._aliases: dict[tuple[str, ...], tuple[str, int, int]] = {}  # key -> (entity id, rank, entity order)
        self._prefixes: set[tuple[str, ...]] = set()
        self._max_units = 0
        for order, (entity_id, strings) in enumerate(names_and_aliases.items()):
            for rank, string in enumerate(strings or ()):
                if not string or not string.strip():
                    continue
                key = tuple(unit for _, _, unit in self._units(string))
                value = (entity_id, min(rank, 1), order)
                previous = self._aliases.get(key)
                if previous is None or value[1:] < previous[1:]:
                    self._aliases[key] = value
                for end in range(1, len(key) + 1):
                    self._prefixes.add(key[:end])
                self._max_units = max(self._max_units, len(key))

    @classmethod
    def from_table(cls, table: Any, case_sensitive: bool = False) -> AliasLinker:
        """Build from an entity table's vocabulary (duck-typed: `entity_ids`, `names`, `aliases`)."""
        mapping: dict[str, list[str]] = {}
        for entity_id, name, aliases in zip(table.entity_ids, table.names, table.aliases, strict=True):
            mapping[entity_id] = ([name] if name else []) + [alias for alias in aliases or () if alias]
        return cls(mapping, case_sensitive=case_sensitive)

    def __len__(self) -> int:
        return len(self._aliases)

    def __repr__(self) -> str:
        return f"AliasLinker({len(self)} aliases, case_sensitive={self.case_sensitive})"

    def _units(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, key) per word unit; the key carries a leading space when whitespace precedes the unit."""
        units: list[tuple[int, int, str]] = []
        previous_end: int | None = None
        for match in _WORD.finditer(text):
            unit = match.group() if self.case_sensitive else match.group().casefold()
            if previous_end is not None and match.start() > previous_end:
                unit = " " + unit
            units.append((match.start(), match.end(), unit))
            previous_end = match.end()
        return units

    def find(self, text: str) -> list[dict[str, Any]]:
        """Mentions in `text` as `{"char_start", "char_end", "entity_id"}` dicts, sorted by position."""
        units = self._units(text)
        candidates: list[tuple[int, int, str]] = []
        for i, (start, _, first) in enumerate(units):
            key: tuple[str, ...] = (first.lstrip(" "),)
            for j in range(i, min(len(units), i + self._max_units)):
                if j > i:
                    key = key + (units[j][2],)
                if key not in self._prefixes:
                    break
                if key in self._aliases:
                    candidates.append((start, units[j][1], self._aliases[key][0]))
        candidates.sort(key=lambda c: (c[0] - c[1], c[0]))
        taken = bytearray(len(text))
        chosen: list[tuple[int, int, str]] = []
        for start, end, entity_id in candidates:
            if not any(taken[start:end]):
                taken[start:end] = b"\x01" * (end - start)
                chosen.append((start, end, entity_id))
        return [{"char_start": s, "char_end": e, "entity_id": eid} for s, e, eid in sorted(chosen)]

    __call__ = find


# ----- encoding --------------------------------------------------------------------------------------------------
class PELTEncoding(BatchEncoding):
    """A BatchEncoding that also reports what the hook skipped, as ATTRIBUTES (not keys, so `model(**encoding)`
    never receives them): `unknown_entities` (mentions whose entity is not in the vocabulary, kept as plain text)
    and `truncated_entities` (slot groups dropped or cut away by truncation). Both are ints for a single text and
    per-example lists for a batch."""

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        encoding: Any = None,
        tensor_type: str | TensorType | None = None,
        n_sequences: int | None = None,
        unknown_entities: int | list[int] = 0,
        truncated_entities: int | list[int] = 0,
    ) -> None:
        super().__init__(data, encoding=encoding, tensor_type=tensor_type, n_sequences=n_sequences)
        self.unknown_entities = unknown_entities
        self.truncated_entities = truncated_entities

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(unknown_entities=self.unknown_entities, truncated_entities=self.truncated_entities)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.unknown_entities = state.get("unknown_entities", 0)
        self.truncated_entities = state.get("truncated_entities", 0)


@dataclass
class _Group:
    """One slot group to insert after a mention; char spans are filled in by rendering (rewritten text)."""

    mention_end: int
    row: int
    entity_id: str
    start: int = -1  # the space before "("
    slot_start: int = -1
    slot_end: int = -1
    end: int = -1  # one past ")"


# ----- tokenizer -------------------------------------------------------------------------------------------------
class PELTTokenizer:
    """Wrap a fast tokenizer so that entity mentions get a PELT slot: " (" + slot + " )" after each mention.

    `entity_vocab` gives the entity vocabulary: an EntityLookupTable (row = `table.index(entity_id)`; rows with
    count 0 have no vector and count as unknown), a mapping entity id -> row, or an iterable of entity ids
    (row = position). `slot_token` defaults to the wrapped tokenizer's mask token; it must be one token of that
    tokenizer. `linker` (for `link=True`) defaults to `AliasLinker.from_table(entity_vocab)` for a table.
    Unknown attributes (`mask_token_id`, `pad_token_id`, ...) are read from the wrapped tokenizer.
    """

    def __init__(
        self,
        tokenizer: Any,
        entity_vocab: Any = None,
        slot_token: str | None = None,
        linker: AliasLinker | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: the PELT hook locates slots by character "
                "offsets, which need one (AutoTokenizer.from_pretrained(..., use_fast=True))."
            )
        self.tokenizer = tokenizer
        self.slot_token = slot_token if slot_token is not None else tokenizer.mask_token
        if self.slot_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token: pass slot_token=.")
        self.slot_token_id = self._check_slot_token()
        self.entity_vocab = entity_vocab
        self._linker = linker
        self.stats: dict[str, int] = {}
        self.reset_stats()

    # -- vocabulary --
    @property
    def entity_vocab(self) -> Any:
        return self._entity_vocab

    @entity_vocab.setter
    def entity_vocab(self, vocab: Any) -> None:
        """Accept a table (looked up live, so entities added to it later are seen), a mapping or a list of ids."""
        self._entity_vocab = vocab
        self._rows: dict[str, int] | None = None
        if vocab is None or _is_table(vocab):
            return
        if isinstance(vocab, str):
            raise TypeError("entity_vocab must be an EntityLookupTable, a mapping id -> row or a list of ids, not str")
        if isinstance(vocab, Mapping):
            self._rows = {str(k): int(v) for k, v in vocab.items()}
            return
        vocab = list(vocab)
        self._entity_vocab = vocab
        rows: dict[str, int] = {}
        for row, entity_id in enumerate(vocab):
            if entity_id in rows:
                raise ValueError(f"entity_vocab lists entity {entity_id!r} twice (rows {rows[entity_id]} and {row})")
            rows[entity_id] = row
        self._rows = rows

    def _row(self, entity_id: str) -> int | None:
        """The entity's row, or None when it has no vector (absent, or never seen while building the table)."""
        if self._rows is not None:
            return self._rows.get(entity_id)
        table = self._entity_vocab
        try:
            row = int(table.index(entity_id))
        except KeyError:
            return None
        counts = getattr(table, "counts", None)
        if counts is not None and int(counts[row]) == 0:
            return None
        return row

    @property
    def linker(self) -> AliasLinker:
        if self._linker is None:
            if not _is_table(self._entity_vocab) or not hasattr(self._entity_vocab, "names"):
                raise ValueError(
                    "link=True needs entity names and aliases: pass linker=AliasLinker({...}) or an entity table "
                    "as entity_vocab."
                )
            self._linker = AliasLinker.from_table(self._entity_vocab)
        return self._linker

    @linker.setter
    def linker(self, linker: AliasLinker | None) -> None:
        self._linker = linker

    def reset_stats(self) -> None:
        """Zero the cumulative counters: texts (each side of a pair counts), mentions given or linked, slots
        written, unknown_entities (kept as plain text), truncated_entities (slot groups lost to truncation)."""
        self.stats = {"texts": 0, "mentions": 0, "slots": 0, "unknown_entities": 0, "truncated_entities": 0}

    def _check_slot_token(self) -> int:
        """Fail early (not at the first batch) when the slot would not come out as exactly one token."""
        tok = self.tokenizer
        slot_id = tok.convert_tokens_to_ids(self.slot_token)
        probe = "x" + _OPEN + self.slot_token + _CLOSE
        start = len("x" + _OPEN)
        enc = tok(probe, add_special_tokens=False, return_offsets_mapping=True)
        hits = [
            (i, token_id)
            for i, (token_id, (s, e)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
            if s < start + len(self.slot_token) and e > start
        ]
        if slot_id is None or slot_id == tok.unk_token_id or len(hits) != 1 or hits[0][1] != slot_id:
            raise ValueError(
                f"slot token {self.slot_token!r} is not a single token of {type(tok).__name__}: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.slot_token!r}]}}) (and resize "
                "the model's embeddings), or keep the default (the mask token)."
            )
        return int(slot_id)

    # -- planning --
    def _plan(self, text: str, entities: Any, link: bool, where: str) -> tuple[list[_Group], int, int]:
        """Validate mentions and pick the known ones; returns (groups, mentions, unknown)."""
        if not isinstance(text, str):
            raise TypeError(f"{where}: expected a str, got {type(text).__name__}")
        if link:
            if entities:
                raise ValueError(f"{where}: pass either entities or link=True, not both")
            entities = self.linker.find(text)
        if entities is None:
            return [], 0, 0
        if isinstance(entities, Mapping) or not isinstance(entities, Sequence):
            raise TypeError(f"{where}: entities must be a list of {{char_start, char_end, entity_id}} dicts")
        spans: list[tuple[int, int, str]] = []
        for mention in entities:
            if not isinstance(mention, Mapping):
                raise TypeError(
                    f"{where}: each mention must be a dict {{char_start, char_end, entity_id}}, got "
                    f"{type(mention).__name__} (for a batch, pass one list of mentions per text)"
                )
            missing = [key for key in ("char_start", "char_end", "entity_id") if key not in mention]
            if missing:
                raise ValueError(f"{where}: mention {dict(mention)} lacks {missing}")
            start, end, entity_id = mention["char_start"], mention["char_end"], mention["entity_id"]
            if not isinstance(entity_id, str):
                raise TypeError(f"{where}: entity ids are strings, got {entity_id!r} for span [{start}, {end})")
            integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
            if not (integers and 0 <= start < end <= len(text)):
                raise ValueError(
                    f"{where}: mention span [{start}, {end}) of {entity_id!r} is not within the text "
                    f"(length {len(text)}) or is empty"
                )
            spans.append((start, end, entity_id))
        spans.sort()
        for (s0, e0, id0), (s1, e1, id1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise ValueError(
                    f"{where}: mentions overlap: [{s0}, {e0}) {text[s0:e0]!r} ({id0}) and [{s1}, {e1}) "
                    f"{text[s1:e1]!r} ({id1})"
                )
        groups: list[_Group] = []
        unknown = 0
        for _, end, entity_id in spans:
            row = self._row(entity_id)
            if row is None:
                unknown += 1
            else:
                groups.append(_Group(mention_end=end, row=row, entity_id=entity_id))
        return groups, len(spans), unknown

    def _render(self, text: str, groups: list[_Group]) -> str:
        """The rewritten text; records each group's character spans in it."""
        pieces: list[str] = []
        cursor = 0
        length = 0
        for group in groups:
            chunk = text[cursor : group.mention_end]
            pieces.append(chunk)
            length += len(chunk)
            group.start = length
            group.slot_start = length + len(_OPEN)
            group.slot_end = group.slot_start + len(self.slot_token)
            group.end = group.slot_end + len(_CLOSE)
            pieces.append(_OPEN + self.slot_token + _CLOSE)
            length = group.end
            cursor = group.mention_end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def rewrite(self, text: str, entities: Any = None, link: bool = False) -> str:
        """The string the hook tokenizes (before truncation): "Obama ( [MASK] ) was born ..."."""
        groups, _, _ = self._plan(text, entities, link, "text")
        return self._render(text, groups)

    # -- encoding --
    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        entities: Any = None,
        entities_pair: Any = None,
        link: bool = False,
        padding: bool | str = False,
        truncation: bool | str | None = False,
        max_length: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs: Any,
    ) -> PELTEncoding:
        """Tokenize with slots. `entities` (and `entities_pair`) is a list of mention dicts for a single text, or
        one such list (or None) per text for a batch. Extra keyword arguments go to the wrapped tokenizer.

        Returns input_ids, attention_mask (+ token_type_ids when the tokenizer gives them), `entity_positions`
        (token index of each slot, in token order) and `entity_ids` (its entity-vocabulary row): flat lists for a
        single text, one (unpadded) list per text for a batch, or LongTensors [batch, max_entities] padded with -1
        when `return_tensors` is set.
        """
        for key in ("is_split_into_words", "return_overflowing_tokens", "stride"):
            if kwargs.get(key):
                raise ValueError(f"PELTTokenizer does not support {key}= (slots are placed in running text)")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = None if text_pair is None else ([text_pair] if single else list(text_pair))
        if pairs is not None and (isinstance(text_pair, str) != single or len(pairs) != len(texts)):
            raise ValueError("text_pair must be a str for a single text, or a list as long as the batch")
        side_entities = [_per_text(entities, single, len(texts), "entities")]
        sides = [texts]
        if pairs is not None:
            side_entities.append(_per_text(entities_pair, single, len(texts), "entities_pair"))
            sides.append(pairs)
        elif entities_pair is not None:
            raise ValueError("entities_pair given without text_pair")

        # groups[side][b]: the slot groups of text b of that side, in text order
        groups: list[list[list[_Group]]] = []
        unknown = [0] * len(texts)
        mentions = 0
        for side, (side_texts, side_mentions) in enumerate(zip(sides, side_entities, strict=True)):
            name = "text" if side == 0 else "text_pair"
            planned = []
            for b, (string, items) in enumerate(zip(side_texts, side_mentions, strict=True)):
                found, count, missing = self._plan(string, items, link, f"{name} {b}")
                planned.append(found)
                mentions += count
                unknown[b] += missing
            groups.append(planned)

        user_offsets = bool(kwargs.pop("return_offsets_mapping", False))
        dropped = [0] * len(texts)
        while True:
            rendered = [
                [self._render(string, found) for string, found in zip(side_texts, side_groups, strict=True)]
                for side_texts, side_groups in zip(sides, groups, strict=True)
            ]
            try:
                encoded = self.tokenizer(
                    rendered[0],
                    rendered[1] if pairs is not None else None,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    return_offsets_mapping=True,
                    **kwargs,
                )
            except Exception as error:  # the Rust tokenizer raises a bare Exception for impossible truncation
                if "Truncation error" not in str(error):
                    raise
                raise ValueError(
                    f"text: truncation={truncation!r} cannot fit max_length={max_length}: the text that may not be cut "
                    "is already longer (each entity slot adds 3 tokens). Raise max_length or use "
                    "truncation='longest_first'."
                ) from None
            positions, rows, cut_away, changed = self._locate(encoded, groups, dropped)
            if not changed:
                break

        data = {k: v for k, v in encoded.items() if k != "offset_mapping" or user_offsets}
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        entity_fields = {"entity_positions": positions, "entity_ids": rows}
        if return_tensors is None:
            data.update({k: (v[0] if single else v) for k, v in entity_fields.items()})
        truncated = [d + c for d, c in zip(dropped, cut_away, strict=True)]
        result = PELTEncoding(
            data,
            encoding=encoded.encodings,
            tensor_type=return_tensors,
            n_sequences=encoded.n_sequences,
            unknown_entities=unknown[0] if single else unknown,
            truncated_entities=truncated[0] if single else truncated,
        )
        if return_tensors is not None:
            for key, value in entity_fields.items():
                result[key] = _padded(value, return_tensors)
        self.stats["texts"] += len(texts) * len(sides)
        self.stats["mentions"] += mentions
        self.stats["slots"] += sum(len(p) for p in positions)
        self.stats["unknown_entities"] += sum(unknown)
        self.stats["truncated_entities"] += sum(truncated)
        return result

    def _locate(
        self, encoded: BatchEncoding, groups: list[list[list[_Group]]], dropped: list[int]
    ) -> tuple[list[list[int]], list[list[int]], list[int], bool]:
        """Slot token of each whole group; drops (in place) every group truncation cut in half.

        A group is whole when tokens cover its "(", its slot (one token with the slot id) and its ")"; it is cut
        away when no token of the sequence touches its span; anything else is half a group.
        """
        positions: list[list[int]] = []
        rows: list[list[int]] = []
        cut_away = [0] * len(dropped)
        changed = False
        for b, encoding in enumerate(encoded.encodings):
            found: list[tuple[int, int]] = []
            for side, side_groups in enumerate(groups):
                tokens = [
                    (i, token_id, s, e)
                    for i, (token_id, (s, e), seq) in enumerate(
                        zip(encoding.ids, encoding.offsets, encoding.sequence_ids, strict=True)
                    )
                    if seq == side
                ]
                keep: list[_Group] = []
                for group in side_groups[b]:
                    touching = [t for t in tokens if _touches(t[2], t[3], group.start, group.end)]
                    slots = [t for t in touching if t[1] == self.slot_token_id and t[3] > group.slot_start]
                    slots = [t for t in slots if t[2] < group.slot_end]
                    has_open = any(s <= group.slot_start - 1 < e for _, _, s, e in touching)
                    has_close = any(s <= group.end - 1 < e for _, _, s, e in touching)
                    if not touching:
                        cut_away[b] += 1
                        keep.append(group)
                    elif has_open and has_close and len(slots) == 1:
                        found.append((slots[0][0], group.row))
                        keep.append(group)
                    else:
                        dropped[b] += 1
                        changed = True
                side_groups[b] = keep
            found.sort()
            positions.append([p for p, _ in found])
            rows.append([r for _, r in found])
        return positions, rows, cut_away, changed

    # -- passthroughs --
    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def convert_ids_to_tokens(self, ids: Any, **kwargs: Any) -> Any:
        return self.tokenizer.convert_ids_to_tokens(ids, **kwargs)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        return self.tokenizer.convert_tokens_to_ids(tokens)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally; guard against recursion before __init__ ran (copy/pickle).
        if name.startswith("__") or "tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["tokenizer"], name)

    def __repr__(self) -> str:
        size = None if self._entity_vocab is None else len(self._entity_vocab)
        return f"PELTTokenizer({type(self.tokenizer).__name__}, slot_token={self.slot_token!r}, entities={size})"

    # -- persistence --
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Save the wrapped tokenizer plus pelt_tokenizer_config.json (slot token; the ids of a plain-list entity
        vocabulary — a table is saved on its own with its save_pretrained), as one folder commit."""
        directory = Path(save_directory)
        with FolderCommit(directory) as staging:
            written = self.tokenizer.save_pretrained(str(staging), **kwargs)
            config: dict[str, Any] = {"format_version": _FORMAT_VERSION, "slot_token": self.slot_token}
            if self._rows is not None:
                config["entity_vocab"] = self._rows
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            (staging / PELT_TOKENIZER_CONFIG_NAME).write_text(text, encoding="utf-8")
        files = tuple(str(directory / Path(f).relative_to(staging)) for f in written)
        return (*files, str(directory / PELT_TOKENIZER_CONFIG_NAME))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        entity_vocab: Any = None,
        linker: AliasLinker | None = None,
        **kwargs: Any,
    ) -> PELTTokenizer:
        """Load the wrapped tokenizer with AutoTokenizer (keyword arguments pass through) and the slot token from
        pelt_tokenizer_config.json when present (else the mask token); a saved plain-list vocabulary is used
        unless `entity_vocab` is given."""
        with reading_local(pretrained_model_name_or_path):
            return cls._from_pretrained(pretrained_model_name_or_path, entity_vocab, linker, **kwargs)

    @classmethod
    def _from_pretrained(cls, pretrained_model_name_or_path, entity_vocab, linker, **kwargs: Any) -> PELTTokenizer:
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
        resolved = cached_file(
            pretrained_model_name_or_path,
            PELT_TOKENIZER_CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **download,
        )
        config: dict[str, Any] = {}
        if resolved is not None:
            config = read_json(resolved)
            if config.get("format_version", 1) > _FORMAT_VERSION:
                raise ValueError(
                    f"{resolved}: format_version {config['format_version']} is newer than this hf_kadapter "
                    f"understands ({_FORMAT_VERSION}); upgrade hf_kadapter."
                )
        if entity_vocab is None:
            entity_vocab = config.get("entity_vocab")
        return cls(tokenizer, entity_vocab=entity_vocab, slot_token=config.get("slot_token"), linker=linker)


# ----- helpers ---------------------------------------------------------------------------------------------------
def _is_table(vocab: Any) -> bool:
    return hasattr(vocab, "index") and hasattr(vocab, "entity_ids") and not isinstance(vocab, (list, tuple))


def _touches(start: int, end: int, lo: int, hi: int) -> bool:
    """Whether a token's offsets fall in [lo, hi) (zero-width tokens count when they sit inside)."""
    if start == end:
        return lo <= start < hi
    return start < hi and end > lo


def _per_text(entities: Any, single: bool, batch: int, name: str) -> list[Any]:
    """Mentions per text: one list for a single text, `batch` lists (or None) for a batch."""
    if single:
        return [entities]
    if entities is None:
        return [None] * batch
    if isinstance(entities, Mapping) or not isinstance(entities, Sequence) or len(entities) != batch:
        raise ValueError(f"{name}: for a batch of {batch} texts pass one list of mentions (or None) per text")
    return list(entities)


def _padded(values: list[list[int]], return_tensors: str | TensorType) -> Any:
    """[batch, max_entities] int64 padded with -1 (built directly so an empty batch keeps an integer dtype)."""
    width = max((len(v) for v in values), default=0)
    rows = [v + [-1] * (width - len(v)) for v in values]
    kind = TensorType(return_tensors)
    if kind == TensorType.PYTORCH:
        import torch

        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)
    if kind == TensorType.NUMPY:
        import numpy as np

        return np.asarray(rows, dtype=np.int64).reshape(len(rows), width)
    return BatchEncoding({"x": rows}, tensor_type=return_tensors)["x"]

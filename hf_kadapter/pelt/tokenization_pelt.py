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

Character and word methods speak the CALLER's text, not the rewritten one: `offset_mapping`, `word_ids()`,
`char_to_token()`, `token_to_chars()` ... of the returned encoding are mapped back through the inserted groups
(`OriginalTextEncoding`), so a span or label aligned on the original text lands on the right tokens. Tokens made
only of inserted characters (the " (", slot and " )" of a group) map like special tokens: offsets (0, 0), word id
None, no characters; a token that mixes inserted and original characters (byte-level BPE can merge " )" with a
following "." into one token) maps to its original characters only.

Cost: the slots are located by bisection over the token offsets (tokens are ordered by character), so the hook
is linear in text length and in the number of mentions; the mapping back is computed lazily, when asked for.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BatchEncoding
from transformers.utils import TensorType, cached_file

from ..utils.hub import DOWNLOAD_KWARGS
from ..utils.io import FolderCommit, read_json, reading_local

__all__ = ["AliasLinker", "OriginalTextEncoding", "PELTEncoding", "PELTTokenizer", "PELT_TOKENIZER_CONFIG_NAME"]

PELT_TOKENIZER_CONFIG_NAME = "pelt_tokenizer_config.json"
_FORMAT_VERSION = 1
_OPEN, _CLOSE = " (", " )"
_DOWNLOAD_KWARGS = (*DOWNLOAD_KWARGS, "proxies", "subfolder")
# Word-level units for the linker: runs of word characters, or single punctuation characters. Whitespace never
# belongs to a unit, so a match always starts and ends at a word boundary.
_WORD = re.compile(r"\w+|[^\w\s]")
_END = itemgetter(1)


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


class OriginalTextEncoding:
    """One example's encoding whose character and word methods refer to the caller's ORIGINAL text.

    The hook tokenizes a rewritten text (slot groups inserted); this wraps that `tokenizers.Encoding` (kept as
    `rewritten`, with the strings in `rewritten_texts`) and maps offsets, word ids and character lookups back
    through the insertions. It has the interface `BatchEncoding` delegates to (`offsets`, `word_ids`,
    `char_to_token`, `token_to_chars`, `char_to_word`, `word_to_tokens`, `word_to_chars`, ...), so
    `encoding.char_to_token(i)` or `encoding.word_ids(b)` on the hook's output just work.

    Inserted tokens (a group's " (", slot and " )") get offsets (0, 0) and word id None, as special tokens do:
    label-alignment code that skips special tokens skips them too, and `char_to_token` never returns them.
    Words are the wrapped tokenizer's words of the rewritten text with the inserted-only ones removed, so their
    indices count the original text's words; a mention ending inside a word (``Obama|care``) splits that word in
    two. The mapping is computed on first use and cached.
    """

    def __init__(
        self,
        rewritten: Any,
        groups: list[_Groups],
        size: int,
        text_lengths: list[int],
        rewritten_texts: tuple[str, ...],
        rewritten_offsets: list[tuple[int, int]] | None = None,
    ) -> None:
        self.rewritten = rewritten
        self.rewritten_texts = rewritten_texts
        self._insertions = [side.ends for side in groups]  # per side: original position of each group, in order
        self._size = size  # characters per group
        self._text_lengths = text_lengths  # per side, of the original text
        self._rewritten_offsets = rewritten_offsets
        self._starts: list[list[int]] = []  # per side: [start, end) of each group in the rewritten text
        self._ends: list[list[int]] = []
        self._offsets: list[tuple[int, int]] | None = None
        self._word_ids: list[int | None] | None = None
        self._dropped: list[list[int]] = []  # per side: rewritten word ids made only of inserted tokens
        self._touched: list[list[tuple[int, int, list[bool]]]] = []  # per side and group: tokens touching it

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_offsets", "_word_ids", "_dropped", "_touched")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _offsets=None, _word_ids=None, _dropped=[], _touched=[])

    # -- passthroughs (unchanged by the insertions) --
    @property
    def ids(self) -> list[int]:
        return self.rewritten.ids

    @property
    def type_ids(self) -> list[int]:
        return self.rewritten.type_ids

    @property
    def attention_mask(self) -> list[int]:
        return self.rewritten.attention_mask

    @property
    def special_tokens_mask(self) -> list[int]:
        return self.rewritten.special_tokens_mask

    @property
    def tokens(self) -> list[str]:
        return self.rewritten.tokens

    @property
    def sequence_ids(self) -> list[int | None]:
        return self.rewritten.sequence_ids

    @property
    def n_sequences(self) -> int:
        return self.rewritten.n_sequences

    @property
    def overflowing(self) -> list[Any]:
        return self.rewritten.overflowing

    def __len__(self) -> int:
        return len(self.rewritten)

    def __repr__(self) -> str:
        return f"OriginalTextEncoding(num_tokens={len(self)}, groups={[len(side) for side in self._insertions]})"

    def token_to_sequence(self, token_index: int) -> int | None:
        return self.rewritten.token_to_sequence(token_index)

    # -- mapped --
    @property
    def offsets(self) -> list[tuple[int, int]]:
        """Per token (start, end) in the original text of its sequence; (0, 0) for special and inserted tokens."""
        if self._offsets is None:
            self._remap_offsets()
        return self._offsets

    @property
    def word_ids(self) -> list[int | None]:
        """Per token its word in the original text; None for special and inserted tokens."""
        if self._word_ids is None:
            self._remap_words()
        return self._word_ids

    words = word_ids

    def token_to_word(self, token_index: int) -> int | None:
        return self.word_ids[token_index]

    def token_to_chars(self, token_index: int) -> tuple[int, int] | None:
        """(start, end) in the original text, or None for special and inserted tokens."""
        if self.rewritten.token_to_sequence(token_index) is None or self.word_ids[token_index] is None:
            return None
        return self.offsets[token_index]

    def char_to_token(self, char_pos: int, sequence_index: int = 0) -> int | None:
        """The token covering character `char_pos` of the original text (never an inserted token)."""
        position = self._to_rewritten(char_pos, sequence_index)
        return None if position is None else self.rewritten.char_to_token(position, sequence_index)

    def char_to_word(self, char_pos: int, sequence_index: int = 0) -> int | None:
        position = self._to_rewritten(char_pos, sequence_index)
        if position is None:
            return None
        word = self.rewritten.char_to_word(position, sequence_index)
        if word is None:
            return None
        self.word_ids  # noqa: B018  (computes the dropped words)
        return word - bisect_left(self._dropped[sequence_index], word)

    def word_to_tokens(self, word_index: int, sequence_index: int = 0) -> tuple[int, int] | None:
        """(first, last + 1) token of the word, inserted tokens excluded."""
        word_ids, sequence_ids = self.word_ids, self.rewritten.sequence_ids
        word = self._to_rewritten_word(word_index, sequence_index)
        span = self.rewritten.word_to_tokens(word, sequence_index)
        if span is None:
            return None
        start, end = span
        while start < end and word_ids[start] is None:
            start += 1
        while end > start and word_ids[end - 1] is None:
            end -= 1
        if start == end or sequence_ids[start] != sequence_index:
            return None
        return start, end

    def word_to_chars(self, word_index: int, sequence_index: int = 0) -> tuple[int, int] | None:
        span = self.word_to_tokens(word_index, sequence_index)
        if span is None:
            return None
        return self.offsets[span[0]][0], self.offsets[span[1] - 1][1]

    # -- mapping internals --
    def _to_rewritten(self, char_pos: int, side: int) -> int | None:
        if not 0 <= side < len(self._text_lengths) or not 0 <= char_pos < self._text_lengths[side]:
            return None
        # a group is inserted right after its mention: characters from the mention's end on move right
        return char_pos + bisect_right(self._insertions[side], char_pos) * self._size

    def _to_rewritten_word(self, word_index: int, side: int) -> int:
        self.word_ids  # noqa: B018
        word = word_index
        for dropped in self._dropped[side] if side < len(self._dropped) else ():
            if dropped > word:
                break
            word += 1
        return word

    def _original_span(self, side: int, start: int, end: int) -> tuple[int, int] | None:
        """A rewritten-text span mapped to the original characters it covers; None when all are inserted."""
        starts, ends, size = self._starts[side], self._ends[side], self._size
        j = bisect_right(starts, start) - 1
        first, before_first = start, j + 1
        if j >= 0 and start < ends[j]:
            first = ends[j]
        if start == end:  # zero-width token
            return None if first != start else (first - before_first * size, first - before_first * size)
        last = end - 1
        k = bisect_right(starts, last) - 1
        before_last = k + 1
        if k >= 0 and last < ends[k]:
            last, before_last = starts[k] - 1, k
        if first > last:
            return None
        return first - before_first * size, last - before_last * size + 1

    def _remap_offsets(self) -> None:
        """Offsets on the original text. Tokens between two groups move by a constant; only the few tokens that
        touch a group are looked at one by one (recorded in `_touched` for the word pass)."""
        offsets = self._rewritten_offsets if self._rewritten_offsets is not None else self.rewritten.offsets
        size = self._size
        self._starts = [[end + k * size for k, end in enumerate(side)] for side in self._insertions]
        self._ends = [[start + size for start in side] for side in self._starts]
        self._touched = []
        new_offsets = list(offsets)
        sequence_ids = self.rewritten.sequence_ids if any(self._insertions) else []
        for side, (starts, ends) in enumerate(zip(self._starts, self._ends, strict=True)):
            touched: list[tuple[int, int, list[bool]]] = []  # per group: its tokens, which are inserted-only
            self._touched.append(touched)
            if not starts:
                continue
            low, high = _side_range(sequence_ids, side)
            cursor = low
            for k in range(len(starts) + 1):
                if k < len(starts):
                    start, end = starts[k], ends[k]
                    first, last = _touching(offsets, cursor, high, start, end)
                else:
                    first, last = high, high
                if k:  # tokens after group k - 1 and before group k: one constant shift
                    shift = k * size
                    new_offsets[cursor:first] = [(s - shift, e - shift) for s, e in offsets[cursor:first]]
                if k == len(starts):
                    break
                inserted = []
                for i in range(first, last):
                    token_start, token_end = offsets[i]
                    span = None
                    if not (start <= token_start and token_end <= end):  # mixes inserted and original characters
                        span = self._original_span(side, token_start, token_end)
                    new_offsets[i] = (0, 0) if span is None else span
                    inserted.append(span is None)
                touched.append((first, last, inserted))
                cursor = last
        self._offsets = new_offsets

    def _remap_words(self) -> None:
        """Word ids on the original text: inserted tokens get None, and words made only of inserted tokens are
        taken out of the numbering (`_dropped`, per side)."""
        words = self.rewritten.word_ids
        self._dropped = [[] for _ in self._insertions]
        if not any(self._insertions):
            self._word_ids = list(words)
            return
        self.offsets  # noqa: B018  (classifies the tokens that touch a group)
        new_words = list(words)
        sequence_ids = self.rewritten.sequence_ids
        for side, touched in enumerate(self._touched):
            if not touched:
                continue
            dropped = self._dropped[side]
            low, high = _side_range(sequence_ids, side)
            cursor = low
            groups = [*touched, (high, high, [])]
            for k, (first, last, inserted) in enumerate(groups):
                if dropped:
                    shift = len(dropped)
                    new_words[cursor:first] = [None if w is None else w - shift for w in words[cursor:first]]
                if first == high:
                    break
                group_words = {words[i] for i, flag in zip(range(first, last), inserted, strict=True) if flag}
                if group_words:
                    # a word that goes on past the group (" )" + "." pre-tokenized together) is not dropped
                    kept = {words[i] for i, flag in zip(range(first, last), inserted, strict=True) if not flag}
                    if first > low:
                        kept.add(words[first - 1])
                    following, _, following_inserted = groups[k + 1]
                    if last < high and not (following == last and following_inserted and following_inserted[0]):
                        kept.add(words[last])
                    dropped.extend(sorted(w for w in group_words - kept if w is not None))
                for i, flag in zip(range(first, last), inserted, strict=True):
                    if flag:
                        new_words[i] = None
                    elif words[i] is not None:
                        new_words[i] = words[i] - bisect_left(dropped, words[i])
                cursor = last
        self._word_ids = new_words


class _Groups:
    """The slot groups of one text, in text order, as parallel lists (cheap to build, filter and render).

    Group k is inserted at original position `ends[k]` (its mention's end); in the rewritten text it spans
    [ends[k] + k * size, ends[k] + (k + 1) * size), `size` being the length of " (" + slot + " )".
    """

    __slots__ = ("ends", "rows")

    def __init__(self, ends: list[int], rows: list[int]) -> None:
        self.ends = ends
        self.rows = rows

    def __len__(self) -> int:
        return len(self.ends)

    def starts(self, size: int) -> list[int]:
        """Start of each group in the rewritten text."""
        return [end + k * size for k, end in enumerate(self.ends)]

    def render(self, text: str, insert: str) -> str:
        if not self.ends:
            return text
        bounds = [0, *self.ends, len(text)]
        return insert.join([text[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)])


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
        self._table_linker: tuple[int, AliasLinker] | None = None  # (table size when built, linker)
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
    def _insert(self) -> str:
        """What the hook writes after a mention."""
        return _OPEN + self.slot_token + _CLOSE

    @property
    def linker(self) -> AliasLinker:
        """The linker for `link=True`: the one given, else one over the table's names and aliases (rebuilt when
        entities are added to the table, so new names are found)."""
        if self._linker is not None:
            return self._linker
        table = self._entity_vocab
        if not _is_table(table) or not hasattr(table, "names"):
            raise ValueError(
                "link=True needs entity names and aliases: pass linker=AliasLinker({...}) or an entity table "
                "as entity_vocab."
            )
        if self._table_linker is None or self._table_linker[0] != len(table.entity_ids):
            self._table_linker = (len(table.entity_ids), AliasLinker.from_table(table))
        return self._table_linker[1]

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
        # the ids of the tokens around the slot in running text: a cheap first check that a group came out whole
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        paren, close = start - 1, start + len(self.slot_token) + len(_CLOSE) - 1
        slot = hits[0][0]
        self._open_id = ids[slot - 1] if slot > 0 and offsets[slot - 1][0] <= paren < offsets[slot - 1][1] else None
        after = slot + 1 < len(ids) and offsets[slot + 1][0] <= close < offsets[slot + 1][1]
        self._close_id = ids[slot + 1] if after else None
        return int(slot_id)

    # -- planning --
    def _plan(self, text: str, entities: Any, link: bool, where: str) -> tuple[_Groups, int, int]:
        """Validate mentions and pick the known ones; returns (groups, mentions, unknown)."""
        if not isinstance(text, str):
            raise TypeError(f"{where}: expected a str, got {type(text).__name__}")
        if link:
            if entities:
                raise ValueError(f"{where}: pass either entities or link=True, not both")
            entities = self.linker.find(text)
        if entities is None:
            return _Groups([], []), 0, 0
        if isinstance(entities, Mapping) or not isinstance(entities, Sequence):
            raise TypeError(f"{where}: entities must be a list of {{char_start, char_end, entity_id}} dicts")
        spans: list[tuple[int, int, str]] = []
        length = len(text)
        for mention in entities:
            # fast path for well-formed dicts; anything else goes through the checks that name the problem
            if type(mention) is dict:
                start, end, entity_id = (
                    mention.get("char_start"),
                    mention.get("char_end"),
                    mention.get("entity_id"),
                )
                if type(start) is int and type(end) is int and type(entity_id) is str and 0 <= start < end <= length:
                    spans.append((start, end, entity_id))
                    continue
            spans.append(_checked_mention(mention, length, where))
        spans.sort()
        for (s0, e0, id0), (s1, e1, id1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise ValueError(
                    f"{where}: mentions overlap: [{s0}, {e0}) {text[s0:e0]!r} ({id0}) and [{s1}, {e1}) "
                    f"{text[s1:e1]!r} ({id1})"
                )
        lookup = self._rows.get if self._rows is not None else self._row
        ends: list[int] = []
        rows: list[int] = []
        for _, end, entity_id in spans:
            row = lookup(entity_id)
            if row is not None:
                ends.append(end)
                rows.append(row)
        return _Groups(ends, rows), len(spans), len(spans) - len(ends)

    def rewrite(self, text: str, entities: Any = None, link: bool = False) -> str:
        """The string the hook tokenizes (before truncation): "Obama ( [MASK] ) was born ..."."""
        groups, _, _ = self._plan(text, entities, link, "text")
        return groups.render(text, self._insert)

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
        groups: list[list[_Groups]] = []
        unknown = [0] * len(texts)
        mentions = 0
        if link and not len(self.linker):
            warnings.warn(
                f"link=True but the linker has no names or aliases to match ({self.linker!r}): nothing is linked. "
                "Give the table names/aliases (entity_names= when building it), or pass linker=AliasLinker({...}) "
                "or explicit entities=.",
                UserWarning,
                stacklevel=2,
            )
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
        insert = self._insert
        dropped = [0] * len(texts)
        while True:
            rendered = [
                [found.render(string, insert) for string, found in zip(side_texts, side_groups, strict=True)]
                for side_texts, side_groups in zip(sides, groups, strict=True)
            ]
            try:
                encoded = self.tokenizer(
                    rendered[0],
                    rendered[1] if pairs is not None else None,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    return_offsets_mapping=user_offsets,
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

        encodings = [
            OriginalTextEncoding(
                encoding,
                groups=[side_groups[b] for side_groups in groups],
                size=len(insert),
                text_lengths=[len(side_texts[b]) for side_texts in sides],
                rewritten_texts=tuple(side_rendered[b] for side_rendered in rendered),
                rewritten_offsets=encoded["offset_mapping"][b] if user_offsets else None,
            )
            for b, encoding in enumerate(encoded.encodings)
        ]
        data = {k: v for k, v in encoded.items() if k != "offset_mapping"}
        if user_offsets:  # on the caller's text (inserted tokens: (0, 0)), not the rewritten one
            data["offset_mapping"] = [encoding.offsets for encoding in encodings]
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        entity_fields = {"entity_positions": positions, "entity_ids": rows}
        if return_tensors is None:
            data.update({k: (v[0] if single else v) for k, v in entity_fields.items()})
        truncated = [d + c for d, c in zip(dropped, cut_away, strict=True)]
        result = PELTEncoding(
            data,
            encoding=encodings,
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
        self, encoded: BatchEncoding, groups: list[list[_Groups]], dropped: list[int]
    ) -> tuple[list[list[int]], list[list[int]], list[int], bool]:
        """Slot token of each whole group; drops every group truncation cut in half (replacing groups[side][b]).

        A group is whole when tokens cover its "(", its slot (one token with the slot id) and its ")"; it is cut
        away when no token of the sequence touches its span; anything else is half a group. Linear in tokens and
        groups: the slot-id tokens are listed once (a C-level scan of the ids), matched to the groups in order,
        and each match is confirmed by its neighbours' characters; only a group without a clean match (one that
        truncation reached) is examined token by token, by bisection over the offsets.
        """
        positions: list[list[int]] = []
        rows: list[list[int]] = []
        cut_away = [0] * len(dropped)
        changed = False
        slot_id = self.slot_token_id
        size = len(self._insert)
        to_slot, to_slot_end = len(_OPEN), len(_OPEN) + len(self.slot_token)
        open_id = self._open_id if self._open_id is not None else -1
        close_id = self._close_id if self._close_id is not None else -1
        for b, encoding in enumerate(encoded.encodings):
            if not any(side_groups[b].ends for side_groups in groups):
                positions.append([])
                rows.append([])
                continue
            ids, sequence_ids = encoded["input_ids"][b], encoding.sequence_ids
            token_to_chars = encoding.token_to_chars
            # every slot-id token (slots and real masks alike) as (start character, token) per sequence
            candidates: list[list[tuple[int, int]]] = [[] for _ in groups]
            i = -1
            while True:
                try:
                    i = ids.index(slot_id, i + 1)
                except ValueError:
                    break
                side = sequence_ids[i]
                if side is not None and side < len(groups):
                    candidates[side].append((token_to_chars(i)[0], i))
            offsets: list[tuple[int, int]] | None = None  # all offsets: only when a group needs a close look
            found: list[tuple[int, int]] = []
            for side, side_groups in enumerate(groups):
                planned = side_groups[b]
                if not planned.ends:
                    continue
                side_candidates, c = candidates[side], 0
                keep = []
                low, high = _side_range(sequence_ids, side)  # the tokens of this sequence
                for k, (end, row) in enumerate(zip(planned.ends, planned.rows, strict=True)):
                    start = end + k * size  # where the group sits in the rewritten text
                    slot_start = start + to_slot
                    paren, close = slot_start - 1, start + size - 1  # the "(" and the ")"
                    while c < len(side_candidates) and side_candidates[c][0] < slot_start:
                        c += 1  # a real mask in the text
                    if c < len(side_candidates) and side_candidates[c][0] == slot_start:
                        i = side_candidates[c][1]
                        # "(" right before the slot; ")" right after (or after one more token: " " + ")")
                        if low < i < high - 1 and ids[i - 1] == open_id and ids[i + 1] == close_id:
                            found.append((i, row))  # the tokens the probe gave: the group's "(" and ")"
                            keep.append(k)
                            continue
                        if (
                            ids[i - 1] != slot_id
                            and _covers(encoding, i - 1, side, paren)
                            and ids[i + 1 : i + 2] != [slot_id]
                            and (
                                _covers(encoding, i + 1, side, close)
                                or ids[i + 2 : i + 3] != [slot_id]
                                and _covers(encoding, i + 2, side, close)
                                and token_to_chars(i + 1)[1] <= close
                            )
                        ):
                            found.append((i, row))
                            keep.append(k)
                            continue
                    # no clean match: truncation reached this group (or the tokenizer split it oddly)
                    if offsets is None:
                        offsets = encoded["offset_mapping"][b] if "offset_mapping" in encoded else encoding.offsets
                    first, last = _touching(offsets, low, high, start, start + size)
                    if first == last:
                        cut_away[b] += 1
                        keep.append(k)
                        continue
                    slot_end = start + to_slot_end
                    has_open = has_close = False
                    slots = []
                    for i in range(first, last):
                        token_start, token_end = offsets[i]
                        if token_start <= paren < token_end:
                            has_open = True
                        if token_start <= close < token_end:
                            has_close = True
                        if ids[i] == slot_id and token_end > slot_start and token_start < slot_end:
                            slots.append(i)
                    if has_open and has_close and len(slots) == 1:
                        found.append((slots[0], row))
                        keep.append(k)
                    else:
                        dropped[b] += 1
                        changed = True
                if len(keep) < len(planned):
                    side_groups[b] = _Groups([planned.ends[k] for k in keep], [planned.rows[k] for k in keep])
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


def _checked_mention(mention: Any, length: int, where: str) -> tuple[int, int, str]:
    """(start, end, entity id) of one mention, or an error naming what is wrong with it."""
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
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))  # True is not an offset
    if not (integers and 0 <= start < end <= length):
        raise ValueError(
            f"{where}: mention span [{start}, {end}) of {entity_id!r} is not within the text "
            f"(length {length}) or is empty"
        )
    return start, end, entity_id


def _side_range(sequence_ids: list[int | None], side: int) -> tuple[int, int]:
    """[first, last + 1) token of sequence `side` (its tokens are contiguous); (0, 0) when truncated away."""
    try:
        first = sequence_ids.index(side)
    except ValueError:
        return 0, 0
    return first, len(sequence_ids) - sequence_ids[::-1].index(side)


def _covers(encoding: Any, token: int, side: int, char: int) -> bool:
    """Whether token `token` of `encoding` belongs to sequence `side` and covers character `char`."""
    if token < 0 or token >= len(encoding) or encoding.token_to_sequence(token) != side:
        return False
    chars = encoding.token_to_chars(token)
    return chars is not None and chars[0] <= char < chars[1]


def _touching(offsets: Sequence[tuple[int, int]], low: int, high: int, start: int, end: int) -> tuple[int, int]:
    """[first, last) of the tokens in offsets[low:high] that touch the characters [start, end) (a zero-width token
    touches when it sits inside), by bisection: within a sequence, token offsets are ordered by start, so this
    costs O(log n) plus the tokens found."""
    first = bisect_left(offsets, (start,), low, high)  # first token starting at or after `start`
    while first > low and offsets[first - 1][0] < start < offsets[first - 1][1]:
        first -= 1  # a token across `start`
    last = first
    while last < high and offsets[last][0] < end:
        last += 1
    return first, last


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

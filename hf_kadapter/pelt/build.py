"""Building a PELT entity lookup table from a corpus of linked mentions, with the masked LM itself.

For each entity, up to `max_occurrences` of its mentions are sampled; each occurrence becomes one input in which
the WHOLE mention is replaced by ONE mask token; the model's output at the mask, after the LM head's transform
(dense -> activation -> layer norm, before the vocabulary projection), is summed per entity. No training, one forward
per occurrence, batched across entities::

    table = build_entity_table(model, tokenizer, "wiki_links.jsonl", output_dir="entity-table")

Corpus records: {"text": str, "mentions": [{"char_start": int, "char_end": int, "entity_id": str}, ...]}, spans
being character offsets into `text` (end exclusive), in JSON Lines / JSON files or a `datasets.Dataset`.

Resuming: the occurrences are planned deterministically (entity by entity, each entity's sample in corpus order) and
cut into chunks of `chunk_size`; with `output_dir` each finished chunk's partial sums and counts (and its number of
occurrences) are written atomically to `output_dir/partial/chunk-NNNNNN.safetensors`. A rerun with the same model,
tokenizer, corpus and settings reads the finished chunks instead of recomputing them, and sums them in the same order,
so the result is identical to an uninterrupted build. Only the rows a chunk touches are written, so the partial
files together take about the size of the final table (rewriting the whole table after every chunk would not scale).
`batch_size` may change between runs (e.g. after running out of memory).

Several processes (launched with accelerate or torchrun, `accelerator=` given or torch.distributed initialised):
process r computes chunks r, r + W, r + 2W ...; the sums and counts are added across processes at the end and
every process returns the full table; the main process saves it. `output_dir` must then be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..utils.io import (
    BUILD_LOCK_NAME,
    FolderCommit,
    build_lock,
    read_json,
    safetensors_problem,
    save_tensors_atomic,
    write_json_atomic,
)
from ..utils.records import DataFormatError, DataReport, RecordError, check_on_error, load_records, require
from .lm_head import _resolve_transform, _unwrap, lm_head_transform
from .table import CONFIG_NAME, EntityLookupTable, lm_head_fingerprint, model_fingerprint

logger = logging.getLogger(__name__)

PARTIAL_DIR = "partial"
STATE_NAME = "build_state.json"
BUILD_FORMAT = 2  # 2: fingerprints of every weight (hf_kadapter.utils.fingerprint), the LM head's included
# Long texts are cut (at whitespace) to this many characters per mask token budget on each side before tokenizing;
# a cut side that then gives fewer tokens than the window needs is tokenized again uncut, so the window is exact.
_CHARS_PER_TOKEN = 32
_WHITESPACE = (" ", "\n", "\t", "\r")
_READ_BLOCK = 2048
# The plan fields a partial build must share with a rerun to be resumed.
_PLAN_FIELDS = (
    "build_format",
    "model_fingerprint",
    "lm_head_fingerprint",
    "model_dtype",
    "transform",
    "tokenizer_digest",
    "corpus_digest",
    "occurrences_digest",
    "max_occurrences",
    "seed",
    "max_length",
    "chunk_size",
)


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------
def validate_entity_record(record: dict[str, Any]) -> dict[str, Any]:
    """Check one corpus record and return it normalised to {"text", "mentions"} (other fields dropped)."""
    text = require(record, "text", str)
    if not text.strip():
        raise RecordError("text", "empty text")
    mentions = require(record, "mentions", list)
    clean = []
    for i, mention in enumerate(mentions):
        where = f"mentions[{i}]"
        if not isinstance(mention, dict):
            raise RecordError(where, f"expected an object with char_start, char_end, entity_id, got {mention!r}")
        try:
            start = require(mention, "char_start", int)
            end = require(mention, "char_end", int)
            entity_id = require(mention, "entity_id", str)
        except RecordError as error:
            raise RecordError(f"{where}.{error.field}", error.why) from None
        if not entity_id:
            raise RecordError(f"{where}.entity_id", "empty entity id")
        if not 0 <= start < len(text):
            raise RecordError(f"{where}.char_start", f"{start} is outside the text's {len(text)} characters")
        if not start < end <= len(text):
            raise RecordError(
                f"{where}.char_end", f"{end} is outside ({start}, {len(text)}] (spans are [char_start, char_end))"
            )
        if not text[start:end].strip():
            raise RecordError(where, f"the span [{start}, {end}) is only whitespace")
        clean.append({"char_start": start, "char_end": end, "entity_id": entity_id})
    return {"text": text, "mentions": clean}


class _RowError(DataFormatError):
    """A malformed record of an in-memory corpus: named by row (there is no file or line)."""

    def __init__(self, row: int, field_name: str, why: str):
        ValueError.__init__(
            self,
            f"corpus row {row}, field {field_name!r}: {why}. Fix the record, or load with on_error='skip' to skip "
            "malformed records and count them.",
        )
        self.path = "<dataset>"
        self.line = row
        self.field = field_name


def load_entity_corpus(
    path_or_dataset: str | os.PathLike | datasets.Dataset | Iterable[dict[str, Any]],
    on_error: str = "raise",
    report: DataReport | None = None,
) -> datasets.Dataset:
    """Read and validate a corpus of texts with linked mentions into a datasets.Dataset (columns text, mentions).

    A file (JSON Lines or a JSON array) reports errors by file, line and field; a datasets.Dataset or a list of
    dicts by row (0-based) and field. Spans must be non-empty, inside the text and not only whitespace; entity ids
    must be non-empty strings. `on_error="skip"` drops malformed records and counts them in `report`.
    """
    check_on_error(on_error)
    report = report if report is not None else DataReport()
    if isinstance(path_or_dataset, (str, os.PathLike)):
        return load_records(path_or_dataset, validate_entity_record, on_error=on_error, report=report)
    rows = []
    for index, record in enumerate(path_or_dataset):
        report.read += 1
        try:
            if not isinstance(record, Mapping):
                raise RecordError("<record>", f"expected a mapping, got {type(record).__name__}")
            rows.append(validate_entity_record(dict(record)))
            report.kept += 1
        except RecordError as error:
            if on_error == "raise":
                raise _RowError(index, error.field, error.why) from None
            report.skip(f"{error.field}: {error.why}")
    if report.skipped:
        logger.warning("entity corpus: %s", report.summary())
    if not rows:
        raise _RowError(0, "<corpus>", "no usable records")
    return datasets.Dataset.from_list(rows)


def _iter_blocks(corpus: datasets.Dataset) -> Iterator[tuple[int, list[str], list[list[dict[str, Any]]]]]:
    for start in range(0, len(corpus), _READ_BLOCK):
        block = corpus[start : start + _READ_BLOCK]
        yield start, block["text"], block["mentions"]


# ---------------------------------------------------------------------------------------------------------------
# Planning: which occurrences, in which order
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    entity_ids: list[str]
    counts: np.ndarray  # sampled occurrences per entity
    available: np.ndarray  # mentions in the corpus per entity
    rows: np.ndarray  # per occurrence: entity row
    records: np.ndarray  # per occurrence: corpus record
    starts: np.ndarray
    ends: np.ndarray
    corpus_digest: str
    occurrences_digest: str
    surfaces: dict[str, Counter]
    num_records: int

    def __len__(self) -> int:
        return len(self.rows)


def _entity_seed(seed: int, entity_id: str) -> list[int]:
    """Per-entity RNG seed: an entity's sample depends only on the seed, its id and its own mentions."""
    return [seed, int.from_bytes(hashlib.sha256(entity_id.encode()).digest()[:8], "little")]


def sample_occurrences(num_mentions: int, max_occurrences: int, seed: int, entity_id: str) -> np.ndarray:
    """Indices (sorted, into the entity's mentions in corpus order) of the occurrences used for one entity.

    All of them when there are at most `max_occurrences`, else `max_occurrences` drawn uniformly without replacement
    by numpy's default generator seeded with (seed, a hash of the entity id). Seeding per entity keeps each
    entity's sample unchanged when other entities are added to or removed from the corpus.
    """
    if num_mentions <= max_occurrences:
        return np.arange(num_mentions)
    rng = np.random.default_rng(_entity_seed(seed, entity_id))
    return np.sort(rng.choice(num_mentions, size=max_occurrences, replace=False))


def _plan(corpus: datasets.Dataset, max_occurrences: int, seed: int, skip: set[str], collect_surfaces: bool) -> _Plan:
    """Group mentions by entity (entities in order of first mention), sample each, lay occurrences out entity by
    entity; also digest the corpus so that a resumed build can tell it is the same."""
    corpus_digest = hashlib.sha256()
    order: dict[str, int] = {}
    mentions_of: list[list[tuple[int, int, int]]] = []
    surfaces: dict[str, Counter] = {}
    for start, texts, mention_lists in _iter_blocks(corpus):
        for offset, (text, mentions) in enumerate(zip(texts, mention_lists, strict=True)):
            record = start + offset
            encoded = text.encode()
            corpus_digest.update(len(encoded).to_bytes(8, "little") + encoded)
            for mention in mentions:
                entity_id, first, last = mention["entity_id"], mention["char_start"], mention["char_end"]
                corpus_digest.update(f"{first}:{last}:{len(entity_id)}:{entity_id};".encode())
                if entity_id in skip:
                    continue
                if entity_id not in order:
                    order[entity_id] = len(order)
                    mentions_of.append([])
                mentions_of[order[entity_id]].append((record, first, last))
                if collect_surfaces:
                    surfaces.setdefault(entity_id, Counter())[text[first:last].strip()] += 1
    entity_ids = list(order)
    picked: list[np.ndarray] = []
    counts = np.zeros(len(entity_ids), dtype=np.int64)
    available = np.zeros(len(entity_ids), dtype=np.int64)
    for row, entity_id in enumerate(entity_ids):
        mentions = np.asarray(mentions_of[row], dtype=np.int64).reshape(-1, 3)
        chosen = mentions[sample_occurrences(len(mentions), max_occurrences, seed, entity_id)]
        picked.append(chosen)
        counts[row], available[row] = len(chosen), len(mentions)
    table = np.concatenate(picked) if picked else np.zeros((0, 3), dtype=np.int64)
    rows = np.repeat(np.arange(len(entity_ids), dtype=np.int64), counts)
    occurrences_digest = hashlib.sha256()
    occurrences_digest.update("\n".join(entity_ids).encode())
    occurrences_digest.update(rows.tobytes())
    occurrences_digest.update(np.ascontiguousarray(table).tobytes())
    return _Plan(
        entity_ids=entity_ids,
        counts=counts,
        available=available,
        rows=rows,
        records=np.ascontiguousarray(table[:, 0]),
        starts=np.ascontiguousarray(table[:, 1]),
        ends=np.ascontiguousarray(table[:, 2]),
        corpus_digest="sha256:" + corpus_digest.hexdigest(),
        occurrences_digest="sha256:" + occurrences_digest.hexdigest(),
        surfaces=surfaces,
        num_records=len(corpus),
    )


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the whole mention -> one mask token, a window around it
# ---------------------------------------------------------------------------------------------------------------
class _MaskedEncoder:
    """Token ids of `text[:start] + MASK + text[end:]`, at most `max_length` tokens, the mask always inside.

    The two sides are tokenized separately, which is exactly what the tokenizer does around an added token like the
    mask (text is split at added tokens before normalisation and pre-tokenisation), including stripping the
    whitespace next to the mask when the mask token strips it (RoBERTa's lstrip). A literal mask string elsewhere in
    the text is left to the tokenizer, as it would be without PELT.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token: PELT needs the tokenizer of a masked LM.")
        self.tokenizer = tokenizer
        self.mask_id = int(mask_id)
        probe = tokenizer(tokenizer.mask_token, add_special_tokens=True)["input_ids"]
        if probe.count(self.mask_id) != 1:
            raise ValueError(f"{type(tokenizer).__name__} does not encode its mask token as one token ({probe}).")
        at = probe.index(self.mask_id)
        self.prefix, self.suffix = list(probe[:at]), list(probe[at + 1 :])
        added = getattr(tokenizer, "added_tokens_decoder", {}).get(self.mask_id)
        self.lstrip = bool(getattr(added, "lstrip", False))
        self.rstrip = bool(getattr(added, "rstrip", False))
        self.max_length = max_length
        self.budget = max_length - len(self.prefix) - len(self.suffix) - 1
        if self.budget < 0:
            raise ValueError(
                f"max_length={max_length} leaves no room for the mask and the {len(self.prefix) + len(self.suffix)} "
                "special tokens."
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _sides(self, text: str, start: int, end: int, cut: bool) -> tuple[str, str, bool, bool]:
        left, right = text[:start], text[end:]
        cut_left = cut_right = False
        limit = _CHARS_PER_TOKEN * max(self.budget, 1)
        if cut and len(left) > limit:
            found = [i for i in (left.find(c, len(left) - limit) for c in _WHITESPACE) if i > 0]
            if found:
                left, cut_left = left[min(found) :], True  # keeps the whitespace: " word" tokenizes as in context
        if cut and len(right) > limit:
            position = max(right.rfind(c, 0, limit) for c in _WHITESPACE)
            if position > 0:
                right, cut_right = right[:position], True
        if self.lstrip:
            left = left.rstrip()
        if self.rstrip:
            right = right.lstrip()
        return left, right, cut_left, cut_right

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]

    def encode(self, texts: list[str], starts: np.ndarray, ends: np.ndarray) -> tuple[list[list[int]], list[int], int]:
        """(input ids per occurrence, mask position per occurrence, number of occurrences whose text was cut)."""
        sides = [self._sides(t, int(s), int(e), cut=True) for t, s, e in zip(texts, starts, ends, strict=True)]
        lefts = self._tokenize([s[0] for s in sides])
        rights = self._tokenize([s[1] for s in sides])
        ids, positions, windowed = [], [], 0
        for i, (_, _, cut_left, cut_right) in enumerate(sides):
            # A cut side shorter than the whole budget might have needed the text that was cut: redo it uncut.
            if (cut_left and len(lefts[i]) < self.budget) or (cut_right and len(rights[i]) < self.budget):
                whole_left, whole_right, _, _ = self._sides(texts[i], int(starts[i]), int(ends[i]), cut=False)
                lefts[i], rights[i] = self._tokenize([whole_left, whole_right])
            left, right = lefts[i], rights[i]
            keep_left, keep_right = self._window(len(left), len(right))
            if keep_left < len(left) or keep_right < len(right):
                windowed += 1
            ids.append(self.prefix + left[len(left) - keep_left :] + [self.mask_id] + right[:keep_right] + self.suffix)
            positions.append(len(self.prefix) + keep_left)
        return ids, positions, windowed

    def _window(self, n_left: int, n_right: int) -> tuple[int, int]:
        """Tokens kept on each side: all if they fit, else the budget centred on the mask (unused share moves over)."""
        budget = self.budget
        if n_left + n_right <= budget:
            return n_left, n_right
        half = budget // 2
        if n_left <= half:
            return n_left, budget - n_left
        if n_right <= budget - half:
            return budget - n_right, n_right
        return half, budget - half

    def pad(self, ids: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _tokenizer_digest(tokenizer: Any, encoder: _MaskedEncoder) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(
        json.dumps([encoder.prefix, encoder.suffix, encoder.mask_id, encoder.lstrip, encoder.rstrip]).encode()
    )
    return "sha256:" + digest.hexdigest()


def _texts(corpus: datasets.Dataset, records: np.ndarray) -> list[str]:
    """The texts of the given records (read once per distinct record)."""
    unique = sorted(set(records.tolist()))
    found = dict(zip(unique, corpus.select_columns(["text"])[unique]["text"], strict=True))
    return [found[r] for r in records.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------
class _Processes:
    """Rank, world size, barrier and sum-reduction through an Accelerator or torch.distributed (or neither)."""

    def __init__(self, accelerator: Any, device: torch.device):
        self.accelerator = accelerator
        self.device = device
        if accelerator is not None:
            self.rank, self.world = int(accelerator.process_index), int(accelerator.num_processes)
            self.device = torch.device(getattr(accelerator, "device", device))
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        else:
            torch.distributed.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `tensor` over all processes (on the collective's device, back on the CPU)."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self.device)
        if self.accelerator is not None:
            moved = self.accelerator.reduce(moved, reduction="sum")
        else:
            torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
        return moved.cpu()


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------
def _chunk_path(output_dir: Path, chunk: int) -> Path:
    return output_dir / PARTIAL_DIR / f"chunk-{chunk:06d}.safetensors"


def _read_chunk(path: Path, expected_occurrences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """A finished chunk's (rows, sums, counts, windowed), or None when the file is missing, unreadable or not what
    the plan expects (then it is recomputed, never trusted)."""
    if not path.is_file():
        return None
    problem = safetensors_problem(path)
    try:
        if problem is None:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if int(metadata.get("occurrences", -1)) != expected_occurrences:
                    return None
                tensors = handle.get_tensor("rows"), handle.get_tensor("sums"), handle.get_tensor("counts")
                return (*tensors, int(metadata.get("windowed", 0)))
    except Exception as error:  # safetensors raises its own error types for malformed files
        problem = str(error)
    logger.warning("%s is damaged (%s); its chunk is computed again.", path, problem)
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [field for field in _PLAN_FIELDS if old.get(field) != new.get(field)]


def _finished_table(output_dir: Path, plan_digest: str) -> EntityLookupTable | None:
    """The table a previous run of the same build saved in `output_dir`, if any; another build's table raises."""
    if not (output_dir / CONFIG_NAME).is_file():
        return None
    table = EntityLookupTable.from_pretrained(output_dir)
    if table.metadata.get("plan_digest") != plan_digest:
        raise ValueError(
            f"{output_dir} already holds an entity table built with other settings, model, tokenizer or corpus "
            f"(plan {table.metadata.get('plan_digest')}, this build {plan_digest}). Choose another output_dir or "
            "delete it."
        )
    return table


def _check_partial_state(output_dir: Path, state: dict[str, Any]) -> bool:
    """True when `output_dir` holds a partial build of this very plan; raise when it holds another one."""
    path = output_dir / PARTIAL_DIR / STATE_NAME
    if not path.is_file():
        return False
    old = read_json(path)
    differences = _differences(old, state)
    if differences:
        raise ValueError(
            f"{output_dir} holds an unfinished build with other settings (differs in {differences}); it cannot be "
            "resumed by this one. Rerun with the same model, tokenizer, corpus, max_occurrences, seed, max_length "
            f"and chunk_size, or delete {output_dir / PARTIAL_DIR} to start afresh."
        )
    return True


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def build_entity_table(
    model: nn.Module,
    tokenizer: Any,
    corpus: str | os.PathLike | datasets.Dataset | Iterable[dict[str, Any]],
    *,
    entity_names: Mapping[str, str] | None = None,
    entity_aliases: Mapping[str, Iterable[str]] | None = None,
    max_occurrences: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    max_length: int = 128,
    norm: float = 7.0,
    output_dir: str | os.PathLike | None = None,
    accelerator: Any = None,
    progress: bool = True,
    chunk_size: int = 4096,
    skip_entities: Iterable[str] | EntityLookupTable | None = None,
    mention_aliases: bool = False,
    _on_batch: Callable[[int], None] | None = None,
) -> EntityLookupTable:
    """Compute the PELT entity table of `model` (a masked LM) over `corpus` (see load_entity_corpus).

    - Sampling: per entity, all its mentions if at most `max_occurrences`, else that many drawn uniformly without
      replacement, seeded by (`seed`, entity id) (see sample_occurrences).
    - Each occurrence: the whole mention replaced by one mask token, other mentions left as text; texts longer than
      `max_length` tokens keep a window centred on the mask (never cut).
    - Occurrences are batched across entities, `batch_size` per forward, sorted by length within chunks of
      `chunk_size`, run with the model in eval mode under inference_mode; the encoder's last hidden state at the
      mask goes through the LM head's transform (lm_head_transform) and is summed per entity in float32.
    - Only entities with at least one mention are in the table (rows in order of first mention). `entity_names` and
      `entity_aliases` (id -> name / aliases) label them; `mention_aliases=True` adds each entity's 10 most
      frequent mention strings to its aliases. `skip_entities` (ids or a table) are not computed at all: use it with
      `table.add_entities(new_table)` to add a new corpus's entities without touching the existing ones.
    - `output_dir`: resumable build (see the module docstring); the finished table is saved there too, and a rerun
      of a finished build loads it instead of computing.
    - `accelerator` (or torch.distributed): processes share the chunks; put the model on `accelerator.device`.
    """
    if max_occurrences < 1 or batch_size < 1 or chunk_size < 1:
        raise ValueError("max_occurrences, batch_size and chunk_size must be positive.")
    model = _unwrap(model)
    kind, transform = _resolve_transform(model)
    encoder_model = model.base_model
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: they do not belong "
            "together."
        )
    encoder = _MaskedEncoder(tokenizer, max_length)
    corpus = load_entity_corpus(corpus)
    skip = set(skip_entities.entity_ids if isinstance(skip_entities, EntityLookupTable) else skip_entities or ())
    plan = _plan(corpus, max_occurrences, seed, skip, mention_aliases)
    if not len(plan) and not skip:
        raise ValueError("The corpus has no entity mentions: nothing to build.")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    processes = _Processes(accelerator, device)
    fingerprint, head_fingerprint = model_fingerprint(model), lm_head_fingerprint(model)
    state = {
        "build_format": BUILD_FORMAT,
        "model_fingerprint": fingerprint,
        "lm_head_fingerprint": head_fingerprint,
        "model_dtype": str(dtype).removeprefix("torch."),
        "transform": kind,
        "tokenizer_digest": _tokenizer_digest(tokenizer, encoder),
        "corpus_digest": plan.corpus_digest,
        "occurrences_digest": plan.occurrences_digest,
        "max_length": max_length,
        "chunk_size": chunk_size,
        "num_occurrences": len(plan),
        "max_occurrences": max_occurrences,
        "seed": seed,
    }
    names = [(entity_names or {}).get(e) for e in plan.entity_ids]
    aliases = [_aliases(e, entity_names, entity_aliases, plan.surfaces) for e in plan.entity_ids]
    plan_digest = "sha256:" + hashlib.sha256(json.dumps({k: state[k] for k in _PLAN_FIELDS}).encode()).hexdigest()
    out = Path(output_dir) if output_dir is not None else None
    lock = contextlib.ExitStack()
    if out is not None and processes.is_main:
        # One builder per folder: a second one waits here, then finds the finished table (or resumes a killed one).
        lock.enter_context(build_lock(out / PARTIAL_DIR))
    with lock:
        if out is not None:
            finished = _finished_table(out, plan_digest)
            if finished is not None:
                logger.info("%s already holds this entity table; loaded it instead of computing.", out)
                # Labels and norm are not part of the computation: apply this call's, and save them if they changed.
                if (finished.names, finished.aliases, finished.norm) != (names, aliases, float(norm)):
                    finished.names, finished.aliases, finished.norm = names, aliases, float(norm)
                    if processes.is_main:
                        finished.save_pretrained(out)
                if processes.is_main:
                    _drop_partial_if_only_the_lock(out)
                processes.barrier()
                return finished
            resuming = _check_partial_state(out, state)
            if processes.is_main and not resuming:
                (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
                # Chunk files without a recorded plan (a build stopped before writing it) cannot be trusted.
                for stale in (out / PARTIAL_DIR).glob("chunk-*.safetensors"):
                    stale.unlink()
                write_json_atomic(out / PARTIAL_DIR / STATE_NAME, {**state, "plan_digest": plan_digest})
            processes.barrier()

        hidden = int(model.get_input_embeddings().embedding_dim)
        sums = torch.zeros(len(plan.entity_ids), hidden, dtype=torch.float32)
        counts = torch.zeros(len(plan.entity_ids), dtype=torch.long)
        num_chunks = -(-len(plan) // chunk_size)
        mine = list(range(processes.rank, num_chunks, processes.world))
        total = sum(min(chunk_size, len(plan) - c * chunk_size) for c in mine)
        windowed = 0
        bar = tqdm(
            total=total,
            desc="Building entity table"
            + (f" (process {processes.rank}/{processes.world})" if processes.world > 1 else ""),
            unit="occ",
            disable=not (progress and processes.is_main),
        )
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        reused = 0
        try:
            for chunk in mine:
                first, last = chunk * chunk_size, min((chunk + 1) * chunk_size, len(plan))
                loaded = _read_chunk(_chunk_path(out, chunk), last - first) if out is not None else None
                if loaded is None:
                    rows, chunk_sums, chunk_counts, cut = _compute_chunk(
                        plan, first, last, corpus, encoder, encoder_model, transform, batch_size, device, hidden, bar,
                        _on_batch,
                    )  # fmt: skip
                    windowed += cut
                    if out is not None:
                        save_tensors_atomic(
                            _chunk_path(out, chunk),
                            {"rows": rows, "sums": chunk_sums, "counts": chunk_counts},
                            metadata={"chunk": str(chunk), "occurrences": str(last - first), "windowed": str(cut)},
                        )
                else:
                    rows, chunk_sums, chunk_counts, cut = loaded
                    windowed += cut
                    reused += last - first
                    bar.update(last - first)
                sums.index_add_(0, rows, chunk_sums)
                counts.index_add_(0, rows, chunk_counts)
        finally:
            bar.close()
            model.train(was_training)
        if reused:
            logger.info("Resumed: %d of %d occurrences were read from finished chunks in %s.", reused, total, out)
        elapsed = time.perf_counter() - started
        sums, counts = processes.sum(sums), processes.sum(counts)
        windowed = int(processes.sum(torch.tensor([windowed]))[0])
        if not torch.equal(counts, torch.from_numpy(plan.counts)):
            raise RuntimeError(
                "The summed occurrence counts differ from the plan: some chunks were lost (processes running different "
                "corpora or settings?)."
            )
        table = EntityLookupTable(
            plan.entity_ids,
            sums,
            counts,
            names=names,
            aliases=aliases,
            norm=norm,
            metadata={
                "model_fingerprint": fingerprint,
                "lm_head_fingerprint": state["lm_head_fingerprint"],
                "model_name_or_path": getattr(model.config, "name_or_path", None) or None,
                "hidden_size": hidden,
                "model_type": getattr(model.config, "model_type", None),
                "max_occurrences": max_occurrences,
                "seed": seed,
                "model_class": type(model).__name__,
                "transform": kind,
                "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) or None,
                "mask_token": tokenizer.mask_token,
                "max_length": max_length,
                "num_records": plan.num_records,
                "num_occurrences": len(plan),
                "num_mentions": int(plan.available.sum()),
                "windowed_occurrences": windowed,
                "skipped_entities": len(skip),
                "corpus_digest": plan.corpus_digest,
                "plan_digest": plan_digest,
                "build_seconds": round(elapsed, 3),
            },
        )
        unseen = [e for e in (entity_names or {}) if e not in table and e not in skip]
        if unseen:
            logger.info("%d named entities have no mention in the corpus and get no vector.", len(unseen))
        if out is not None:
            if processes.is_main:
                # The table's files in, the partial build out: one commit, so a kill anywhere in it leaves either the
                # partial build to resume or the finished table, never a folder that is neither.
                with FolderCommit(out, stale=(f"{PARTIAL_DIR}/**",)) as staging:
                    table.write_files(staging, out)
                _drop_partial_if_only_the_lock(out)
            processes.barrier()
        return table


def _drop_partial_if_only_the_lock(out: Path) -> None:
    """Remove `partial/` once the table is committed (a builder waiting on its lock file then finds the table)."""
    partial = out / PARTIAL_DIR
    if partial.is_dir() and all(item.name == BUILD_LOCK_NAME for item in partial.iterdir()):
        shutil.rmtree(partial, ignore_errors=True)


def _aliases(
    entity_id: str,
    names: Mapping[str, str] | None,
    aliases: Mapping[str, Iterable[str]] | None,
    surfaces: dict[str, Counter],
) -> list[str]:
    found = list(dict.fromkeys((aliases or {}).get(entity_id, ())))
    name = (names or {}).get(entity_id)
    for surface, _ in surfaces.get(entity_id, Counter()).most_common(10):
        if surface and surface != name and surface not in found:
            found.append(surface)
    return found


def _compute_chunk(
    plan: _Plan,
    first: int,
    last: int,
    corpus: datasets.Dataset,
    encoder: _MaskedEncoder,
    encoder_model: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    device: torch.device,
    hidden: int,
    bar: Any,
    on_batch: Callable[[int], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sums and counts of occurrences first..last over the entity rows they touch: (rows, sums, counts, windowed)."""
    entity_rows = plan.rows[first:last]
    rows, local = np.unique(entity_rows, return_inverse=True)
    texts = _texts(corpus, plan.records[first:last])
    ids, positions, windowed = encoder.encode(texts, plan.starts[first:last], plan.ends[first:last])
    # Longest first: little padding per batch, and running out of memory shows at once.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    chunk_sums = torch.zeros(len(rows), hidden, dtype=torch.float32)
    local = torch.from_numpy(np.asarray(local, dtype=np.int64).reshape(-1))
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        inputs = encoder.pad([ids[i] for i in members], device)
        mask_positions = torch.tensor([positions[i] for i in members], device=device)
        with torch.inference_mode():
            states = encoder_model(**inputs, return_dict=True).last_hidden_state
            vectors = transform(states[torch.arange(len(members), device=device), mask_positions])
        vectors = vectors.to("cpu", torch.float32).clone()  # a normal tensor (inference tensors are read-only later)
        finite = torch.isfinite(vectors).all(dim=1)
        if not bool(finite.all()):
            bad = [first + members[i] for i in torch.nonzero(~finite).flatten().tolist()]
            entities = sorted({plan.entity_ids[plan.rows[b]] for b in bad})
            raise ValueError(
                f"The model gives NaN or inf vectors for {len(bad)} masked mentions (entities {entities[:10]}, corpus "
                f"records {sorted({int(plan.records[b]) for b in bad})[:10]}): summing them would spoil those entities' "
                "vectors. Check the model's weights and dtype (float16 overflows: build in float32), or remove these "
                "mentions from the corpus."
            )
        chunk_sums.index_add_(0, local[members], vectors)
        bar.update(len(members))
        if on_batch is not None:
            on_batch(len(members))
    chunk_counts = torch.bincount(local, minlength=len(rows))
    return torch.from_numpy(rows), chunk_sums, chunk_counts, windowed


__all__ = [
    "build_entity_table",
    "lm_head_transform",  # (defined in lm_head.py; importable from here as before)
    "load_entity_corpus",
    "sample_occurrences",
    "validate_entity_record",
]

"""On-disk cache of a frozen base's hidden states, so adapter pretraining skips the base forward.

While an adapter is pretrained the base is frozen (and runs in eval mode), so the hidden states it produces for a
dataset never change; computing them once and reading them back every epoch removes the base forward from every
training step. `build_feature_cache` writes them, `FeatureCache.attach` tags each dataset row with its index in the
cache, and `CachedFeatureCollator` turns those indices into the `cached_hidden_states` that `KAdapterModel` and the
pretraining heads accept::

    cache = build_feature_cache(model, tokenized, "feature-cache")
    train = cache.attach(tokenized)
    Trainer(model=model, args=args, train_dataset=train, data_collator=CachedFeatureCollator(pad_fn, cache)).train()

What is stored: the S hidden states the model reads and nothing else, the adapters' taps plus the last layer (the
base's other layers are never written: 4 of 7 for MiniLM's 6 layers with the default taps), each row at its own
length (trailing padding trimmed), in float32 (the adapter then trains exactly as without the cache) or in
float16 / bfloat16 (half the disk and half the bytes read per epoch; the recipes' `--feature_cache_dtype`).

Layout of `cache_dir/<key>/`: `hidden_states.npy`, one flat (total_tokens, S, hidden) array holding every row at its
own length, `offsets.npy` (num_rows + 1 row starts) and `metadata.json`. The key is a
sha256 over the base fingerprint (every weight, hf_kadapter.utils.fingerprint), the hidden-state indices, the storage
dtype, the base's compute dtype and a digest of every row's input_ids / attention_mask / token_type_ids, so another
base, other taps or other tokenization can never read a stale cache: they get another folder.

Crashes and concurrency: the three files are created as one folder commit (hf_kadapter.utils.io); rows are then
written in place, chunk by chunk, and `metadata.json` (replaced atomically after the chunk's data is flushed) says
how many are done, so a build killed at any point resumes to the same bytes. One builder per folder: a second one
(another job sharing the cache directory) waits for the first, then opens its result.

Why `.npy` through `np.lib.format.open_memmap` rather than safetensors: the file is preallocated once and each chunk
of rows is written in place, which is what lets an interrupted build resume; safetensors' writers serialise whole
in-memory tensors, so a cache larger than memory could not be written incrementally. Reading maps the file, so
memory use stays at one batch, and each row is copied once, from the page cache into the batch, converted to the
model's dtype on the way (a half-precision cache reaches float32 adapters without an intermediate copy). numpy has no bfloat16, so `dtype="bfloat16"` stores the raw bfloat16 bits as int16
(same size as float16, float32's range: no overflow on large activations).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.fingerprint import base_tensors, native_fingerprint
from ..utils.io import DamagedFileError, FolderCommit, build_lock, read_json, reading_folder, write_json_atomic
from .modeling_kadapter import KAdapterModel

FORMAT_VERSION = 1
CACHE_INDEX_COLUMN = "cached_hidden_states"
"""Name of the column `attach` adds. It is the name of the forward argument the collator fills, so `Trainer`'s
default `remove_unused_columns=True` keeps it (it drops columns the model's forward does not name)."""

STATES_FILE = "hidden_states.npy"
OFFSETS_FILE = "offsets.npy"
METADATA_FILE = "metadata.json"
INPUT_FIELDS = ("input_ids", "attention_mask", "token_type_ids")
# What a partial build must agree on to be resumed (the rest of the metadata is informative).
_RESUME_FIELDS = (
    "format_version",
    "key",
    "base_fingerprint",
    "hidden_state_indices",
    "base_dtype",
    "hidden_size",
    "dtype",
    "inputs_digest",
    "num_rows",
    "total_tokens",
)
# storage name -> (numpy dtype on disk, torch dtype handed out). numpy has no bfloat16: its raw bits go in int16.
_STORAGE = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<i2"), torch.bfloat16),
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _storage_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _STORAGE:
        raise ValueError(f"Feature cache dtype {dtype!r} is not supported; use one of {sorted(_STORAGE)}.")
    return name


def _core(model: nn.Module) -> KAdapterModel:
    """The KAdapterModel inside a head (or the model itself)."""
    if isinstance(model, KAdapterModel):
        return model
    core = getattr(model, "kadapter", None)
    if not isinstance(core, KAdapterModel):
        raise TypeError(f"Expected a KAdapterModel or a K-Adapter head, got {type(model).__name__}.")
    return core


def cached_hidden_state_indices(model: nn.Module) -> list[int]:
    """The base hidden_states the model reads from `cached_hidden_states`, in order (a pretraining head reads only
    its own adapter's taps plus the last layer)."""
    own = getattr(model, "cached_hidden_state_indices", None)
    return own() if callable(own) else _core(model).cached_hidden_state_indices()


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "select_columns")


def _as_int64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.int64).reshape(-1))


def _read_rows(dataset: Any, start: int, stop: int) -> list[dict[str, np.ndarray]]:
    """Rows start..stop reduced to the model inputs, as int64 arrays (HF datasets are read column-wise, fast)."""
    if _is_hf_dataset(dataset):
        fields = [f for f in INPUT_FIELDS if f in dataset.column_names]
        if "input_ids" not in fields:
            raise ValueError(
                f"The dataset has no input_ids column (columns: {dataset.column_names}); tokenize it first."
            )
        part = dataset.select_columns(fields).with_format("numpy")[start:stop]
        return [{f: _as_int64(part[f][i]) for f in fields} for i in range(stop - start)]
    rows = []
    for index in range(start, stop):
        row = dataset[index]
        if not isinstance(row, Mapping) or "input_ids" not in row:
            raise ValueError(f"Row {index} of the dataset has no input_ids; tokenize it first.")
        rows.append({f: _as_int64(row[f]) for f in INPUT_FIELDS if row.get(f) is not None})
    return rows


def _iter_rows(dataset: Any, block: int = 4096) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(dataset), block):
        yield from _read_rows(dataset, start, min(start + block, len(dataset)))


def _true_length(row: Mapping[str, np.ndarray]) -> int:
    """Tokens up to the last attended one: right padding in a pre-padded dataset is not stored."""
    mask = row.get("attention_mask")
    if mask is None:
        return len(row["input_ids"])
    attended = np.flatnonzero(mask)
    return int(attended[-1]) + 1 if len(attended) else 0


def scan_inputs(dataset: Any, progress: bool = False) -> tuple[str, np.ndarray]:
    """(digest of every row's input_ids / attention_mask / token_type_ids, in order; each row's true length).

    Each field is hashed with its name and length, so rows cannot run into one another.
    """
    digest = hashlib.sha256()
    lengths = np.zeros(len(dataset), dtype=np.int64)
    rows = tqdm(_iter_rows(dataset), total=len(dataset), desc="Hashing inputs", disable=not progress, leave=False)
    for index, row in enumerate(rows):
        for field in INPUT_FIELDS:
            value = row.get(field)
            if value is None:
                digest.update(f"{field}:-;".encode())
            else:
                digest.update(f"{field}:{len(value)};".encode())
                digest.update(value.tobytes())
        lengths[index] = _true_length(row)
    return "sha256:" + digest.hexdigest(), lengths


def _cache_key(fingerprint: str, indices: Sequence[int], dtype: str, base_dtype: str, inputs_digest: str) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "base_fingerprint": fingerprint,
        "hidden_state_indices": list(indices),
        "dtype": dtype,
        "base_dtype": base_dtype,
        "inputs_digest": inputs_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _model_identity(model: nn.Module) -> dict[str, Any]:
    """What the key says about the model: base fingerprint, tapped indices and the base's compute dtype."""
    core = _core(model)
    # The base's own dtype only (one pass): the cached states change with the dtype, so the key must too.
    fingerprint = native_fingerprint(base_tensors(core.pretrained_model))
    if fingerprint is None:
        raise ValueError("The base model's weights are not loaded (meta device): load them before caching features.")
    return {
        "base_fingerprint": fingerprint,
        "hidden_state_indices": cached_hidden_state_indices(model),
        "base_dtype": str(next(core.pretrained_model.parameters()).dtype).removeprefix("torch."),
        "hidden_size": core.config.base_config.hidden_size,
    }


def feature_cache_key(model: nn.Module, dataset: Any, dtype: str | torch.dtype = "float32") -> str:
    """The folder name under `cache_dir` that `build_feature_cache(model, dataset, dtype=dtype)` uses."""
    identity = _model_identity(model)
    digest, _ = scan_inputs(dataset)
    return _cache_key(
        identity["base_fingerprint"],
        identity["hidden_state_indices"],
        _storage_name(dtype),
        identity["base_dtype"],
        digest,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, sort_keys=True)


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """np.load without pickles, naming a damaged file (numpy's own errors do not)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the feature cache is incomplete; build it again.") from None
    except (OSError, ValueError, EOFError) as error:
        raise DamagedFileError(path, f"numpy cannot read it ({error})") from None


def _check_frozen(model: nn.Module) -> None:
    if not _core(model).base_is_frozen():
        raise ValueError(
            "The model's base is trainable (some of its parameters require grad): its hidden states would change "
            "during training and a feature cache would go stale. Freeze it first with model.freeze_base() (or "
            "build the model with freeze_base=True), or train without a feature cache."
        )


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """A finished (or partial) feature cache folder, read through memory maps.

    Nothing is loaded eagerly: rows are read from the page cache when a batch asks for them, so caches larger
    than memory work, and DataLoader workers reopen the maps instead of receiving pickled copies.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        metadata_file = self.path / METADATA_FILE
        with reading_folder(self.path):  # finish an interrupted creation first
            if not metadata_file.is_file():
                raise FileNotFoundError(f"{self.path} is not a feature cache (no {METADATA_FILE}).")
            self.metadata: dict[str, Any] = read_json(metadata_file)
        if not isinstance(self.metadata, dict):
            raise DamagedFileError(metadata_file, "it does not hold a JSON object")
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path} holds a feature cache of format {self.metadata.get('format_version')}, this code reads "
                f"format {FORMAT_VERSION}: delete the folder and build it again."
            )
        self._states: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._lengths: np.ndarray | None = None

    # ----- description -----------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.metadata["key"]

    @property
    def indices(self) -> list[int]:
        """The base hidden_states held, in order (dimension S of every row)."""
        return list(self.metadata["hidden_state_indices"])

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _STORAGE[self.dtype][1]

    @property
    def complete(self) -> bool:
        return bool(self.metadata["complete"])

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = _load_npy(self.path / OFFSETS_FILE)
            if self._offsets.shape != (len(self) + 1,):
                raise DamagedFileError(
                    self.path / OFFSETS_FILE, f"it holds {self._offsets.shape[0]} offsets for {len(self)} rows"
                )
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """Tokens stored per row (its length up to the last attended token)."""
        if self._lengths is None:
            self._lengths = np.diff(self.offsets)
        return self._lengths

    def __len__(self) -> int:
        return int(self.metadata["num_rows"])

    def disk_bytes(self) -> int:
        """Bytes the cache's files take on disk (allocated blocks, so a sparse unfinished file counts what is written)."""
        total = 0
        for item in self.path.iterdir():
            stat = item.stat()
            total += getattr(stat, "st_blocks", 0) * 512 or stat.st_size
        return total

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.metadata['completed_rows']}/{len(self)} rows"
        return (
            f"FeatureCache({str(self.path)!r}, rows={len(self)}, tokens={self.metadata['total_tokens']}, "
            f"hidden_states={self.indices}, dtype={self.dtype}, {state})"
        )

    # ----- reading ---------------------------------------------------------------------------------------------
    @property
    def states(self) -> np.ndarray:
        """The flat (total_tokens, S, hidden) array, memory-mapped copy-on-write (readable by torch, never written)."""
        if self._states is None:
            self._states = _load_npy(self.path / STATES_FILE, mmap_mode="c")
            expected = (int(self.metadata["total_tokens"]), len(self.indices), int(self.metadata["hidden_size"]))
            if self._states.shape != expected:
                raise DamagedFileError(
                    self.path / STATES_FILE, f"it holds an array {self._states.shape}, the metadata says {expected}"
                )
        return self._states

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_states"] = None  # a pickled memmap would be a full in-memory copy
        return state

    def _check_readable(self) -> None:
        if not self.complete:
            raise RuntimeError(
                f"The feature cache at {self.path} is unfinished ({self.metadata['completed_rows']}/{len(self)} rows): "
                "run build_feature_cache again to complete it."
            )

    def _row(self, index: int) -> torch.Tensor:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return torch.from_numpy(self.states[start:stop]).view(self.torch_dtype)  # (length, S, hidden)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Row `index` as (S, length, hidden)."""
        self._check_readable()
        return self._row(int(index)).transpose(0, 1)

    def batch(
        self,
        rows: Sequence[int],
        seq_len: int | None = None,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """(len(rows), S, seq_len, hidden) of the given rows, zeros past each row's stored length.

        `indices` picks a subset of the cached hidden states (in that order), for a model that reads fewer than
        the cache holds (e.g. a head-only baseline on a cache built for adapters). `dtype` (default: the storage
        dtype) is the dtype handed out: each row is converted while it is copied out of the memory map, so a
        half-precision cache reaches float32 adapters in one copy, not two."""
        self._check_readable()
        columns = self._columns(indices)
        rows = [int(r) for r in rows]
        lengths = self.lengths[rows] if rows else np.zeros(0, dtype=np.int64)
        seq_len = int(lengths.max(initial=0)) if seq_len is None else seq_len
        if rows and lengths.max() > seq_len:
            raise ValueError(
                f"Cached rows hold up to {int(lengths.max())} tokens but the batch has {seq_len}: the batch was "
                "truncated or tokenized differently from the cached dataset."
            )
        states = self.states
        width = states.shape[1] if columns is None else len(columns)
        out = torch.empty(len(rows), width, seq_len, states.shape[2], dtype=dtype or self.torch_dtype)
        for slot, row in enumerate(rows):
            length = int(lengths[slot])
            if length:
                part = self._row(row)
                if columns is not None:
                    part = part[:, columns]
                out[slot, :, :length].copy_(part.transpose(0, 1))  # the one copy: page cache -> batch (-> dtype)
            out[slot, :, length:].zero_()
        return out

    def _columns(self, indices: Sequence[int] | None) -> list[int] | None:
        """Positions in the cache of the requested hidden-state indices (None: all, as stored)."""
        if indices is None or list(indices) == self.indices:
            return None
        missing = [i for i in indices if i not in self.indices]
        if missing:
            raise ValueError(
                f"The feature cache at {self.path} holds hidden_states {self.indices}, not {missing}: build a cache "
                "for the adapters the model reads."
            )
        return [self.indices.index(i) for i in indices]

    # ----- use -------------------------------------------------------------------------------------------------
    def attach(self, dataset: Any, column: str = CACHE_INDEX_COLUMN, verify: bool = True) -> Any:
        """The dataset with each row's cache index in `column` (kept through shuffling, select, filtering).

        `verify` re-hashes the dataset and refuses one whose inputs are not exactly those cached. A `datasets.Dataset`
        gets a new column; any other map-style dataset is wrapped.
        """
        if len(dataset) != len(self):
            raise ValueError(f"The dataset has {len(dataset)} rows but the feature cache holds {len(self)}.")
        if verify:
            digest, _ = scan_inputs(dataset)
            if digest != self.metadata["inputs_digest"]:
                raise ValueError(
                    f"The dataset's inputs differ from those cached at {self.path} (other tokenization, order or "
                    "rows): build a feature cache for this dataset."
                )
        if _is_hf_dataset(dataset):
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            return dataset.add_column(column, np.arange(len(dataset), dtype=np.int64))
        return IndexedDataset(dataset, column)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise unless this cache holds what `model` reads: same base weights and dtype, and every hidden state the
        model reads (the cache may hold more)."""
        _check_frozen(model)
        identity = _model_identity(model)
        for field in ("base_fingerprint", "base_dtype"):
            if identity[field] != self.metadata[field]:
                raise ValueError(
                    f"The feature cache at {self.path} was built for {field}={self.metadata[field]!r}, but the model "
                    f"has {identity[field]!r}: build a feature cache for this model (build_feature_cache)."
                )
        self._columns(identity["hidden_state_indices"])


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows also carry their index (what `FeatureCache.attach` returns for non-HF data)."""

    def __init__(self, dataset: Any, column: str = CACHE_INDEX_COLUMN):
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], self.column: index}


class CachedFeatureCollator:
    """Wraps a collator: pops the cache indices, collates the rest, adds `cached_hidden_states` for the batch.

    The states are padded (with zeros) to the collated batch's sequence length, so any right-padding collator
    works. Given the `model`, it hands over exactly the hidden states that model reads, in the dtype its adapters
    compute in (converted while read), so one cache built for a model with adapters also serves, say, a head-only
    baseline on the same base. KAdapterModel and every K-Adapter head accept `cached_hidden_states`; `Trainer` drops the index column
    for other models, which this collator reports.
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
        cache: FeatureCache,
        column: str = CACHE_INDEX_COLUMN,
        model: nn.Module | None = None,
    ):
        self.base_collator = base_collator
        self.cache = cache
        self.column = column
        self.indices: list[int] | None = None
        self.dtype: torch.dtype | None = None
        cache._check_readable()
        if model is not None:
            cache.check_compatible(model)
            self.indices = cached_hidden_state_indices(model)
            self.dtype = _core(model)._compute_dtype()  # converted once, while read (see FeatureCache.batch)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows, rest = [], []
        for feature in features:
            if self.column not in feature:
                raise KeyError(
                    f"A feature has no {self.column!r} column: attach the dataset first (cache.attach(dataset)). With "
                    "Trainer the model must accept cached_hidden_states (KAdapterModel or a K-Adapter head), or "
                    "Trainer removes the column."
                )
            feature = dict(feature)
            rows.append(int(feature.pop(self.column)))
            rest.append(feature)
        batch = dict(self.base_collator(rest))
        mask = batch.get("attention_mask")
        if mask is None:
            raise ValueError("The collated batch has no attention_mask; cached_hidden_states need one.")
        lengths = torch.as_tensor(self.cache.lengths[rows])
        positions = torch.arange(mask.shape[-1])
        if bool(((positions[None, :] >= lengths[:, None]) & (mask.cpu() != 0)).any()):
            raise ValueError(
                "The batch attends to tokens past the cached length of its rows: the collator pads on the left, or the "
                "dataset is not the cached one."
            )
        batch["cached_hidden_states"] = self.cache.batch(rows, mask.shape[-1], indices=self.indices, dtype=self.dtype)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def _to_storage(states: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float16":
        half = states.to(torch.float16)
        if bool(torch.isinf(half).any()) and not bool(torch.isinf(states).any()):
            raise OverflowError("Base hidden states exceed float16's range (65504): use dtype='bfloat16' or 'float32'.")
        return half.cpu().numpy()
    if dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return states.to(torch.float32).cpu().numpy()


def _check_finite(hidden_states: tuple[torch.Tensor, ...], indices: list[int], rows: list[int]) -> None:
    """Refuse NaN/inf hidden states where they enter the cache, naming the dataset rows."""
    bad = set()
    for index in indices:
        finite = torch.isfinite(hidden_states[index]).flatten(1).all(dim=1)
        bad.update(rows[i] for i in torch.nonzero(~finite).flatten().tolist())
    if bad:
        raise ValueError(
            f"The base gives NaN or inf hidden states for dataset rows {sorted(bad)[:10]} ({len(bad)} in all): a cache "
            "of them would train the adapter on NaN. Check the base's weights and dtype (float16 overflows: run the "
            "base in float32), or drop those rows."
        )


def _pad_batch(rows: list[dict[str, np.ndarray]], lengths: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(lengths)
    fields = [f for f in INPUT_FIELDS if all(f in row for row in rows)]
    if len(fields) != len({f for row in rows for f in row}):
        raise ValueError("Some dataset rows have token_type_ids or attention_mask and others not.")
    batch = {}
    for field in fields:
        fill = pad_id if field == "input_ids" else 0
        values = np.full((len(rows), width), fill, dtype=np.int64)
        for slot, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            values[slot, :length] = row[field][:length]
        batch[field] = torch.from_numpy(values).to(device)
    if "attention_mask" not in batch:
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for slot, length in enumerate(lengths):
            mask[slot, :length] = 1
        batch["attention_mask"] = torch.from_numpy(mask).to(device)
    return batch


def _open_or_create(
    folder: Path, metadata: dict[str, Any], offsets: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.memmap, dict[str, Any]]:
    """Resume an interrupted build when its files match, else create the three files afresh, as one commit."""
    metadata_file = folder / METADATA_FILE
    np_dtype = _STORAGE[metadata["dtype"]][0]
    if metadata_file.is_file():
        try:
            previous = read_json(metadata_file)
            same = all(previous.get(k) == metadata[k] for k in _RESUME_FIELDS)
            states = np.lib.format.open_memmap(folder / STATES_FILE, mode="r+")
            matches = same and states.shape == shape and states.dtype == np_dtype
            if matches and np.array_equal(_load_npy(folder / OFFSETS_FILE), offsets):
                return states, previous
        except (OSError, ValueError):
            pass
    with FolderCommit(folder, stale=(STATES_FILE, OFFSETS_FILE, METADATA_FILE)) as staging:
        np.save(staging / OFFSETS_FILE, offsets)
        created = np.lib.format.open_memmap(staging / STATES_FILE, mode="w+", dtype=np_dtype, shape=shape)
        created.flush()
        del created  # a sparse file: nothing is written until the rows are
        _write_json(staging / METADATA_FILE, metadata)
    return np.lib.format.open_memmap(folder / STATES_FILE, mode="r+"), metadata


def _build(
    model: nn.Module,
    dataset: Any,
    folder: Path,
    metadata: dict[str, Any],
    lengths: np.ndarray,
    batch_size: int,
    chunk_size: int,
    progress: bool,
) -> None:
    core = _core(model)
    base = core.pretrained_model
    indices = metadata["hidden_state_indices"]
    num_rows = len(lengths)
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    shape = (int(offsets[-1]), len(indices), metadata["hidden_size"])
    states, metadata = _open_or_create(folder, metadata, offsets, shape)
    done = int(metadata["completed_rows"])
    pad_id = getattr(core.config.base_config, "pad_token_id", None) or 0
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()  # a frozen base runs without dropout in training too (KAdapterPreTrainedModel.train)
    bar = tqdm(total=num_rows, initial=done, desc="Caching base hidden states", unit="row", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(done, num_rows, chunk_size):
                stop = min(start + chunk_size, num_rows)
                rows = _read_rows(dataset, start, stop)
                # Longest first within the chunk: little padding per batch, and running out of memory shows at once.
                order = sorted(
                    (j for j in range(stop - start) if lengths[start + j]), key=lambda j: -lengths[start + j]
                )
                for first in range(0, len(order), batch_size):
                    members = order[first : first + batch_size]
                    member_lengths = [int(lengths[start + j]) for j in members]
                    inputs = _pad_batch([rows[j] for j in members], member_lengths, pad_id, device)
                    out = base(**inputs, output_hidden_states=True, return_dict=True)
                    _check_finite(out.hidden_states, indices, [start + j for j in members])
                    stacked = _to_storage(
                        torch.stack([out.hidden_states[i] for i in indices], dim=2), metadata["dtype"]
                    )
                    for slot, (j, length) in enumerate(zip(members, member_lengths, strict=True)):
                        row_start = offsets[start + j]
                        states[row_start : row_start + length] = stacked[slot, :length]
                    bar.update(len(members))
                bar.update(stop - start - len(order))  # empty rows: nothing to compute
                states.flush()  # the data is on disk before the metadata says so
                metadata["completed_rows"] = stop
                metadata["complete"] = stop == num_rows
                metadata["updated"] = time.time()
                _write_json(folder / METADATA_FILE, metadata)
        if num_rows == 0:
            metadata["complete"] = True
            _write_json(folder / METADATA_FILE, metadata)
    finally:
        bar.close()
        base.train(was_training)
        del states


def build_feature_cache(
    model: nn.Module,
    dataset: Any,
    cache_dir: str | os.PathLike,
    batch_size: int = 32,
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
    *,
    chunk_size: int = 1024,
) -> FeatureCache:
    """Compute (or reuse, or finish) the feature cache of `dataset` for `model`'s frozen base.

    `dataset`: tokenized rows (input_ids, attention_mask, optional token_type_ids), a `datasets.Dataset` or any
    map-style dataset of dicts. Rows are processed in chunks of `chunk_size` (sorted by length inside a chunk,
    batches of `batch_size`); after each chunk the metadata records the rows done, so an interrupted build resumes
    from there. `dtype` is the storage dtype: float32 (exact), or float16 / bfloat16 (half the disk).

    Under torch.distributed (e.g. launched with accelerate), rank 0 builds while the others wait at a barrier and
    then open the result; `cache_dir` must therefore be on a filesystem all ranks share.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be positive.")
    dtype = _storage_name(dtype)
    _check_frozen(model)
    identity = _model_identity(model)
    rank, world_size = _distributed()
    inputs_digest, lengths = scan_inputs(dataset, progress=progress and rank == 0)
    key = _cache_key(
        identity["base_fingerprint"], identity["hidden_state_indices"], dtype, identity["base_dtype"], inputs_digest
    )
    folder = Path(cache_dir) / key
    metadata = {
        "format_version": FORMAT_VERSION,
        "key": key,
        **identity,
        "base_model_name_or_path": _core(model).config.base_model_name_or_path,
        "dtype": dtype,
        "inputs_digest": inputs_digest,
        "num_rows": len(lengths),
        "total_tokens": int(lengths.sum()),
        "completed_rows": 0,
        "complete": False,
    }
    error: BaseException | None = None
    if rank == 0:
        try:
            # One builder per folder: another job building the same cache waits here, then finds it complete.
            with build_lock(folder):
                if not _is_complete(folder):
                    _build(model, dataset, folder, metadata, lengths, batch_size, chunk_size, progress)
        except BaseException as caught:  # still reach the barrier, or the other ranks would hang
            error = caught
    if world_size > 1:
        torch.distributed.barrier()
    if error is not None:
        raise error
    cache = FeatureCache(folder)
    if not cache.complete:
        raise RuntimeError(f"The feature cache at {folder} was not finished by rank 0; see its error.")
    return cache


def _is_complete(folder: Path) -> bool:
    try:
        return (folder / METADATA_FILE).is_file() and FeatureCache(folder).complete
    except (ValueError, OSError):  # another format, a damaged file: built again
        return False


__all__ = [
    "CACHE_INDEX_COLUMN",
    "CachedFeatureCollator",
    "FeatureCache",
    "IndexedDataset",
    "build_feature_cache",
    "cached_hidden_state_indices",
    "feature_cache_key",
    "scan_inputs",
]

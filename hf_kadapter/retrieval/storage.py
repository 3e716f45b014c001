"""What a `DocumentIndex` keeps in memory, sized for corpora of millions of documents.

* `IdTable`: document ids as one UTF-8 byte buffer plus offsets (about 12 bytes per short id, where a Python list
  of str and a dict from id to row take some 150), with a hash index for look-ups built on first use.
* `VectorStore`: the full-precision vectors in row order, either one tensor in RAM (or on an accelerator), or a
  read-only memory map of a safetensors file, with rows added since kept in RAM and removed rows skipped (nothing
  is copied, so a corpus larger than RAM stays on disk and only the pages a search touches are read).
* `exact_topk`: exact maximum inner product search in chunks over such a store.
* `SafetensorsStreamWriter` / `map_safetensors`: a safetensors file written block by block (its header is reserved
  up front and filled in last) and read back as memory maps, so building or loading an index never holds two copies
  of its vectors.

Memory-mapped tensors are read-only: writing into them in place is undefined (the process may crash). Every method
here copies before changing anything; `VectorStore.to(device)` gives a writable copy.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from ..utils.io import DamagedFileError, safetensors_problem

__all__ = [
    "DocumentRows",
    "IdTable",
    "SafetensorsStreamWriter",
    "VectorStore",
    "exact_topk",
    "map_safetensors",
    "nonfinite_rows",
]

_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}
_NP_DTYPES = {"F32": np.float32, "I64": np.int64, "U8": np.uint8}
HEADER_RESERVE = 4096  # bytes kept for a streamed file's header (a few tensors and their metadata need < 1 KB)


# ---------------------------------------------------------------------------------------------------------------
# Document ids
# ---------------------------------------------------------------------------------------------------------------
class DocumentRows:
    """Looks documents up by id in a documents collection (a `datasets.Dataset` or a list of dicts with an "id").

    The id -> row map is built on first use and rebuilt when the collection is another object or has another length;
    every look-up also checks the ids of the records it returns and rebuilds the map once if one differs, so a list
    edited in place (or a collection of the same length swapped in) never yields another document's text.
    """

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self._key: tuple[int, int] | None = None

    def _map(self, documents: Any, rebuild: bool) -> dict[str, int]:
        key = (id(documents), len(documents))
        if rebuild or key != self._key:
            ids = documents["id"] if hasattr(documents, "column_names") else [d["id"] for d in documents]
            self._rows, self._key = {str(doc_id): row for row, doc_id in enumerate(ids)}, key
        return self._rows

    def fetch(self, documents: Any, ids: Sequence[str], what: str = "the documents") -> list[dict[str, Any]]:
        """The records of `ids`, in order; KeyError naming the ids `documents` lacks."""
        ids = [str(doc_id) for doc_id in ids]
        for rebuild in (False, True):
            rows = self._map(documents, rebuild)
            missing = [doc_id for doc_id in ids if doc_id not in rows]
            if missing:
                if not rebuild:
                    continue
                raise KeyError(f"document ids not in {what}: {missing[:5]!r}.")
            positions = [rows[doc_id] for doc_id in ids]
            if hasattr(documents, "select"):
                selected = documents.select(positions)
                records = [selected[i] for i in range(len(positions))]
            else:
                records = [documents[row] for row in positions]
            if all(str(record["id"]) == doc_id for record, doc_id in zip(records, ids, strict=True)):
                return records
        raise KeyError(f"{what} changed while being read: look the documents up again.")  # pragma: no cover


def _encode(value: str) -> bytes:
    return value.encode("utf-8", errors="surrogatepass")


class IdTable:
    """Document ids in row order, packed: `data` (uint8, the UTF-8 bytes of every id) and `offsets` (int64 [n + 1]).

    Look-ups go through 64-bit xxh3 hashes of the ids (row order, kept up to date by `extend` / `select`) sorted
    once per change, and every hit is checked against the id itself, so a hash collision never returns a wrong row.
    """

    def __init__(self, data: np.ndarray | None = None, offsets: np.ndarray | None = None):
        self._data = np.zeros(0, dtype=np.uint8) if data is None else data
        self._offsets = np.zeros(1, dtype=np.int64) if offsets is None else offsets
        self._hashes: np.ndarray | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_list(cls, ids: Iterable[str]) -> IdTable:
        return cls.from_blocks([ids])

    @classmethod
    def from_blocks(cls, blocks: Iterable[Iterable[str]]) -> IdTable:
        """One table from blocks of ids, packed once at the end (extending block by block would copy quadratically)."""
        datas, lengths = [np.zeros(0, dtype=np.uint8)], [np.zeros(0, dtype=np.int64)]
        for ids in blocks:
            encoded = [_encode(i) for i in ids]
            datas.append(np.frombuffer(b"".join(encoded), dtype=np.uint8))
            lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        all_lengths = np.concatenate(lengths)
        offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
        np.cumsum(all_lengths, out=offsets[1:])
        return cls(np.concatenate(datas), offsets)

    @classmethod
    def concat(cls, tables: Sequence[IdTable]) -> IdTable:
        """The tables one after the other, packed once."""
        if not tables:
            return cls()
        data = np.concatenate([t._data for t in tables])
        lengths = np.concatenate([np.diff(t._offsets) for t in tables])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(data, offsets)

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> IdTable:
        """The ids of a JSON list of strings (ids.json), parsed block by block: the file is never a Python list of
        millions of strings. Anything else in the file is named by a full parse (DamagedFileError, TypeError)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            return cls.from_blocks(_json_string_blocks(text))
        except (UnicodeDecodeError, ValueError):
            from ..utils.io import read_json  # names the line and column of what is wrong

            ids = read_json(path)
            if not isinstance(ids, list):
                raise DamagedFileError(path, "it does not hold a JSON list of document ids") from None
            bad = [doc_id for doc_id in ids if not isinstance(doc_id, str)]
            if bad:
                raise TypeError(f"{path}: document ids must be strings, got {bad[:5]!r}.") from None
            return cls.from_list(ids)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row: int) -> str:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} is outside the {len(self)} ids")
        row %= max(len(self), 1)
        return self._data[self._offsets[row] : self._offsets[row + 1]].tobytes().decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 65536):
            yield from self.take(range(start, min(start + 65536, len(self))))

    def take(self, rows: Iterable[int]) -> list[str]:
        """The ids of `rows` (ints), decoded."""
        data, offsets = self._data, self._offsets
        return [data[offsets[r] : offsets[r + 1]].tobytes().decode("utf-8", "surrogatepass") for r in rows]

    def tolist(self) -> list[str]:
        return [value.decode("utf-8", "surrogatepass") for value in self._byte_values()]

    @property
    def nbytes(self) -> int:
        extra = 0 if self._hashes is None else self._hashes.nbytes
        if self._sorted is not None:
            extra += self._sorted[0].nbytes + self._sorted[1].nbytes
        return self._data.nbytes + self._offsets.nbytes + extra

    # ----- hashing and look-ups ------------------------------------------------------------------------------
    @staticmethod
    def _hash_many(values: Iterable[bytes], count: int) -> np.ndarray:
        return np.fromiter((xxhash.xxh3_64_intdigest(v) for v in values), dtype=np.uint64, count=count)

    def _row_hashes(self) -> np.ndarray:
        if self._hashes is None:
            self._hashes = self._hash_many(self._byte_values(), len(self))
        return self._hashes

    def _byte_values(self, block: int = 65536) -> Iterator[bytes]:
        """Each id's UTF-8 bytes in order, decoded block by block (no list of every offset at once)."""
        view = memoryview(self._data)
        for start in range(0, len(self), block):
            offsets = self._offsets[start : start + block + 1].tolist()
            for i in range(len(offsets) - 1):
                yield view[offsets[i] : offsets[i + 1]].tobytes()

    def _sorted_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted is None:
            hashes = self._row_hashes()
            order = np.argsort(hashes, kind="stable")
            self._sorted = (hashes[order], order.astype(np.int32) if len(order) < 2**31 else order)
        return self._sorted

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id (int64), -1 for an id that is not in the table."""
        encoded = [_encode(i) for i in ids]
        found = np.full(len(encoded), -1, dtype=np.int64)
        if not len(self) or not encoded:
            return found
        hashes, order = self._sorted_hashes()
        wanted = self._hash_many(encoded, len(encoded))
        starts = np.searchsorted(hashes, wanted, side="left")
        data, offsets = self._data, self._offsets
        for i, (value, start) in enumerate(zip(encoded, starts.tolist(), strict=True)):
            position = start
            while position < len(hashes) and hashes[position] == wanted[i]:
                row = int(order[position])
                if data[offsets[row] : offsets[row + 1]].tobytes() == value:
                    found[i] = row
                    break
                position += 1
        return found

    def release_lookup(self) -> None:
        """Free the hash index (16 to 20 bytes per id); the next look-up builds it again."""
        self._hashes = None
        self._sorted = None

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and bool(self.rows([doc_id])[0] >= 0)

    def duplicates(self, limit: int = 10) -> list[str]:
        """Up to `limit` ids that occur more than once."""
        hashes, order = self._sorted_hashes()
        same = np.nonzero(hashes[1:] == hashes[:-1])[0]
        found: list[str] = []
        for position in same.tolist():
            a, b = self.take([int(order[position]), int(order[position + 1])])
            if a == b and a not in found:
                found.append(a)
                if len(found) >= limit:
                    break
        return found

    # ----- changes ----------------------------------------------------------------------------------------------
    def extend(self, ids: Iterable[str]) -> None:
        encoded = [_encode(i) for i in ids]
        if not encoded:
            return
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets = self._offsets[-1] + np.cumsum(lengths)
        self._data = np.concatenate([self._data, np.frombuffer(b"".join(encoded), dtype=np.uint8)])
        self._offsets = np.concatenate([self._offsets, offsets])
        if self._hashes is not None:
            self._hashes = np.concatenate([self._hashes, self._hash_many(encoded, len(encoded))])
        self._sorted = None

    def select(self, keep: np.ndarray) -> None:
        """Keep the rows where `keep` (bool [n]) is True, in order."""
        lengths = np.diff(self._offsets)
        self._data = self._data[np.repeat(keep, lengths)]
        self._offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        if self._hashes is not None:
            self._hashes = self._hashes[keep]
        self._sorted = None

    def copy(self) -> IdTable:
        table = IdTable(self._data.copy(), self._offsets.copy())
        table._hashes = None if self._hashes is None else self._hashes.copy()
        return table

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The packed form as tensors (`id_data`, `id_offsets`), for a safetensors file."""
        return {"id_data": torch.from_numpy(self._data.copy()), "id_offsets": torch.from_numpy(self._offsets.copy())}

    @classmethod
    def from_tensors(cls, data: torch.Tensor, offsets: torch.Tensor) -> IdTable:
        return cls(data.numpy().astype(np.uint8, copy=True), offsets.numpy().astype(np.int64, copy=True))

    def digest(self) -> str:
        """xxh3-128 of the ids in order (equal tables, equal digests)."""
        hasher = xxhash.xxh3_128()
        hasher.update(np.ascontiguousarray(self._offsets - self._offsets[0]).tobytes())
        hasher.update(self._data.tobytes())
        return hasher.hexdigest()

    def write_json(self, stream: Any, block: int = 65536) -> None:
        """Write the ids as one JSON list (`["a","b"]`), block by block (never the whole list as Python strings)."""
        stream.write("[")
        for start in range(0, len(self), block):
            values = self.take(range(start, min(start + block, len(self))))
            stream.write(("," if start else "") + json.dumps(values, ensure_ascii=False, separators=(",", ":"))[1:-1])
        stream.write("]")


def _escaped(text: str, position: int) -> bool:
    """Whether the character at `position` follows an odd number of backslashes."""
    count = 0
    while position - count - 1 >= 0 and text[position - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _json_string_blocks(text: str, block_chars: int = 1 << 20) -> Iterator[list[str]]:
    """The strings of a JSON list, about `block_chars` of text at a time; ValueError when `text` is anything else.

    The text is cut only between items: at a `","` whose first quote is not escaped (inside a JSON string a quote
    is always escaped), so every piece is parsed by json.loads on its own. A list written with other separators is
    parsed in one piece."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError("not a JSON list")
    body = body[1:-1]
    if not body.strip():
        return
    start = 0
    while start < len(body):
        cut = body.find('","', start + block_chars)
        while cut != -1 and _escaped(body, cut):
            cut = body.find('","', cut + 1)
        end = len(body) if cut == -1 else cut + 1
        piece = json.loads("[" + body[start:end] + "]")
        if not all(isinstance(value, str) for value in piece):
            raise ValueError("not a JSON list of strings")
        yield piece
        start = end + 1


# ---------------------------------------------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------------------------------------------
def exact_topk(
    queries: torch.Tensor,
    embeddings: torch.Tensor,
    k: int,
    chunk_size: int = 65536,
    query_batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products, chunked over documents and batched over queries (running top-k merge).

    Returns `(scores [Q, k], rows [Q, k])`, rows as int64, in descending score order.
    """
    num_docs = embeddings.shape[0]
    if not 1 <= k <= num_docs:
        raise ValueError(f"k={k} must be between 1 and the number of documents ({num_docs}).")
    return _topk_segments(queries, [embeddings], k, chunk_size, query_batch_size, None)


def _topk_segments(
    queries: torch.Tensor,
    segments: Sequence[torch.Tensor],
    k: int,
    chunk_size: int,
    query_batch_size: int,
    valid: torch.Tensor | None,
    check_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_topk over the concatenation of `segments` (positions counted across them), leaving out the positions
    where `valid` (bool, one per position) is False. `check_first`: the first segment is a memory map nobody has
    checked, so a NaN or inf score from it (the queries are finite: a non-finite vector) raises instead of ranking
    first."""
    if chunk_size < 1 or query_batch_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and query_batch_size={query_batch_size} must be positive.")
    total = sum(segment.shape[0] for segment in segments)
    single = len(segments) == 1 and valid is None and total <= chunk_size
    all_scores, all_rows = [], []
    for q_start in range(0, queries.shape[0], query_batch_size):
        batch = queries[q_start : q_start + query_batch_size]
        if single:
            # One chunk: exactly the brute force computation (no extra copies).
            scores, rows = torch.topk(batch @ segments[0].T, k, dim=1)
            if check_first:
                _check_mapped_scores(scores, rows)
        else:
            best_scores = best_rows = None
            offset = 0
            for segment in segments:
                for d_start in range(0, segment.shape[0], chunk_size):
                    chunk = segment[d_start : d_start + chunk_size]
                    chunk_scores = batch @ chunk.to(batch.device).T
                    if valid is not None:
                        alive = valid[offset + d_start : offset + d_start + chunk.shape[0]].to(batch.device)
                        chunk_scores = chunk_scores.masked_fill(~alive, float("-inf"))
                    chunk_scores, chunk_rows = torch.topk(chunk_scores, min(k, chunk.shape[0]), dim=1)
                    chunk_rows += offset + d_start
                    if check_first and offset == 0:
                        _check_mapped_scores(chunk_scores, chunk_rows)
                    if best_scores is None:
                        best_scores, best_rows = chunk_scores, chunk_rows
                    else:
                        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
                        merged_rows = torch.cat([best_rows, chunk_rows], dim=1)
                        top = min(k, merged_scores.shape[1])
                        best_scores, position = torch.topk(merged_scores, top, dim=1)
                        best_rows = torch.gather(merged_rows, 1, position)
                offset += segment.shape[0]
            scores, rows = best_scores, best_rows
        all_scores.append(scores)
        all_rows.append(rows)
    return torch.cat(all_scores), torch.cat(all_rows)


def _damaged_map(positions: list[int]) -> ValueError:
    return ValueError(
        f"The memory-mapped embeddings hold NaN or inf at rows {positions[:10]} ({len(positions)} in this read): the "
        "file is damaged or was written from non-finite embeddings, and a NaN document would be the top hit of every "
        "query. Build or save the index again (load it without mmap=True to check every row at once)."
    )


def nonfinite_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Indices (int64, on the CPU) of the rows of `vectors` [N, D] that hold NaN or inf; empty when all are finite."""
    if not vectors.numel():
        return torch.zeros(0, dtype=torch.int64)
    return torch.nonzero(~torch.isfinite(vectors).all(dim=-1).cpu()).flatten()


def _check_mapped_rows(vectors: torch.Tensor, positions: torch.Tensor | int) -> None:
    """Raise when rows read from a memory map are not finite (`positions`: theirs, or the first one's)."""
    bad = nonfinite_rows(vectors)
    if len(bad):
        where = positions[bad] if isinstance(positions, torch.Tensor) else bad + positions
        raise _damaged_map(where.tolist())


def _check_mapped_scores(top_scores: torch.Tensor, top_rows: torch.Tensor) -> None:
    """Top-k scores of finite queries over a memory map: NaN and +inf (which topk ranks first, so a non-finite row
    that could change any result shows up here) mean non-finite rows; -inf is a removed row. Costs O(queries x k)."""
    bad = torch.isnan(top_scores) | torch.isposinf(top_scores)
    if bool(bad.any()):
        raise _damaged_map(torch.unique(top_rows[bad]).tolist())


# ---------------------------------------------------------------------------------------------------------------
# Full-precision vectors
# ---------------------------------------------------------------------------------------------------------------
class VectorStore:
    """The full-precision vectors of an index in row order.

    In RAM (`mapped=False`): one tensor; `append` concatenates, `keep` compacts. Memory-mapped (`mapped=True`): `base`
    is a read-only map of a file, rows appended later live in a RAM `tail`, and `keep` only records which physical
    positions are still rows (`phys`, ascending), so the file is never copied or rewritten. Rows of a map are checked
    (finite) when they are read, not when the file is opened: opening a 5 GB index reads none of it.
    """

    def __init__(self, base: torch.Tensor, mapped: bool = False):
        if base.dim() != 2:
            raise ValueError(f"vectors must be a [rows, dim] matrix, got shape {tuple(base.shape)}")
        self.base = base
        self.mapped = mapped
        self.tail = torch.empty(0, base.shape[1], dtype=base.dtype)
        self.phys: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._physical_count() if self.phys is None else len(self.phys)

    def _physical_count(self) -> int:
        return self.base.shape[0] + self.tail.shape[0]

    @property
    def dim(self) -> int:
        return self.base.shape[1]

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def ram_bytes(self) -> int:
        """Bytes of vectors held in memory (a memory-mapped base counts nothing: the OS pages it in and out)."""
        base = 0 if self.mapped else self.base.numel() * self.base.element_size()
        phys = 0 if self.phys is None else self.phys.numel() * 8
        return base + self.tail.numel() * self.tail.element_size() + phys

    def _at_positions(self, positions: torch.Tensor) -> torch.Tensor:
        count = self.base.shape[0]
        if not self.tail.shape[0]:
            out = self.base[positions.to(self.base.device)]
            if self.mapped:
                _check_mapped_rows(out, positions)
            return out
        out = torch.empty(len(positions), self.dim, dtype=self.base.dtype)
        in_base = positions < count
        out[in_base] = self.base[positions[in_base]]
        if self.mapped:
            _check_mapped_rows(out[in_base], positions[in_base])
        out[~in_base] = self.tail[positions[~in_base] - count]
        return out

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of `rows` (int64), a new tensor."""
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu() if self.mapped else torch.as_tensor(rows)
        positions = rows if self.phys is None else self.phys[rows]
        return self._at_positions(positions)

    def dense(self) -> torch.Tensor:
        """All rows in order: the base itself when nothing was added or removed (no copy), else a new tensor."""
        if self.phys is None and not self.tail.shape[0]:
            return self.base
        return self.gather(torch.arange(len(self)))

    def blocks(self, size: int) -> Iterator[torch.Tensor]:
        """Rows in order, `size` at a time (views of the base where possible)."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            if self.phys is None and stop <= self.base.shape[0]:
                block = self.base[start:stop]
                if self.mapped:
                    _check_mapped_rows(block, start)
                yield block
            else:
                yield self.gather(torch.arange(start, stop))

    def append(self, vectors: torch.Tensor) -> None:
        if not self.mapped:
            self.base = torch.cat([self.base, vectors.to(self.base.device, self.base.dtype)])
            return
        start = self._physical_count()
        self.tail = torch.cat([self.tail, vectors.to("cpu", self.tail.dtype)])
        if self.phys is not None:
            self.phys = torch.cat([self.phys, torch.arange(start, start + len(vectors))])

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows where `keep` (bool, one per row) is True."""
        if not self.mapped:
            self.base = self.base[keep.to(self.base.device)].contiguous()
            return
        positions = torch.arange(self._physical_count()) if self.phys is None else self.phys
        self.phys = positions[keep.cpu()]

    def search(
        self, queries: torch.Tensor, k: int, chunk_size: int, query_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k over the rows: `(scores, rows)`, as exact_topk."""
        if self.phys is None and not self.tail.shape[0]:
            if not 1 <= k <= len(self):
                raise ValueError(f"k={k} must be between 1 and the number of documents ({len(self)}).")
            return _topk_segments(queries, [self.base], k, chunk_size, query_batch_size, None, self.mapped)
        valid = None
        if self.phys is not None:
            valid = torch.zeros(self._physical_count(), dtype=torch.bool)
            valid[self.phys] = True
        scores, positions = _topk_segments(
            queries, [self.base, self.tail], k, chunk_size, query_batch_size, valid, self.mapped
        )
        if self.phys is None:
            return scores, positions
        rows = torch.searchsorted(self.phys, positions.cpu().reshape(-1)).reshape(positions.shape)
        return scores, rows.to(positions.device)

    def to(self, device: str | torch.device) -> VectorStore:
        """This store if it is on `device` already (a memory map counts as on the CPU), else a copy there."""
        device = torch.device(device)
        if self.base.device == device:
            return self
        return VectorStore(self.dense().to(device), mapped=False)


# ---------------------------------------------------------------------------------------------------------------
# Safetensors, streamed and memory-mapped
# ---------------------------------------------------------------------------------------------------------------
class SafetensorsStreamWriter:
    """A safetensors file written tensor by tensor, each one block by block along its first dimension.

    `begin(name, dtype)`, `write(block)` (any number of times), then `close(metadata)`: the header, whose size is
    only known at the end, goes into space reserved at the start (JSON padded with spaces, which the format
    allows). Tensors must come in alphabetical order of their names (the order their data is laid out in).
    """

    def __init__(self, path: str | os.PathLike, reserve: int = HEADER_RESERVE):
        self.path = Path(path)
        self.reserve = reserve
        self._stream = open(self.path, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._stream.write(b"\0" * (8 + reserve))
        self._entries: dict[str, dict[str, Any]] = {}
        self._current: str | None = None
        self._offset = 0

    def begin(self, name: str, dtype: torch.dtype, trailing_shape: Sequence[int] = ()) -> None:
        if self._entries and name <= max(self._entries):
            raise ValueError(f"tensor {name!r} must come after {max(self._entries)!r} (alphabetical order)")
        self._current = name
        self._entries[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": [0, *trailing_shape],
            "data_offsets": [self._offset, self._offset],
            "torch_dtype": dtype,
        }

    def write(self, block: torch.Tensor | np.ndarray) -> None:
        entry = self._entries[self._current]
        array = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
        expected = _NP_DTYPES[entry["dtype"]]
        if array.dtype != expected or list(array.shape[1:]) != entry["shape"][1:]:
            raise ValueError(
                f"{self._current}: a block of {array.dtype} {tuple(array.shape)} does not fit "
                f"{np.dtype(expected)} [*, {entry['shape'][1:]}]"
            )
        data = np.ascontiguousarray(array)
        self._stream.write(memoryview(data).cast("B"))
        entry["shape"][0] += array.shape[0] if array.ndim else 1
        self._offset += data.nbytes
        entry["data_offsets"][1] = self._offset

    def close(self, metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {
            name: {key: value for key, value in entry.items() if key != "torch_dtype"}
            for name, entry in sorted(self._entries.items())
        }
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(encoded) > self.reserve:
            self.abort()
            raise ValueError(f"the safetensors header ({len(encoded)} bytes) outgrew its reserve ({self.reserve})")
        self._stream.seek(0)
        self._stream.write(self.reserve.to_bytes(8, "little") + encoded.ljust(self.reserve, b" "))
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()

    def abort(self) -> None:
        self._stream.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and not self._stream.closed:
            self.abort()


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        return 8 + length, json.loads(stream.read(length).decode("utf-8"))


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as read-only memory maps (F32, I64 and U8 tensors; nothing is read until
    used). A damaged file is named (DamagedFileError)."""
    path = Path(path)
    problem = safetensors_problem(path)
    if problem is not None:
        raise DamagedFileError(path, problem)
    start, header = _header(path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _NP_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise DamagedFileError(path, f"tensor {name!r} has dtype {entry.get('dtype')}, which is not mapped here")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise DamagedFileError(path, f"tensor {name!r} of shape {shape} does not fill its {end - begin} bytes")
        if end == begin:
            array = np.zeros(shape, dtype=dtype)
        else:
            array = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        with warnings.catch_warnings():  # read-only on purpose: see the module docstring
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors[name] = torch.from_numpy(array)
    return tensors

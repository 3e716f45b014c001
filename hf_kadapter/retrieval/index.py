"""A document index for maximum inner product search (MIPS) over retriever embeddings, sized for corpora past RAM.

`DocumentIndex` keeps string document ids (packed, see storage.IdTable), their float32 embeddings `[N, D]` and,
optionally, a `datasets.Dataset` with the documents' titles and texts. Backends:

* `"exact"` (default): exact MIPS in torch. Documents are scored in chunks of `chunk_size` rows and queries in
  batches of `query_batch_size`, with a running top-k merge, so memory stays bounded and the result equals
  `torch.topk(queries @ embeddings.T, k)` (scores exactly; under ties the row chosen among equal scores may
  differ). The embeddings live in RAM, on an accelerator (`to`), or memory-mapped from disk.
* `"faiss"` (faiss-cpu, `pip install faiss-cpu` or the `faiss` extra), inner product metric, `faiss_index`:
  - `"ivf"` (IndexIVFFlat: `nlist` cells, `nprobe` visited per query) and `"hnsw"` (IndexHNSWFlat: `M` links per
    node, `ef_search`) store full vectors inside faiss. faiss then holds the only copy in memory: the torch copy is
    dropped once the faiss index is built (or stays a memory map of the saved file), and `get` / `embeddings` read
    the vectors back from faiss.
  - `"ivfpq"` (IndexIVFPQ: `pq_m` codes of `pq_bits` bits per vector) and `"ivfsq"` (IndexIVFScalarQuantizer, one
    byte per dimension) keep only compressed codes in memory. faiss returns `rescore_factor * k` candidates, which are
    re-scored exactly from the full vectors (memory-mapped from disk when the index was loaded with `mmap=True` or
    built on disk) before the top k are kept: the scores returned are exact inner products.
  Vectors are stored under an internal int64 key per document (ascending in row order), so `add` never rebuilds
  (add_with_ids) and, for the IVF kinds, `remove` uses `remove_ids` in place. HNSW cannot delete vectors: `remove`
  rebuilds it. An IVF index is trained once, on a sample of the embeddings present when it is first built (lazily,
  at the first search or save); later adds are assigned to the trained cells: call `rebuild_faiss()` after the
  corpus changes a lot.

Past RAM: `DocumentIndex.build_on_disk(folder, blocks)` writes an index from blocks of (ids, embeddings) without
holding them all, and `from_pretrained(folder, mmap=True)` maps the saved embeddings instead of reading them, so with
"ivfpq" a corpus of 10M x 128 float32 (5 GB) is searched with a few hundred MB of RAM. Memory-mapped embeddings are
read-only (writing into `index.embeddings` in place is undefined); rows added later live in RAM, removed rows are
skipped, and saving writes a new file.

Row indices returned by `search` refer to the current order of the ids; they shift after `remove`, so convert
them with `ids_at(rows)` before changing the index.

Saved folders (`save_pretrained`) hold `index_config.json` (backend and parameters), `ids.json`,
`embeddings.safetensors` (embeddings + faiss keys, written block by block), for faiss `faiss.index` in faiss's own
format (`faiss.write_index`; `faiss.read_index` reads it) and optionally `documents/`; no pickle. They are written as
one folder commit (hf_kadapter.utils.io), so a reader never sees new embeddings beside old ids or an old faiss file.

Embeddings and queries must be finite: a NaN document would be the top hit of every query and a NaN query scores
NaN everywhere (faiss refuses them with a raw C++ error), so both are refused where they enter, by id or row.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.hub import LIBRARY_NAME, HubMixin, card_is_ours, model_card, resolve_folder, split_download_kwargs
from ..utils.io import DamagedFileError, FolderCommit, read_json, reading_folder
from .storage import (
    DocumentRows,
    IdTable,
    SafetensorsStreamWriter,
    VectorStore,
    exact_topk,
    map_safetensors,
    nonfinite_rows,
)

BACKENDS = ("exact", "faiss")
FAISS_INDEXES = ("ivf", "hnsw", "ivfpq", "ivfsq")
FLAT_FAISS = ("ivf", "hnsw")  # faiss stores the full vectors
COMPRESSED_FAISS = ("ivfpq", "ivfsq")  # faiss stores codes; candidates are re-scored from the full vectors
CONFIG_NAME = "index_config.json"
IDS_NAME = "ids.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
FAISS_NAME = "faiss.index"
DOCUMENTS_DIR = "documents"
FORMAT_VERSION = 1
BLOCK_ROWS = 65536  # rows read, written or added to faiss at once
# The search settings, saved in index_config.json and kept by a refresh (IndexRefreshCallback).
SETTINGS = (
    "backend",
    "faiss_index",
    "nlist",
    "nprobe",
    "M",
    "ef_search",
    "ef_construction",
    "train_size",
    "chunk_size",
    "query_batch_size",
    "pq_m",
    "pq_bits",
    "rescore_factor",
)
# Files of ours that a new save may not write again (then they are deleted: stale faiss file, stale documents).
_OWN_OPTIONAL = (FAISS_NAME, f"{DOCUMENTS_DIR}/**")


def check_finite_rows(vectors: torch.Tensor, what: str, names: Sequence[Any] | None = None) -> None:
    """Raise a ValueError naming the rows of `vectors` [N, D] that hold NaN or inf (by name when given)."""
    rows = nonfinite_rows(vectors).tolist()
    if not rows:
        return
    labels = [names[r] for r in rows] if names is not None else rows
    raise ValueError(
        f"{what} {labels[:10]} ({len(rows)} in all) hold NaN or inf: inner products with them are NaN and a NaN "
        "document would be the top hit of every query. Check the embedder's weights and dtype (float16 overflows: "
        "embed in float32), then embed them again, or leave them out."
    )


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DocumentIndex(backend='faiss') needs faiss: `pip install faiss-cpu` "
            "(or `pip install hf_kadapter[faiss]`), or use backend='exact'."
        ) from error
    return faiss


def _check_id_types(ids: Sequence[Any]) -> None:
    bad = [doc_id for doc_id in ids if not isinstance(doc_id, str)]
    if bad:
        raise TypeError(f"document ids must be strings, got {bad[:5]!r}.")


def _read_into_memory(path: Path, tensor: torch.Tensor) -> torch.Tensor:
    """A RAM copy of a memory-mapped tensor; running out of memory is named as such, with the fix."""
    try:
        return tensor.clone()
    except (RuntimeError, MemoryError) as error:
        if isinstance(error, RuntimeError) and "allocate" not in str(error):
            raise
        size = tensor.numel() * tensor.element_size() / 2**20
        raise MemoryError(
            f"{path}: its {tuple(tensor.shape)} tensor ({size:,.0f} MiB) does not fit in memory. Load the index with "
            "DocumentIndex.from_pretrained(..., mmap=True) to read the embeddings from disk, with faiss_index='ivfpq' "
            "or 'ivfsq' to keep only compressed codes in memory."
        ) from None


def _default_pq_m(dim: int) -> int:
    """Sub-quantizers for IVF-PQ: about 4 dimensions each (32 one-byte codes for 128-d), dividing `dim`."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


class DocumentIndex(HubMixin):
    """Document ids + embeddings with exact (torch) or approximate (faiss) inner-product search.

    Args:
        ids: document ids (strings, unique).
        embeddings: float tensor `[N, D]` (converted to float32; kept on its device).
        backend: "exact" or "faiss".
        faiss_index: "ivf", "hnsw", "ivfpq" or "ivfsq" (faiss backend only).
        nlist: IVF cells; default `4 * sqrt(N)` capped so every cell gets >= 39 training points.
        nprobe: IVF cells visited per query.
        M: HNSW links per node.
        ef_search / ef_construction: HNSW search / build breadth.
        train_size: IVF k-means training points, a random sample of the documents; default `64 * nlist`.
        chunk_size: documents scored at once by the exact backend.
        query_batch_size: queries scored at once by the exact backend and by re-scoring.
        pq_m: IVF-PQ codes per vector (default: one per 8 dimensions).
        pq_bits: bits per IVF-PQ code (default 8, fewer when there are too few training points for 256 centroids).
        rescore_factor: "ivfpq" / "ivfsq" take `rescore_factor * k` candidates from faiss and re-score them exactly.
        documents: optional `datasets.Dataset` with the documents (e.g. columns id, title, text).
        dim: embedding width, needed only to create an empty index.
    """

    def __init__(
        self,
        ids: Sequence[str] | None = None,
        embeddings: torch.Tensor | None = None,
        *,
        backend: str = "exact",
        faiss_index: str = "ivf",
        nlist: int | None = None,
        nprobe: int = 16,
        M: int = 32,
        ef_search: int = 128,
        ef_construction: int = 200,
        train_size: int | None = None,
        chunk_size: int = 65536,
        query_batch_size: int = 1024,
        pq_m: int | None = None,
        pq_bits: int | None = None,
        rescore_factor: int = 16,
        documents: Any = None,
        dim: int | None = None,
    ):
        ids = [] if ids is None else list(ids)
        if embeddings is None:
            if ids:
                raise ValueError(f"{len(ids)} ids were given without embeddings.")
            if dim is None:
                raise ValueError("An empty DocumentIndex needs `dim` (the embedding width).")
            embeddings = torch.empty(0, dim)
        _check_id_types(ids)
        table = IdTable.from_list(ids)
        duplicates = table.duplicates(5)
        if duplicates:
            raise ValueError(f"duplicate document ids {duplicates!r}: ids must be unique in the index.")
        if len(table) > BLOCK_ROWS:
            table.release_lookup()  # built again by the first look-up by id; a search needs none
        embeddings = self._check_embeddings(embeddings, len(ids), dim, ids)
        self._setup(
            table,
            VectorStore(embeddings),
            torch.arange(len(ids), dtype=torch.int64),
            len(ids),
            embeddings.shape[1],
            embeddings.device,
            documents,
            dict(
                backend=backend,
                faiss_index=faiss_index,
                nlist=nlist,
                nprobe=nprobe,
                M=M,
                ef_search=ef_search,
                ef_construction=ef_construction,
                train_size=train_size,
                chunk_size=chunk_size,
                query_batch_size=query_batch_size,
                pq_m=pq_m,
                pq_bits=pq_bits,
                rescore_factor=rescore_factor,
            ),
        )

    def _setup(
        self,
        table: IdTable,
        store: VectorStore | None,
        keys: torch.Tensor,
        next_key: int,
        dim: int,
        device: torch.device,
        documents: Any,
        settings: dict[str, Any],
    ) -> None:
        """Shared by __init__, loading and on-disk building: check the settings and attach the parts."""
        backend, faiss_index = settings["backend"], settings["faiss_index"]
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}.")
        if faiss_index not in FAISS_INDEXES:
            raise ValueError(f"faiss_index={faiss_index!r} is not supported; use one of {FAISS_INDEXES}.")
        if settings["chunk_size"] < 1 or settings["query_batch_size"] < 1:
            raise ValueError(
                f"chunk_size={settings['chunk_size']} and query_batch_size={settings['query_batch_size']} must be "
                "positive."
            )
        if settings["rescore_factor"] < 1:
            raise ValueError(
                f"rescore_factor={settings['rescore_factor']} must be at least 1 (1: no extra candidates)."
            )
        pq_m = settings["pq_m"]
        if faiss_index == "ivfpq" and pq_m is not None and (pq_m < 1 or dim % pq_m):
            raise ValueError(f"pq_m={pq_m} must divide the embedding width {dim} (e.g. pq_m={_default_pq_m(dim)}).")
        if settings["pq_bits"] is not None and not 1 <= settings["pq_bits"] <= 16:
            raise ValueError(f"pq_bits={settings['pq_bits']} must be between 1 and 16.")
        if backend == "faiss":
            _import_faiss()
        for key, value in settings.items():
            setattr(self, key, value)
        self._ids = table
        self._store = store
        self._keys = keys
        self._next_key = next_key
        self._dim = dim
        self._device = torch.device(device)
        self.documents = documents  # the attached documents dataset (or None)
        self._doc_rows = DocumentRows()  # follows `documents` when it is replaced
        self._faiss = None
        self._journal: list[tuple[str, list[str]]] | None = None
        # The fingerprint of the embedder that made the embeddings (set by RealmStyleRetriever.build_index), saved.
        self.embedder_fingerprint: str | None = None

    # ----- basic properties -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._ids

    def __repr__(self) -> str:
        extra = f", faiss_index={self.faiss_index!r}" if self.backend == "faiss" else ""
        mapped = ", memory-mapped" if self._store is not None and self._store.mapped else ""
        return (
            f"DocumentIndex(num_docs={len(self)}, dim={self.dim}, backend={self.backend!r}{extra}, "
            f"device={self.device}{mapped})"
        )

    def __deepcopy__(self, memo: dict) -> DocumentIndex:
        """A copy that changes independently: a memory-mapped file is shared (it is never written), the rest copied."""
        other = copy.copy(self)
        other._ids = self._ids.copy()
        other._keys = self._keys.clone()
        if self._store is not None:
            store = copy.copy(self._store)
            if not store.mapped:
                store.base = store.base.clone()
            store.tail = store.tail.clone()
            store.phys = None if store.phys is None else store.phys.clone()
            other._store = store
        if self._faiss is not None:
            other._faiss = _import_faiss().clone_index(self._faiss)
        other._journal = None
        other._doc_rows = DocumentRows()
        return other

    @property
    def ids(self) -> list[str]:
        """The document ids in row order, as a new list (for millions of documents prefer `id_table` / `ids_at`)."""
        return self._ids.tolist()

    @property
    def id_table(self) -> IdTable:
        """The packed ids (storage.IdTable): read it, never change it."""
        return self._ids

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def memory_mapped(self) -> bool:
        """Whether the full vectors are read from a memory-mapped file rather than held in RAM."""
        return self._store is not None and self._store.mapped

    @property
    def embeddings(self) -> torch.Tensor:
        """All embeddings `[N, D]` in row order. The stored tensor itself when there is one (a read-only memory map
        for indexes loaded with mmap=True); a new tensor when faiss holds the only copy or rows were added to or
        removed from a memory-mapped index (then this costs a pass over the vectors)."""
        if self._store is not None:
            return self._store.dense()
        return self._gather(torch.arange(len(self))).to(self._device)

    def to(self, device: str | torch.device) -> DocumentIndex:
        """Move the embeddings (the exact backend searches where they are); returns self."""
        if self._store is not None:
            self._store = self._store.to(device)
        self._device = torch.device(device)
        return self

    def settings(self) -> dict[str, Any]:
        """The backend and its search settings, as keyword arguments of DocumentIndex."""
        return {key: getattr(self, key) for key in SETTINGS}

    # ----- checks ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_embeddings(
        embeddings: torch.Tensor, count: int, dim: int | None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor):
            embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be a [num_docs, dim] matrix, got shape {tuple(embeddings.shape)}.")
        if embeddings.shape[0] != count:
            raise ValueError(f"{count} ids but {embeddings.shape[0]} embedding rows; they must match.")
        if dim is not None and embeddings.shape[1] != dim:
            raise ValueError(f"embeddings have width {embeddings.shape[1]}, the index has dim={dim}.")
        embeddings = embeddings.detach().to(torch.float32).contiguous()
        check_finite_rows(embeddings, "The embeddings of documents", ids)
        return embeddings

    def _check_new_ids(self, ids: list[str]) -> None:
        _check_id_types(ids)
        seen: set[str] = set()
        duplicates = [doc_id for doc_id in ids if doc_id in seen or seen.add(doc_id)]
        present = self._ids.rows(ids)
        duplicates += [doc_id for doc_id, row in zip(ids, present.tolist(), strict=True) if row >= 0]
        if duplicates:
            raise ValueError(f"duplicate document ids {duplicates[:5]!r}: ids must be unique in the index.")

    # ----- look-ups ----------------------------------------------------------------------------------------------
    def rows(self, ids: Iterable[str]) -> torch.Tensor:
        """Current row of each id (int64)."""
        ids = list(ids)
        rows = self._ids.rows(ids) if all(isinstance(i, str) for i in ids) else None
        if rows is None or (rows < 0).any():
            missing = [doc_id for doc_id in ids if doc_id not in self._ids]
            raise KeyError(f"document ids not in the index: {missing[:5]!r} ({len(missing)} missing).")
        return torch.from_numpy(rows)

    def get(self, ids: Iterable[str]) -> torch.Tensor:
        """Embeddings `[len(ids), D]` of the given document ids."""
        return self._gather(self.rows(ids)).to(self._device)

    def ids_at(self, rows: torch.Tensor | Sequence) -> list:
        """Ids of row indices, keeping the shape as nested lists (rows of -1, i.e. no result, give None)."""
        rows = torch.as_tensor(rows).tolist()
        table = self._ids

        def convert(value):
            if isinstance(value, list):
                return [convert(v) for v in value]
            return table[value] if value >= 0 else None

        return convert(rows)

    def get_documents(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """Rows of `documents` for the ids: matched through its "id" column if it has one, else by position
        (then `documents` must be aligned with the index order, which `remove` breaks)."""
        if self.documents is None:
            raise ValueError("This DocumentIndex has no `documents` dataset attached.")
        ids = list(ids)
        if "id" in getattr(self.documents, "column_names", []):
            return self._doc_rows.fetch(self.documents, ids, "the documents dataset")
        positions = self.rows(ids).tolist()
        selected = self.documents.select(positions)
        return [selected[i] for i in range(len(positions))]

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Full vectors of `rows`, from the store or, when faiss holds the only copy, from faiss."""
        if self._store is not None:
            return self._store.gather(rows)
        return self._faiss_vectors(self._keys[rows.cpu()])

    def _faiss_vectors(self, keys: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(keys), self.dim)
        for start in range(0, len(keys), BLOCK_ROWS):
            block = keys[start : start + BLOCK_ROWS].numpy()
            out[start : start + len(block)] = torch.from_numpy(self._faiss.reconstruct_batch(block))
        return out

    def _vector_blocks(self) -> Iterator[torch.Tensor]:
        """All vectors in row order, BLOCK_ROWS at a time, on the CPU."""
        if self._store is not None:
            for block in self._store.blocks(BLOCK_ROWS):
                yield block.cpu()
            return
        for start in range(0, len(self), BLOCK_ROWS):
            yield self._faiss_vectors(self._keys[start : start + BLOCK_ROWS])

    # ----- search --------------------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k documents by inner product: `(scores [Q, k] float32, rows [Q, k] int64)`, best first.

        `k` larger than the index is reduced to its size. Results come back on the queries' device. With the
        faiss backend, a query that reaches fewer than k documents (small nprobe) gets rows -1 and scores -inf.
        """
        if not isinstance(queries, torch.Tensor):
            queries = torch.as_tensor(queries)
        if queries.dim() == 1:
            queries = queries.unsqueeze(0)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [num_queries, {self.dim}], got shape {tuple(queries.shape)}.")
        if len(self) == 0:
            raise ValueError("The index is empty: add documents before searching.")
        if k < 1:
            raise ValueError(f"k={k} must be at least 1.")
        check_finite_rows(queries.detach(), "Queries (rows)")
        k = min(k, len(self))
        out_device = queries.device
        queries = queries.detach()
        if self.backend == "exact":
            scores, rows = self._store.search(
                queries.to(self._store.device, torch.float32), k, self.chunk_size, self.query_batch_size
            )
            return scores.to(out_device), rows.to(out_device)
        index = self._get_faiss()
        self._set_search_params(index)
        queries = queries.to("cpu", torch.float32).contiguous()
        fetch = k if self.faiss_index in FLAT_FAISS else min(len(self), k * self.rescore_factor)
        scores, keys = index.search(queries.numpy(), fetch)
        rows = self._rows_of_keys(torch.from_numpy(keys))
        scores = torch.from_numpy(scores)
        if self.faiss_index in COMPRESSED_FAISS:
            scores, rows = self._rescore(queries, rows, k)
        scores = scores.masked_fill(rows < 0, float("-inf"))
        return scores.to(out_device), rows.to(out_device)

    def _rescore(self, queries: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inner products of the candidates `rows` [Q, F] (-1: none), read from the full vectors; top k."""
        all_scores, all_rows = [], []
        for start in range(0, len(queries), self.query_batch_size):
            batch, candidates = (
                queries[start : start + self.query_batch_size],
                rows[start : start + self.query_batch_size],
            )
            valid = candidates >= 0
            unique, inverse = torch.unique(candidates.clamp(min=0), return_inverse=True)  # sorted: reads in file order
            vectors = self._gather(unique).to(torch.float32).cpu()
            exact = torch.einsum("qd,qfd->qf", batch, vectors[inverse])
            exact = exact.masked_fill(~valid, float("-inf"))
            top_scores, position = torch.topk(exact, min(k, exact.shape[1]), dim=1)
            top_rows = torch.gather(candidates, 1, position).masked_fill(~torch.isfinite(top_scores), -1)
            all_scores.append(top_scores)
            all_rows.append(top_rows)
        return torch.cat(all_scores), torch.cat(all_rows)

    # ----- changes -------------------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], embeddings: torch.Tensor) -> None:
        """Append documents (exact: concatenation; faiss: add_with_ids into the existing index, no rebuild).
        On a memory-mapped index the new rows are kept in RAM; the file is not touched."""
        ids = list(ids)
        self._check_new_ids(ids)
        embeddings = self._check_embeddings(embeddings, len(ids), self.dim, ids)
        if not ids:
            return
        keys = torch.arange(self._next_key, self._next_key + len(ids), dtype=torch.int64)
        self._next_key += len(ids)
        if self._store is not None:
            self._store.append(embeddings)
        self._ids.extend(ids)
        self._keys = torch.cat([self._keys, keys])
        if self._faiss is not None:
            self._faiss.add_with_ids(embeddings.cpu().numpy(), keys.numpy())
        if self._journal is not None:
            self._journal.append(("add", ids))

    def remove(self, ids: Iterable[str]) -> None:
        """Delete documents: rows after them shift down (a memory-mapped file is not rewritten: its removed rows
        are skipped). faiss IVF kinds remove the keys in place (`remove_ids`); HNSW does not support deletion, so
        its faiss index is rebuilt from the remaining embeddings."""
        ids = list(dict.fromkeys(ids))
        rows = self.rows(ids)
        if not len(rows):
            return
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[rows] = False
        removed_keys = self._keys[~keep]
        if self._faiss is not None and self.faiss_index == "hnsw":
            if self._store is None:  # faiss holds the only copy: take the kept vectors out before dropping it
                self._store = VectorStore(self._faiss_vectors(self._keys[keep]).to(self._device))
            else:
                self._store.keep(keep)
            self._faiss = None  # rebuilt lazily at the next search
        else:
            if self._store is not None:
                self._store.keep(keep)
            if self._faiss is not None:
                self._faiss.remove_ids(removed_keys.numpy())
        self._ids.select(keep.numpy())
        self._keys = self._keys[keep]
        if self._journal is not None:
            self._journal.append(("remove", ids))

    def start_journal(self) -> None:
        """Record every add and remove from now on (IndexRefreshCallback replays them on the refreshed index)."""
        self._journal = []

    def stop_journal(self) -> list[tuple[str, list[str]]]:
        """The ("add" | "remove", ids) changes recorded since start_journal, in order; recording stops."""
        journal, self._journal = self._journal or [], None
        return journal

    # ----- faiss ---------------------------------------------------------------------------------------------
    def default_nlist(self, num_docs: int | None = None) -> int:
        num_docs = len(self) if num_docs is None else num_docs
        return max(1, min(int(4 * math.sqrt(num_docs)), num_docs // 39))

    def rebuild_faiss(self) -> None:
        """(Re)build the faiss index from the current embeddings (IVF kinds: retrained), block by block. For "ivf"
        and "hnsw" faiss then holds the only in-memory copy of the vectors (a memory-mapped store is kept)."""
        if self.backend != "faiss":
            raise ValueError("rebuild_faiss() is only for backend='faiss'.")
        faiss = _import_faiss()
        if len(self) == 0:
            raise ValueError("Cannot build a faiss index over an empty DocumentIndex.")
        if self._store is None:  # faiss holds the only copy: take it out to rebuild
            self._store = VectorStore(self._faiss_vectors(self._keys))
        self._faiss = None
        index = self._new_faiss(faiss)
        if self.faiss_index == "hnsw":
            for start, block in zip(range(0, len(self), BLOCK_ROWS), self._store.blocks(BLOCK_ROWS), strict=True):
                keys = self._keys[start : start + len(block)]
                index.add_with_ids(np.ascontiguousarray(block.cpu().numpy(), dtype=np.float32), keys.numpy())
        else:
            self._fill_ivf(faiss, index)
        self._faiss = index
        if self.faiss_index in FLAT_FAISS and not self._store.mapped:
            if self.faiss_index == "ivf":  # get() by key, from faiss (a hash table: about 50 bytes per vector)
                index.set_direct_map_type(faiss.DirectMap.Hashtable)
            self._store = None  # one copy in memory: faiss's

    def _fill_ivf(self, faiss, index) -> None:
        """Add every vector to a trained IVF index with its inverted lists allocated once at their final size: the
        vectors are assigned to cells first (faiss's coarse quantizer), then added with those assignments (add_core),
        so no list grows by doubling and holds up to twice the memory it needs."""
        assignments, counts = [], np.zeros(index.nlist, dtype=np.int64)
        for block in self._store.blocks(BLOCK_ROWS):
            vectors = np.ascontiguousarray(block.cpu().numpy(), dtype=np.float32)
            cells = index.quantizer.assign(vectors, 1).reshape(-1)
            assignments.append(cells)
            counts += np.bincount(cells, minlength=index.nlist)
        for cell in np.nonzero(counts)[0].tolist():  # reserve exactly: grow to the final size, empty, keep capacity
            index.invlists.resize(cell, int(counts[cell]))
            index.invlists.resize(cell, 0)
        start = 0
        for block, cells in zip(self._store.blocks(BLOCK_ROWS), assignments, strict=True):
            vectors = np.ascontiguousarray(block.cpu().numpy(), dtype=np.float32)
            keys = np.ascontiguousarray(self._keys[start : start + len(vectors)].numpy(), dtype=np.int64)
            index.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(keys), faiss.swig_ptr(cells))
            start += len(vectors)

    def _new_faiss(self, faiss):
        """An empty, trained faiss index of the configured kind."""
        if self.faiss_index == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            return faiss.IndexIDMap2(inner)
        nlist = self.nlist or self.default_nlist()
        if nlist > len(self):
            raise ValueError(f"nlist={nlist} is larger than the number of documents ({len(self)}).")
        # k-means wants >= 39 points per centroid: per IVF cell, and per PQ code (2**bits of them).
        wanted = max(64 * nlist, 39 * 256) if self.faiss_index == "ivfpq" else 64 * nlist
        train_size = min(len(self), self.train_size or wanted)
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.faiss_index == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        elif self.faiss_index == "ivfsq":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            m = self.pq_m or _default_pq_m(self.dim)
            bits = self.pq_bits or max(1, min(8, int(math.log2(max(train_size // 39, 2)))))
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        sample = torch.arange(len(self))
        if train_size < len(self):
            generator = torch.Generator().manual_seed(0)
            sample = torch.randperm(len(self), generator=generator)[:train_size].sort().values
        index.train(np.ascontiguousarray(self._gather(sample).cpu().numpy(), dtype=np.float32))
        return index

    def _get_faiss(self):
        if self._faiss is None:
            self.rebuild_faiss()
        return self._faiss

    def _set_search_params(self, index) -> None:
        faiss = _import_faiss()
        if self.faiss_index == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = max(self.ef_search, 1)
        else:
            faiss.extract_index_ivf(index).nprobe = self.nprobe

    def _rows_of_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of faiss keys (keys ascend with rows: a binary search), -1 for keys that are no document."""
        flat = keys.reshape(-1)
        rows = torch.searchsorted(self._keys, flat.clamp(min=0)).clamp(max=max(len(self) - 1, 0))
        found = (flat >= 0) & (self._keys[rows] == flat) if len(self) else torch.zeros_like(flat, dtype=torch.bool)
        return torch.where(found, rows, -1).reshape(keys.shape)

    # ----- persistence ---------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            **self.settings(),
            "num_docs": len(self),
            "dim": self.dim,
            "next_key": self._next_key,
            "embedder_fingerprint": self.embedder_fingerprint,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, save_documents: bool = True) -> None:
        """Write the index folder (safetensors + JSON, faiss.write_index for faiss) as one folder commit.

        The documents dataset, if any and `save_documents`, goes to `documents/` with `save_to_disk`; a
        `documents/` left by an earlier save is removed otherwise (it would describe another corpus). Saving into
        the folder the index was loaded from works (a memory-mapped index included).
        """
        with FolderCommit(save_directory, stale=_OWN_OPTIONAL) as staging:
            self.write_files(staging, save_documents=save_documents, final_directory=save_directory)

    def write_files(
        self, folder: str | os.PathLike, save_documents: bool = True, final_directory: str | os.PathLike | None = None
    ) -> None:
        """Write the index's files into `folder` directly (a commit's staging folder), the embeddings block by block;
        the card is written unless `final_directory` holds a README.md by someone else."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with SafetensorsStreamWriter(folder / EMBEDDINGS_NAME) as writer:
            writer.begin("embeddings", torch.float32, (self.dim,))
            for block in self._vector_blocks():
                writer.write(block.to(torch.float32))
            writer.begin("keys", torch.int64)
            writer.write(self._keys)
            writer.close({"format": "pt"})
        self._write_rest(folder, save_documents, final_directory)

    def _write_rest(self, folder: Path, save_documents: bool, final_directory: str | os.PathLike | None) -> None:
        """Everything but the embeddings: ids, faiss index, documents, card, config (last)."""
        with open(folder / IDS_NAME, "w", encoding="utf-8") as stream:
            self._ids.write_json(stream)
        if self.backend == "faiss" and len(self):
            _import_faiss().write_index(self._get_faiss(), str(folder / FAISS_NAME))
        if self.documents is not None and save_documents:
            self.documents.save_to_disk(str(folder / DOCUMENTS_DIR))
        if card_is_ours(Path(final_directory or folder) / "README.md"):
            (folder / "README.md").write_text(self._model_card(), encoding="utf-8")
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2), encoding="utf-8")

    @classmethod
    def build_on_disk(
        cls,
        save_directory: str | os.PathLike,
        blocks: Iterable[tuple[Sequence[str], torch.Tensor]],
        *,
        documents: Any = None,
        embedder_fingerprint: str | None = None,
        **settings: Any,
    ) -> DocumentIndex:
        """Write an index folder from `blocks` of (ids, embeddings [n, D]) without ever holding them all (the
        embeddings go straight to disk; for faiss, the index is built from the memory-mapped file and saved
        beside it), as one folder commit; returns the index, memory-mapped from the folder. `settings` are
        DocumentIndex's (backend, faiss_index, nlist, ...)."""
        folder = Path(save_directory)
        with FolderCommit(folder, stale=_OWN_OPTIONAL) as staging:
            index = cls._write_streaming(
                staging, blocks, documents=documents, settings=settings, embedder_fingerprint=embedder_fingerprint
            )
            index._write_rest(staging, save_documents=True, final_directory=folder)
        return index  # its memory map follows the file into the folder (a rename keeps it valid)

    @classmethod
    def _write_streaming(
        cls,
        folder: Path,
        blocks: Iterable[tuple[Sequence[str], torch.Tensor]],
        documents: Any = None,
        settings: dict[str, Any] | None = None,
        embedder_fingerprint: str | None = None,
    ) -> DocumentIndex:
        """embeddings.safetensors in `folder` from the blocks, and the index over its memory map (the other files
        are written by _write_rest). Ids are checked (strings, unique), embeddings checked block by block."""
        unknown = sorted(set(settings or {}) - set(SETTINGS))
        if unknown:
            raise TypeError(f"unknown DocumentIndex settings {unknown}; the settings are {SETTINGS}.")
        folder.mkdir(parents=True, exist_ok=True)
        id_blocks: list[list[str]] = []
        dim = None
        with SafetensorsStreamWriter(folder / EMBEDDINGS_NAME) as writer:
            for block_ids, block in blocks:
                block_ids = list(block_ids)
                _check_id_types(block_ids)
                if dim is None:
                    dim = int(block.shape[-1])
                    writer.begin("embeddings", torch.float32, (dim,))
                block = cls._check_embeddings(block, len(block_ids), dim, block_ids)
                writer.write(block.cpu())
                id_blocks.append(IdTable.from_list(block_ids))  # packed as it comes
            table = IdTable.concat(id_blocks)
            del id_blocks
            if dim is None or not len(table):
                raise ValueError("No documents to index: the blocks were empty.")
            duplicates = table.duplicates(5)
            if duplicates:
                raise ValueError(f"duplicate document ids {duplicates!r}: ids must be unique in the index.")
            table.release_lookup()  # built again by the first look-up by id; a search needs none
            writer.begin("keys", torch.int64)
            for start in range(0, len(table), BLOCK_ROWS):
                writer.write(torch.arange(start, min(start + BLOCK_ROWS, len(table))))
            writer.close({"format": "pt"})
        mapped = map_safetensors(folder / EMBEDDINGS_NAME)
        full = {**cls._default_settings(), **(settings or {})}
        index = cls.__new__(cls)
        index._setup(table, VectorStore(mapped["embeddings"], mapped=True), mapped["keys"], len(table), dim,
                     torch.device("cpu"), documents, full)  # fmt: skip
        index.embedder_fingerprint = embedder_fingerprint
        if index.backend == "faiss":
            index.rebuild_faiss()
        return index

    @staticmethod
    def _default_settings() -> dict[str, Any]:
        parameters = inspect.signature(DocumentIndex.__init__).parameters
        return {key: parameters[key].default for key in SETTINGS}

    _hub_name = "This DocumentIndex"

    def _model_card(self) -> str:
        search = (
            "exact inner-product search (torch)" if self.backend == "exact" else f"faiss {self.faiss_index.upper()}"
        )
        return model_card(
            title="Document index (REALM-style retrieval)",
            library_name=LIBRARY_NAME,
            base_model=None,
            tags=["retrieval", "document-index", LIBRARY_NAME],
            body=(
                f"{len(self):,} documents embedded in {self.dim} dimensions, searched by {search}. Files: "
                f"`{IDS_NAME}` (document ids), `{EMBEDDINGS_NAME}`"
                + (f", `{FAISS_NAME}` (faiss's own format)" if self.backend == "faiss" else "")
                + (", `documents/` (a datasets.Dataset)" if self.documents is not None else "")
                + "; nothing is pickled."
            ),
            usage=(
                "from hf_kadapter import DocumentIndex\n\n"
                'index = DocumentIndex.from_pretrained("<this repo>", mmap=True)\n'
                "scores, rows = index.search(query_embeddings, k=10)\n"
                "doc_ids = index.ids_at(rows)"
            ),
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device | None = None,
        mmap: bool = False,
        **overrides: Any,
    ) -> DocumentIndex:
        """Load a folder written by `save_pretrained`, or a Hub repo id (downloaded into the HF cache first).

        `mmap=True` maps the embeddings file instead of reading it (read-only; for corpora past RAM). `overrides`
        change search settings (e.g. nprobe); Hub options (revision, token, cache_dir, local_files_only,
        force_download) are passed to the download. Any interrupted save in a local folder is finished first;
        damaged or inconsistent files are named."""
        download, overrides = split_download_kwargs(overrides)
        folder = resolve_folder(directory, what="DocumentIndex", **download)
        with reading_folder(folder):
            return cls._load(folder, device, overrides, mmap)

    @classmethod
    def _load(
        cls, folder: Path, device: str | torch.device | None, overrides: dict[str, Any], mmap: bool = False
    ) -> DocumentIndex:
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a saved DocumentIndex (no {CONFIG_NAME}).")
        config = read_json(folder / CONFIG_NAME)
        if not isinstance(config, dict):
            raise DamagedFileError(folder / CONFIG_NAME, "it does not hold a JSON object")
        if config.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{folder} was written by a newer hf_kadapter (format {config['format_version']}).")
        for name in (IDS_NAME, EMBEDDINGS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}: it is not a complete DocumentIndex; save it again.")
        settings = {**cls._default_settings(), **{key: config[key] for key in SETTINGS if key in config}}
        documents = overrides.pop("documents", None)
        settings.update(overrides)
        faiss_file = (
            folder / FAISS_NAME
            if settings["backend"] == "faiss"
            and (folder / FAISS_NAME).is_file()
            and config.get("faiss_index", "ivf") == settings["faiss_index"]
            else None
        )
        # A flat faiss index holds the vectors itself: then the file is only mapped, to check it, never read in.
        mapped = mmap or (faiss_file is not None and settings["faiss_index"] in FLAT_FAISS)
        table = IdTable.read_json(folder / IDS_NAME)
        path = folder / EMBEDDINGS_NAME
        tensors = map_safetensors(path)
        if not mapped:
            tensors = {name: _read_into_memory(path, tensor) for name, tensor in tensors.items()}
        if set(tensors) != {"embeddings", "keys"}:
            raise DamagedFileError(path, f"it holds {sorted(tensors)}, not embeddings and keys")
        embeddings, keys = tensors["embeddings"], tensors["keys"].to(torch.int64)  # (mapped keys are never written)
        if embeddings.dim() != 2 or keys.shape != (len(table),) or embeddings.shape[0] != len(table):
            raise ValueError(
                f"{folder}: {IDS_NAME} lists {len(table)} documents but {EMBEDDINGS_NAME} holds embeddings "
                f"{tuple(embeddings.shape)} and keys {tuple(keys.shape)}: the files come from different saves. Save "
                "or build the index again."
            )
        if not mmap:  # (a memory map is checked row by row as it is read: opening it reads nothing)
            for start in range(0, len(table), BLOCK_ROWS):
                check_finite_rows(
                    embeddings[start : start + BLOCK_ROWS],
                    "The embeddings of documents",
                    table.take(range(start, min(start + BLOCK_ROWS, len(table)))),
                )
        if documents is None and (folder / DOCUMENTS_DIR).is_dir():
            from datasets import load_from_disk

            documents = load_from_disk(str(folder / DOCUMENTS_DIR))
        index = cls.__new__(cls)
        dim = int(config.get("dim") or embeddings.shape[1])
        store = VectorStore(embeddings.to(torch.float32), mapped=mapped)
        index._setup(table, store, keys, int(config.get("next_key", len(table))), dim, "cpu", documents, settings)
        index.embedder_fingerprint = config.get("embedder_fingerprint")
        if faiss_file is not None:
            faiss = _import_faiss()
            try:
                loaded = faiss.read_index(str(faiss_file))
            except RuntimeError as error:
                raise DamagedFileError(faiss_file, f"faiss cannot read it ({str(error).splitlines()[0]})") from None
            if loaded.ntotal != len(index):
                raise ValueError(
                    f"{faiss_file} holds {loaded.ntotal} vectors but the index has {len(index)} documents."
                )
            index._faiss = loaded
            if index.faiss_index in FLAT_FAISS and not mmap:
                if index.faiss_index == "ivf" and faiss.extract_index_ivf(loaded).direct_map.type == 0:
                    loaded.set_direct_map_type(faiss.DirectMap.Hashtable)  # get() by key, from faiss
                index._store = None
        if device is not None:
            index.to(device)
        return index


__all__ = ["DocumentIndex", "check_finite_rows", "exact_topk"]

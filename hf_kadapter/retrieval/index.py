"""A document index for maximum inner product search (MIPS) over retriever embeddings.

`DocumentIndex` keeps string document ids, their float32 embeddings `[N, D]` (on CPU or an accelerator) and,
optionally, a `datasets.Dataset` with the documents' titles and texts. Two backends:

* `"exact"` (default): exact MIPS in torch. Documents are scored in chunks of `chunk_size` rows and queries in
  batches of `query_batch_size`, with a running top-k merge, so memory stays bounded and the result equals
  `torch.topk(queries @ embeddings.T, k)` (scores exactly; under ties the row chosen among equal scores may
  differ). `add` appends rows; `remove` masks and compacts the embedding matrix (no re-embedding).
* `"faiss"`: approximate search with faiss-cpu (`pip install faiss-cpu`, or the `faiss` extra), inner product
  metric, `faiss_index="ivf"` (IndexIVFFlat: `nlist` cells, `nprobe` visited per query) or `"hnsw"`
  (IndexHNSWFlat: `M` links per node, `ef_search`). Vectors are stored under an internal int64 key per
  document (IVF natively, HNSW through an IndexIDMap2), so `add` never rebuilds (add_with_ids) and, for IVF,
  `remove` uses `remove_ids` in place. (An IndexIDMap2 around IVF would not do: IVF does not renumber after a
  removal.) HNSW cannot delete vectors: `remove` on an HNSW index rebuilds it from the kept embeddings
  (the embeddings are always kept in torch as well, for `get`, rebuilds and saving). An IVF index is trained
  once, on the embeddings present when it is first built (lazily, at the first search or save); later adds are
  assigned to the trained cells — call `rebuild_faiss()` after the corpus changes a lot.

Row indices returned by `search` refer to the current order of `ids`; they shift after `remove`, so convert
them with `ids_at(rows)` before changing the index.

Saved folders (`save_pretrained`) hold `index_config.json` (backend and parameters), `ids.json`,
`embeddings.safetensors` (embeddings + faiss keys), for faiss `faiss.index` in faiss's own format
(`faiss.serialize_index`; `faiss.read_index` reads it) and optionally `documents/`; no pickle. They are written as
one folder commit (hf_kadapter.utils.io), so a reader never sees new embeddings beside old ids or an old faiss file.

Embeddings and queries must be finite: a NaN document would be the top hit of every query and a NaN query scores
NaN everywhere (faiss refuses them with a raw C++ error), so both are refused where they enter, by id or row.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..utils.hub import LIBRARY_NAME, HubMixin, card_is_ours, model_card, resolve_folder, split_download_kwargs
from ..utils.io import DamagedFileError, FolderCommit, load_safetensors, read_json, reading_folder

BACKENDS = ("exact", "faiss")
FAISS_INDEXES = ("ivf", "hnsw")
CONFIG_NAME = "index_config.json"
IDS_NAME = "ids.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
FAISS_NAME = "faiss.index"
DOCUMENTS_DIR = "documents"
FORMAT_VERSION = 1
# Files of ours that a new save may not write again (then they are deleted: stale faiss file, stale documents).
_OWN_OPTIONAL = (FAISS_NAME, f"{DOCUMENTS_DIR}/**")
# The search settings: constructor keywords, saved in the config, kept by an index rebuilt over new embeddings.
SEARCH_SETTINGS = (
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
)


def check_finite_rows(vectors: torch.Tensor, what: str, names: Sequence[Any] | None = None) -> None:
    """Raise a ValueError naming the rows of `vectors` [N, D] that hold NaN or inf (by name when given)."""
    finite = torch.isfinite(vectors).all(dim=-1) if vectors.numel() else torch.ones(len(vectors), dtype=torch.bool)
    if bool(finite.all()):
        return
    rows = torch.nonzero(~finite.cpu()).flatten().tolist()
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
    if chunk_size < 1 or query_batch_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and query_batch_size={query_batch_size} must be positive.")
    all_scores, all_rows = [], []
    for q_start in range(0, queries.shape[0], query_batch_size):
        batch = queries[q_start : q_start + query_batch_size]
        if num_docs <= chunk_size:
            # One chunk: exactly the brute force computation (no extra copies).
            scores, rows = torch.topk(batch @ embeddings.T, k, dim=1)
        else:
            best_scores = best_rows = None
            for d_start in range(0, num_docs, chunk_size):
                chunk = embeddings[d_start : d_start + chunk_size]
                chunk_scores, chunk_rows = torch.topk(batch @ chunk.T, min(k, chunk.shape[0]), dim=1)
                chunk_rows += d_start
                if best_scores is None:
                    best_scores, best_rows = chunk_scores, chunk_rows
                else:
                    merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
                    merged_rows = torch.cat([best_rows, chunk_rows], dim=1)
                    top = min(k, merged_scores.shape[1])
                    best_scores, position = torch.topk(merged_scores, top, dim=1)
                    best_rows = torch.gather(merged_rows, 1, position)
            scores, rows = best_scores, best_rows
        all_scores.append(scores)
        all_rows.append(rows)
    return torch.cat(all_scores), torch.cat(all_rows)


class DocumentIndex(HubMixin):
    """Document ids + embeddings with exact (torch) or approximate (faiss) inner-product search.

    Args:
        ids: document ids (strings, unique).
        embeddings: float tensor `[N, D]` (converted to float32; kept on its device).
        backend: "exact" or "faiss".
        faiss_index: "ivf" or "hnsw" (faiss backend only).
        nlist: IVF cells; default `4 * sqrt(N)` capped so every cell gets >= 39 training points.
        nprobe: IVF cells visited per query.
        M: HNSW links per node.
        ef_search / ef_construction: HNSW search / build breadth.
        train_size: IVF k-means training points, a random sample of the documents; default `64 * nlist`.
        chunk_size: documents scored at once by the exact backend.
        query_batch_size: queries scored at once by the exact backend.
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
        documents: Any = None,
        dim: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}.")
        if faiss_index not in FAISS_INDEXES:
            raise ValueError(f"faiss_index={faiss_index!r} is not supported; use one of {FAISS_INDEXES}.")
        if chunk_size < 1 or query_batch_size < 1:
            raise ValueError(f"chunk_size={chunk_size} and query_batch_size={query_batch_size} must be positive.")
        if backend == "faiss":
            _import_faiss()
        self.backend = backend
        self.faiss_index = faiss_index
        self.nlist = nlist
        self.nprobe = nprobe
        self.M = M
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.train_size = train_size
        self.chunk_size = chunk_size
        self.query_batch_size = query_batch_size
        self._doc_rows: dict[str, int] | None = None
        self.documents = documents
        self._faiss = None
        self._key_to_row: dict[int, int] | None = None
        # The fingerprint of the embedder that made the embeddings (set by RealmStyleRetriever.build_index), saved.
        self.embedder_fingerprint: str | None = None

        ids = [] if ids is None else list(ids)
        if embeddings is None:
            if ids:
                raise ValueError(f"{len(ids)} ids were given without embeddings.")
            if dim is None:
                raise ValueError("An empty DocumentIndex needs `dim` (the embedding width).")
            embeddings = torch.empty(0, dim)
        self._check_new_ids(ids, {})
        embeddings = self._check_embeddings(embeddings, len(ids), dim, ids)
        self.ids: list[str] = ids
        self.embeddings: torch.Tensor = embeddings
        self._row_of: dict[str, int] = {doc_id: row for row, doc_id in enumerate(ids)}
        self._keys = torch.arange(len(ids), dtype=torch.int64)
        self._next_key = len(ids)

    # ----- basic properties -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row_of

    def __repr__(self) -> str:
        extra = f", faiss_index={self.faiss_index!r}" if self.backend == "faiss" else ""
        return (
            f"DocumentIndex(num_docs={len(self)}, dim={self.dim}, backend={self.backend!r}{extra}, "
            f"device={self.device})"
        )

    @property
    def documents(self) -> Any:
        """The attached documents dataset (or None); setting it resets the id -> dataset row cache."""
        return self._documents

    @documents.setter
    def documents(self, value: Any) -> None:
        self._documents = value
        self._doc_rows = None

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device: str | torch.device) -> DocumentIndex:
        """Move the embeddings (the exact backend searches where they are); returns self."""
        self.embeddings = self.embeddings.to(device)
        return self

    # ----- checks ------------------------------------------------------------------------------------------------
    def _check_embeddings(
        self, embeddings: torch.Tensor, count: int, dim: int | None, ids: Sequence[str] | None = None
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

    @staticmethod
    def _check_new_ids(ids: list[str], existing: dict[str, int]) -> None:
        bad = [doc_id for doc_id in ids if not isinstance(doc_id, str)]
        if bad:
            raise TypeError(f"document ids must be strings, got {bad[:5]!r}.")
        seen: set[str] = set()
        duplicates = []
        for doc_id in ids:
            if doc_id in seen or doc_id in existing:
                duplicates.append(doc_id)
            seen.add(doc_id)
        if duplicates:
            raise ValueError(f"duplicate document ids {duplicates[:5]!r}: ids must be unique in the index.")

    # ----- look-ups ----------------------------------------------------------------------------------------------
    def rows(self, ids: Iterable[str]) -> torch.Tensor:
        """Current row of each id (int64)."""
        ids = list(ids)
        missing = [doc_id for doc_id in ids if doc_id not in self._row_of]
        if missing:
            raise KeyError(f"document ids not in the index: {missing[:5]!r} ({len(missing)} missing).")
        return torch.tensor([self._row_of[doc_id] for doc_id in ids], dtype=torch.int64)

    def get(self, ids: Iterable[str]) -> torch.Tensor:
        """Embeddings `[len(ids), D]` of the given document ids."""
        return self.embeddings[self.rows(ids).to(self.device)]

    def ids_at(self, rows: torch.Tensor | Sequence) -> list:
        """Ids of row indices, keeping the shape as nested lists (rows of -1, i.e. no result, give None)."""
        rows = torch.as_tensor(rows).tolist()

        def convert(value):
            if isinstance(value, list):
                return [convert(v) for v in value]
            return self.ids[value] if value >= 0 else None

        return convert(rows)

    def get_documents(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """Rows of `documents` for the ids: matched through its "id" column if it has one, else by position
        (then `documents` must be aligned with the index order, which `remove` breaks)."""
        if self.documents is None:
            raise ValueError("This DocumentIndex has no `documents` dataset attached.")
        ids = list(ids)
        if "id" in getattr(self.documents, "column_names", []):
            if self._doc_rows is None:
                self._doc_rows = {str(doc_id): row for row, doc_id in enumerate(self.documents["id"])}
            missing = [doc_id for doc_id in ids if doc_id not in self._doc_rows]
            if missing:
                raise KeyError(f"document ids not in the documents dataset: {missing[:5]!r}.")
            positions = [self._doc_rows[doc_id] for doc_id in ids]
        else:
            positions = self.rows(ids).tolist()
        selected = self.documents.select(positions)
        return [selected[i] for i in range(len(positions))]

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
            scores, rows = exact_topk(
                queries.to(self.device, torch.float32), self.embeddings, k, self.chunk_size, self.query_batch_size
            )
            return scores.to(out_device), rows.to(out_device)
        index = self._get_faiss()
        self._set_search_params(index)
        scores, keys = index.search(queries.to("cpu", torch.float32).contiguous().numpy(), k)
        keys = torch.from_numpy(keys)
        scores = torch.from_numpy(scores)
        rows = self._rows_of_keys(keys)
        scores = scores.masked_fill(rows < 0, float("-inf"))
        return scores.to(out_device), rows.to(out_device)

    # ----- changes -------------------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], embeddings: torch.Tensor) -> None:
        """Append documents (exact: concatenation; faiss: add_with_ids into the existing index, no rebuild)."""
        ids = list(ids)
        self._check_new_ids(ids, self._row_of)
        embeddings = self._check_embeddings(embeddings, len(ids), self.dim, ids).to(self.device)
        if not ids:
            return
        start = len(self.ids)
        keys = torch.arange(self._next_key, self._next_key + len(ids), dtype=torch.int64)
        self._next_key += len(ids)
        self.embeddings = torch.cat([self.embeddings, embeddings])
        self.ids.extend(ids)
        self._row_of.update({doc_id: start + i for i, doc_id in enumerate(ids)})
        self._keys = torch.cat([self._keys, keys])
        if self._faiss is not None:
            self._faiss.add_with_ids(embeddings.cpu().numpy(), keys.numpy())

    def remove(self, ids: Iterable[str]) -> None:
        """Delete documents: the embedding matrix is masked and compacted (rows after them shift down).

        faiss IVF removes the keys in place (`remove_ids`); HNSW does not support deletion, so its faiss index is
        rebuilt from the remaining embeddings.
        """
        ids = list(dict.fromkeys(ids))
        rows = self.rows(ids)
        if not len(rows):
            return
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[rows] = False
        removed_keys = self._keys[~keep]
        self.embeddings = self.embeddings[keep.to(self.device)].contiguous()
        self._keys = self._keys[keep]
        keep_list = keep.tolist()
        self.ids = [doc_id for doc_id, kept in zip(self.ids, keep_list, strict=True) if kept]
        self._row_of = {doc_id: row for row, doc_id in enumerate(self.ids)}
        if self._faiss is not None:
            if self.faiss_index == "ivf":
                self._faiss.remove_ids(removed_keys.numpy())
            else:
                self._faiss = None  # HNSW: rebuilt lazily at the next search
        self._key_to_row = None

    # ----- faiss ---------------------------------------------------------------------------------------------
    def default_nlist(self, num_docs: int | None = None) -> int:
        num_docs = len(self) if num_docs is None else num_docs
        return max(1, min(int(4 * math.sqrt(num_docs)), num_docs // 39))

    def rebuild_faiss(self) -> None:
        """(Re)build the faiss index from the current embeddings (IVF: retrained)."""
        if self.backend != "faiss":
            raise ValueError("rebuild_faiss() is only for backend='faiss'.")
        faiss = _import_faiss()
        if len(self) == 0:
            raise ValueError("Cannot build a faiss index over an empty DocumentIndex.")
        vectors = self.embeddings.cpu().numpy()
        if self.faiss_index == "ivf":
            nlist = self.nlist or self.default_nlist()
            if nlist > len(self):
                raise ValueError(f"nlist={nlist} is larger than the number of documents ({len(self)}).")
            quantizer = faiss.IndexFlatIP(self.dim)
            inner = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            train_size = min(len(self), self.train_size or 64 * nlist)
            sample = vectors
            if train_size < len(self):
                generator = torch.Generator().manual_seed(0)
                sample = vectors[torch.randperm(len(self), generator=generator)[:train_size].numpy()]
            inner.train(sample)
            index = inner  # IVF stores our int64 keys itself and supports remove_ids in place
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, self._keys.numpy())
        self._faiss = index
        self._key_to_row = None

    def _get_faiss(self):
        if self._faiss is None:
            self.rebuild_faiss()
        return self._faiss

    def _set_search_params(self, index) -> None:
        faiss = _import_faiss()
        if self.faiss_index == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.nprobe
        else:
            faiss.downcast_index(index.index).hnsw.efSearch = max(self.ef_search, 1)

    def _rows_of_keys(self, keys: torch.Tensor) -> torch.Tensor:
        if self._key_to_row is None or len(self._key_to_row) != len(self):
            self._key_to_row = {key: row for row, key in enumerate(self._keys.tolist())}
        lookup = self._key_to_row
        flat = [lookup.get(key, -1) for key in keys.reshape(-1).tolist()]
        return torch.tensor(flat, dtype=torch.int64).reshape(keys.shape)

    # ----- persistence ---------------------------------------------------------------------------------------
    def search_settings(self) -> dict[str, Any]:
        """The constructor keywords that say how this index searches (backend, faiss type, nprobe ...): pass them
        to a new DocumentIndex (or build_index) to search new embeddings the same way."""
        return {key: getattr(self, key) for key in SEARCH_SETTINGS}

    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            **self.search_settings(),
            "num_docs": len(self),
            "dim": self.dim,
            "next_key": self._next_key,
            "embedder_fingerprint": self.embedder_fingerprint,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, save_documents: bool = True) -> None:
        """Write the index folder (safetensors + JSON, faiss.serialize_index for faiss) as one folder commit.

        The documents dataset, if any and `save_documents`, goes to `documents/` with `save_to_disk`; a
        `documents/` left by an earlier save is removed otherwise (it would describe another corpus). Saving into
        the folder the index was loaded from works.
        """
        with FolderCommit(save_directory, stale=_OWN_OPTIONAL) as staging:
            self.write_files(staging, save_documents=save_documents, final_directory=save_directory)

    def write_files(
        self, folder: str | os.PathLike, save_documents: bool = True, final_directory: str | os.PathLike | None = None
    ) -> None:
        """Write the index's files into `folder` directly (a commit's staging folder); the card is written unless
        `final_directory` holds a README.md by someone else."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings.detach().cpu().contiguous(), "keys": self._keys.contiguous()}
        save_file(tensors, str(folder / EMBEDDINGS_NAME), metadata={"format": "pt"})
        (folder / IDS_NAME).write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
        if self.backend == "faiss" and len(self):
            faiss = _import_faiss()
            (folder / FAISS_NAME).write_bytes(faiss.serialize_index(self._get_faiss()).tobytes())
        if self.documents is not None and save_documents:
            self.documents.save_to_disk(str(folder / DOCUMENTS_DIR))
        if card_is_ours(Path(final_directory or folder) / "README.md"):
            (folder / "README.md").write_text(self._model_card(), encoding="utf-8")
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2), encoding="utf-8")

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
                'index = DocumentIndex.from_pretrained("<this repo>")\n'
                "scores, rows = index.search(query_embeddings, k=10)\n"
                "doc_ids = index.ids_at(rows)"
            ),
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device | None = None, **overrides: Any
    ) -> DocumentIndex:
        """Load a folder written by `save_pretrained`, or a Hub repo id (downloaded into the HF cache first).

        `overrides` change search settings (e.g. nprobe); Hub options (revision, token, cache_dir,
        local_files_only, force_download) are passed to the download. Any interrupted save in a local folder is
        finished first; damaged or inconsistent files are named."""
        download, overrides = split_download_kwargs(overrides)
        folder = resolve_folder(directory, what="DocumentIndex", **download)
        with reading_folder(folder):
            return cls._load(folder, device, overrides)

    @classmethod
    def _load(cls, folder: Path, device: str | torch.device | None, overrides: dict[str, Any]) -> DocumentIndex:
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
        ids = read_json(folder / IDS_NAME)
        if not isinstance(ids, list):
            raise DamagedFileError(folder / IDS_NAME, "it does not hold a JSON list of document ids")
        tensors = load_safetensors(folder / EMBEDDINGS_NAME)
        if set(tensors) != {"embeddings", "keys"}:
            raise DamagedFileError(folder / EMBEDDINGS_NAME, f"it holds {sorted(tensors)}, not embeddings and keys")
        embeddings, keys = tensors["embeddings"], tensors["keys"].to(torch.int64)
        if embeddings.dim() != 2 or keys.shape != (len(ids),) or embeddings.shape[0] != len(ids):
            raise ValueError(
                f"{folder}: {IDS_NAME} lists {len(ids)} documents but {EMBEDDINGS_NAME} holds embeddings "
                f"{tuple(embeddings.shape)} and keys {tuple(keys.shape)}: the files come from different saves. Save "
                "or build the index again."
            )
        settings = {key: config[key] for key in SEARCH_SETTINGS if key in config}
        settings.update(overrides)
        documents = settings.pop("documents", None)
        if documents is None and (folder / DOCUMENTS_DIR).is_dir():
            from datasets import load_from_disk

            documents = load_from_disk(str(folder / DOCUMENTS_DIR))
        index = cls(ids, embeddings, dim=config.get("dim"), documents=documents, **settings)
        index._keys = keys
        index._next_key = int(config.get("next_key", len(ids)))
        index.embedder_fingerprint = config.get("embedder_fingerprint")
        if device is not None:
            index.to(device)
        if (
            index.backend == "faiss"
            and (folder / FAISS_NAME).is_file()
            and config.get("faiss_index", "ivf") == index.faiss_index
        ):
            faiss = _import_faiss()
            try:
                loaded = faiss.read_index(str(folder / FAISS_NAME))
            except RuntimeError as error:
                raise DamagedFileError(folder / FAISS_NAME, f"faiss cannot read it ({str(error).splitlines()[0]})") from None
            if loaded.ntotal != len(index):
                raise ValueError(
                    f"{folder / FAISS_NAME} holds {loaded.ntotal} vectors but the index has {len(index)} documents."
                )
            index._faiss = loaded
        return index


__all__ = ["DocumentIndex", "check_finite_rows", "exact_topk"]

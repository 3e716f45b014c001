"""`RealmStyleRetriever`: an embedder + a (possibly stale) `DocumentIndex` + the documents dataset.

`retrieve` takes candidates from the index (searched with detached query embeddings), then re-embeds them with
the CURRENT embedder (`rescore=True`) so the scores f(x, z) = q(x) . d(z) carry gradients to both encoders even
when the index was built by an older snapshot (REALM's asynchronous index refresh). `exclude_ids` removes trivial
retrievals (e.g. the masked sentence's own document); `add_null=True` appends the null document (empty title and
text) as an extra candidate, so the reader can rely on no document.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn
from tqdm.auto import tqdm

from ..utils.fingerprint import native_fingerprint
from ..utils.hub import (
    LIBRARY_NAME,
    HubMixin,
    card_is_ours,
    is_hub_id,
    model_card,
    resolve_folder,
    split_download_kwargs,
)
from ..utils.io import (
    FolderCommit,
    build_lock,
    read_json,
    reading_folder,
    safetensors_problem,
    save_tensors_atomic,
    write_json_atomic,
)
from .index import SETTINGS as INDEX_SETTINGS
from .index import DocumentIndex, check_finite_rows
from .storage import DocumentRows, IdTable, SafetensorsStreamWriter, map_safetensors

__all__ = ["NULL_DOC_ID", "RealmStyleRetriever", "RetrievalOutput"]

logger = logging.getLogger(__name__)

NULL_DOC_ID = "<null>"
STATE_NAME = "build_state.json"
RETRIEVER_CONFIG_NAME = "retriever_config.json"
INDEX_DIR = "index"
BUILD_FORMAT = 2  # 2: the corpus content and the embedder (every weight) are fingerprinted
_READ_BLOCK = 4096


@dataclass
class RetrievalOutput:
    """Per query, `k` candidates (k + 1 with the null document, which is last).

    scores: [B, k] f(x, z) (with gradients when rescored; -inf where `mask` is False).
    mask: [B, k] bool, False for padding (fewer than k documents left after exclusion).
    doc_ids / texts / titles: B lists of k (None for padding, NULL_DOC_ID / "" for the null document).
    doc_input_ids / doc_attention_mask: [B, k, L] tokenised "title [SEP] text" of each candidate.
    query_embeddings: [B, D]; doc_embeddings: [B, k, D]; index_scores: [B, k] scores from the (stale) index.
    """

    scores: torch.Tensor
    mask: torch.Tensor
    doc_ids: list[list[str | None]]
    texts: list[list[str | None]]
    titles: list[list[str | None]]
    doc_input_ids: torch.Tensor
    doc_attention_mask: torch.Tensor
    query_embeddings: torch.Tensor
    doc_embeddings: torch.Tensor
    index_scores: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype!r}: embedding in half precision takes torch.bfloat16 or torch.float16.")
    return resolved


def _autocast(device: torch.device, dtype: torch.dtype | str | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on the embedder's device (a no-op context for None: float32 as the weights are)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_dtype(dtype))


def _differing(previous: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """The build settings a recorded state does not share with this build (compute_dtype is absent for float32)."""
    return sorted(key for key in {*state, "compute_dtype"} if previous.get(key) != state.get(key))


def _column(rows: Any, name: str, default: str = "") -> list[str]:
    """A text column of a batch of rows (dict of lists or list of dicts); missing or None values give `default`."""
    if isinstance(rows, Mapping):
        values = rows.get(name)
        return [default] * len(next(iter(rows.values()))) if values is None else [_text(v, default) for v in values]
    return [_text(row.get(name), default) for row in rows]


def _text(value: Any, default: str) -> str:
    return default if value is None else str(value)


def _chunk_name(start: int, size: int) -> str:
    return f"chunk-{start:010d}-{size}.safetensors"


def _batched(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _ids(dataset: Any) -> list[str]:
    return [str(v) for v in (dataset["id"] if hasattr(dataset, "column_names") else [d["id"] for d in dataset])]


def _ids_range(dataset: Any, start: int, stop: int) -> list[str]:
    """The ids of rows start..stop-1 (a slice: no Python list of the whole column)."""
    if hasattr(dataset, "column_names"):
        return [str(v) for v in dataset[start:stop]["id"]]
    return [str(dataset[i]["id"]) for i in range(start, stop)]


def _is_streaming(dataset: Any) -> bool:
    """A corpus read as a stream (a datasets.IterableDataset, or any iterable without a length)."""
    return not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


def _check_row(row: Any, where: str) -> tuple[str, str | None, str]:
    """(id, title, text) of a corpus row, or a ValueError naming the row and the fix."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} is a {type(row).__name__}, not a dict with keys id, title, text.")
    doc_id, text, title = row.get("id"), row.get("text"), row.get("title")
    if doc_id is None or isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f"{where} has id {doc_id!r}: every document needs a string (or integer) id.")
    if not isinstance(text, str):
        fix = "give it a text or drop the row" if text is None else "store texts as strings"
        raise ValueError(f"{where} (id {doc_id!r}) has text {text!r}: {fix}; it would be embedded as such.")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"{where} (id {doc_id!r}) has title {title!r}: titles must be strings or None.")
    return str(doc_id), title, text


def _rows_of_batch(batch: Any) -> list[Any]:
    """A batch as a list of rows (a dict of lists, as datasets gives, or a list of dicts)."""
    if isinstance(batch, Mapping):
        names = list(batch)
        return [dict(zip(names, values, strict=True)) for values in zip(*(batch[n] for n in names), strict=True)]
    return list(batch)


def check_corpus(dataset: Any) -> str:
    """Check a corpus before any work and return a digest of its content (ids, titles, texts, in order).

    A corpus is a datasets.Dataset or a list of dicts with a string (or integer) "id", a string "text" and an
    optional "title" (missing or None: no title). An empty corpus, a missing column, a None or non-string text,
    a missing or duplicate id are refused with the row and the fix; the digest lets a resumed build tell an edited
    corpus (a list included) from the one its chunks were made of. Ids are kept packed (storage.IdTable), so
    checking millions of documents holds no set of Python strings.
    """
    total = len(dataset)
    if total == 0:
        raise ValueError("The corpus is empty: there is nothing to index. Pass documents with columns id, title, text.")
    table = hasattr(dataset, "column_names")
    if table:
        columns = list(dataset.column_names)
        missing = [c for c in ("id", "text") if c not in columns]
        if missing:
            raise ValueError(
                f"The corpus has no {missing} column (columns: {columns}): documents need an 'id' and a 'text' (and "
                "optionally a 'title'). Rename yours, e.g. dataset.rename_column('passage', 'text')."
            )
    digest, seen = xxhash.xxh3_128(), IdTable()
    for start in range(0, total, _READ_BLOCK):
        stop = min(start + _READ_BLOCK, total)
        if table:
            present = [c for c in ("id", "title", "text") if c in columns]
            rows = _rows_of_batch(dataset.select_columns(present)[start:stop])
        else:
            rows = [dataset[i] for i in range(start, stop)]
        block_ids = []
        for offset, row in enumerate(rows):
            doc_id, title, text = _check_row(row, f"Corpus row {start + offset}")
            block_ids.append(doc_id)
            for value in (doc_id, title or "", text):
                encoded = value.encode("utf-8", errors="surrogatepass")
                digest.update(len(encoded).to_bytes(8, "little") + encoded)
        seen.extend(block_ids)
    repeated = seen.duplicates(1)
    if repeated:
        second = [row for row, doc_id in enumerate(seen) if doc_id == repeated[0]][1]
        raise ValueError(f"Corpus row {second} repeats id {repeated[0]!r}: document ids must be unique.")
    return "xxh3:" + digest.hexdigest()


def _all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """torch.distributed.all_reduce on the device the backend needs (NCCL: the current GPU), back on the CPU."""
    dist = torch.distributed
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    work = tensor.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op is None else op)
    return work.cpu()


class RealmStyleRetriever(HubMixin):
    """Args:
    embedder: a module with `embed_queries(input_ids, attention_mask, token_type_ids=None) -> [B, D]` and
        `embed_documents(...) -> [B, D]` (e.g. `RetrieverEmbedder`).
    tokenizer: the embedder's tokenizer (documents are tokenised as pairs: title, text).
    index: a `DocumentIndex` (may be stale: built by an older embedder snapshot).
    documents: a `datasets.Dataset` (or list of dicts) with columns "id", "title", "text"; defaults to
        `index.documents`.
    """

    def __init__(self, embedder: nn.Module, tokenizer: Any, index: DocumentIndex | None = None, documents: Any = None):
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.index = index
        if documents is None and index is not None:
            documents = index.documents
        self.documents = documents
        self._doc_rows = DocumentRows()  # follows `documents` when they are replaced or edited

    # ----- documents ---------------------------------------------------------------------------------------------
    def get_documents(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        if self.documents is None:
            raise ValueError("RealmStyleRetriever has no documents: pass `documents` (columns id, title, text).")
        return self._doc_rows.fetch(self.documents, ids)

    def tokenize_documents(self, titles: Sequence[str], texts: Sequence[str], max_length: int = 288) -> dict:
        """title [SEP] text, as REALM/ORQA's document blocks (a pair; an empty title gives [CLS] [SEP] text [SEP]).
        Truncation is longest_first, so a long text is cut before its title, and an over-long title cannot fail."""
        return self.tokenizer(
            list(titles),
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )

    def _device(self, module: nn.Module | None = None) -> torch.device:
        module = self.embedder if module is None else module
        try:
            return next(module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # ----- index building ----------------------------------------------------------------------------------------
    def _embed_texts(
        self, embedder: nn.Module, titles: list[str], texts: list[str], names: list[str], max_length: int
    ) -> torch.Tensor:
        """Document embeddings (float32, CPU) of one batch of "title [SEP] text" pairs; non-finite ones are refused."""
        inputs = self.tokenize_documents(titles, texts, max_length)
        device = self._device(embedder)
        embeddings = embedder.embed_documents(**{key: value.to(device) for key, value in inputs.items()})
        embeddings = embeddings.float().cpu()
        check_finite_rows(embeddings, "The embeddings of documents", names)
        return embeddings

    @torch.no_grad()
    def embed_corpus(
        self,
        dataset: Any,
        batch_size: int = 64,
        max_length: int = 288,
        progress: bool = True,
        embedder: nn.Module | None = None,
        output_dir: str | os.PathLike | None = None,
        rows: Sequence[int] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> torch.Tensor:
        """Document embeddings [len(rows), D] (float32, CPU) in batches; with `output_dir`, each batch is written
        atomically as `chunk-{start}-{size}.safetensors` and read back instead of embedded when the build resumes
        (a chunk file that is damaged or of another shape is embedded again). Non-finite embeddings are refused,
        naming the documents. `dtype` (torch.bfloat16 / torch.float16) runs the embedder under torch.autocast in
        that precision: several times faster where half-precision matmuls are, its float32 weights untouched (a
        training embedder needs no half copy); the accuracy cost is measured in docs/performance.md.
        The folder's chunks are only reused by the same build: `output_dir` gets the `build_state.json` build_index
        writes (corpus digest, embedder fingerprint, batch_size, max_length, dtype), and a folder holding another
        build's chunks is refused instead of mixed in."""
        embedder = self.embedder if embedder is None else embedder
        digest = check_corpus(dataset)
        if output_dir is None:
            return self._embed_rows(dataset, batch_size, max_length, progress, embedder, None, rows, dtype)
        folder = Path(output_dir)
        with build_lock(folder):
            fingerprint = native_fingerprint(embedder.state_dict().items())
            self._build_state(folder, 0, 1, self._state(dataset, digest, batch_size, max_length, fingerprint, 1, dtype))
            return self._embed_rows(dataset, batch_size, max_length, progress, embedder, folder, rows, dtype)

    @torch.no_grad()
    def _embed_rows(
        self,
        dataset: Any,
        batch_size: int,
        max_length: int,
        progress: bool,
        embedder: nn.Module,
        folder: Path | None,
        rows: Sequence[int] | None,
        dtype: torch.dtype | str | None,
    ) -> torch.Tensor:
        """embed_corpus's work, on a corpus already checked (build_index checks it once, then passes its batches)."""
        was_training = embedder.training
        embedder.eval()
        rows = list(range(len(dataset))) if rows is None else list(rows)
        precision = _autocast(self._device(embedder), dtype)
        pieces = []
        try:
            for start in tqdm(
                range(0, len(rows), batch_size), desc="Embedding documents", disable=not progress, leave=False
            ):
                block = rows[start : start + batch_size]
                chunk = None if folder is None else folder / _chunk_name(block[0], len(block))
                if chunk is not None and chunk.is_file():
                    stored = self._read_chunk(chunk, len(block))
                    if stored is not None:
                        pieces.append(stored)
                        continue
                selected = dataset.select(block) if hasattr(dataset, "select") else [dataset[i] for i in block]
                with precision:
                    embeddings = self._embed_texts(
                        embedder,
                        _column(selected, "title"),
                        _column(selected, "text"),
                        _column(selected, "id"),
                        max_length,
                    )
                if chunk is not None:
                    save_tensors_atomic(chunk, {"embeddings": embeddings})
                pieces.append(embeddings)
        finally:
            embedder.train(was_training)
        if not pieces:
            raise ValueError("no documents to embed")
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @torch.no_grad()
    def embed_ids(
        self,
        ids: Sequence[str],
        batch_size: int = 64,
        max_length: int = 288,
        embedder: nn.Module | None = None,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(ids, embeddings [n, D]) batch by batch for documents looked up by id in `documents` (how a refresh
        re-embeds the index's current corpus, adds and removes included)."""
        embedder = self.embedder if embedder is None else embedder
        was_training = embedder.training
        embedder.eval()
        try:
            for start in range(0, len(ids), batch_size):
                block = [str(i) for i in ids[start : start + batch_size]]
                records = self.get_documents(block)
                titles = [_text(r.get("title"), "") for r in records]
                texts = [_text(r.get("text"), "") for r in records]
                yield block, self._embed_texts(embedder, titles, texts, block, max_length)
        finally:
            embedder.train(was_training)

    @staticmethod
    def _read_chunk(path: Path, rows: int) -> torch.Tensor | None:
        """A finished chunk's embeddings, or None (with a warning) when the file cannot be trusted."""
        problem = safetensors_problem(path)
        if problem is None:
            from safetensors.torch import load_file

            embeddings = load_file(str(path)).get("embeddings")
            if embeddings is not None and embeddings.dim() == 2 and embeddings.shape[0] == rows:
                return embeddings
            problem = f"it holds {None if embeddings is None else tuple(embeddings.shape)}, not {rows} embeddings"
        logger.warning("%s is damaged (%s); its documents are embedded again.", path, problem)
        return None

    def build_index(
        self,
        dataset: Any,
        batch_size: int = 64,
        max_length: int = 288,
        output_dir: str | os.PathLike | None = None,
        progress: bool = True,
        embedder: nn.Module | None = None,
        set_index: bool = True,
        distributed: bool = True,
        dtype: torch.dtype | str | None = None,
        **index_kwargs: Any,
    ) -> DocumentIndex:
        """Embed every document of `dataset` (columns id, title, text) and build a `DocumentIndex`.

        A map-style corpus (datasets.Dataset or list of dicts) is checked before any work (see check_corpus: an
        empty corpus, a missing id or text column, None texts, duplicate ids are refused with the row and the fix).
        `output_dir`: embeddings are written there batch by batch (atomically) with a `build_state.json`; a crashed
        or interrupted build (kill -9 included) resumes from the finished batches. The state records the number of
        documents, batch_size, max_length, world size, the embedder's fingerprint (every weight) and a digest of the
        corpus content (lists included): a build with other settings, another embedder snapshot or an edited corpus
        raises instead of mixing stale chunks in. The finished index is written to `output_dir/index` together with
        the completed state, as one commit, streaming the chunks into one file, and returned memory-mapped from
        there (the embeddings are never all in RAM). One builder per folder: a second build of the same
        `output_dir` waits for the first.

        A streamed corpus (a `datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)` or
        `Dataset.to_iterable_dataset(num_shards=...)`) is read once, rows checked as they come; with `output_dir`
        the embeddings go straight to disk and the index is memory-mapped (a stream is not resumable: a rerun embeds
        it again). Its documents cannot be looked up by id, so `documents` is left unset: attach a map-style copy
        to retrieve texts.

        Under torch.distributed every rank embeds 1/N of the corpus: batches round-robin for a map-style corpus,
        the stream's shards (or rows) split by `datasets.distributed.split_dataset_by_node` for a streamed one.
        With `output_dir` (a folder all ranks share) rank 0 assembles the index once and the others load it,
        memory-mapped; otherwise the embeddings are exchanged with collectives. `embedder` overrides self.embedder;
        `set_index=False` returns the index without installing it; `distributed=False` embeds everything in this
        process with no collective calls (required off the main thread).
        `dtype` embeds in half precision (see embed_corpus; recorded in the build state, so a resumed build never
        mixes precisions). `index_kwargs` go to DocumentIndex.
        """
        streaming = _is_streaming(dataset)
        corpus_digest = None if streaming else check_corpus(dataset)
        unknown = sorted(set(index_kwargs) - set(INDEX_SETTINGS))
        if unknown:
            raise TypeError(f"build_index got unknown index settings {unknown}; DocumentIndex takes {INDEX_SETTINGS}.")
        rank, world = _distributed() if distributed else (0, 1)
        folder = None if output_dir is None else Path(output_dir)
        embedder = self.embedder if embedder is None else embedder
        lock = contextlib.ExitStack()
        if folder is not None and rank == 0:
            lock.enter_context(build_lock(folder))
        with lock:
            build = self._build_streaming if streaming else self._build_index
            index = build(
                dataset, corpus_digest, rank, world, folder, batch_size, max_length, progress, embedder, index_kwargs,
                dtype=dtype,
            )
        if set_index:
            self.index = index
            self.documents = None if streaming else dataset  # the new corpus, a list included
        return index

    def _build_state(self, folder: Path, rank: int, world: int, state: dict[str, Any]) -> None:
        """Record a new build's settings in `folder`, or check that the build found there has the same ones."""
        folder.mkdir(parents=True, exist_ok=True)
        state_path = folder / STATE_NAME
        problem = None
        if rank == 0:
            if state_path.is_file():
                previous = read_json(state_path)
                differ = _differing(previous, state)
                if differ:
                    problem = ValueError(
                        f"{folder} holds a build with different settings (differs in {differ}): its chunks "
                        "cannot be reused. Use another output_dir, or delete this one to start afresh."
                    )
            else:
                for stale in folder.glob("chunk-*.safetensors"):  # chunks of no recorded build
                    stale.unlink()
                write_json_atomic(state_path, {**state, "complete": False})
        if world > 1:
            # The others start once rank 0 holds the folder and checked its state; rank 0 raises only after this
            # barrier, so a refused build stops every rank (each then reads the other build's state) instead of
            # leaving them waiting for a timeout.
            torch.distributed.barrier()
        if problem is not None:
            raise problem
        if world > 1 and _differing(read_json(state_path), state):
            raise ValueError(
                f"{folder} holds a build with different settings than this rank's: every rank must build the same "
                "corpus with the same embedder and settings (or use another output_dir)."
            )

    @staticmethod
    def _state(
        dataset: Any, corpus_digest: str, batch_size: int, max_length: int, fingerprint: str, world: int, dtype: Any
    ) -> dict[str, Any]:
        """What a build folder's chunks depend on (its build_state.json, without "complete")."""
        state = {
            "build_format": BUILD_FORMAT,
            "num_documents": len(dataset),
            "batch_size": batch_size,
            "max_length": max_length,
            "world_size": world,
            "embedder_fingerprint": fingerprint,
            "corpus_digest": corpus_digest,
        }
        if dtype is not None:  # (absent for float32: states written before this option still resume)
            state["compute_dtype"] = str(_dtype(dtype)).removeprefix("torch.")
        return state

    def _build_index(
        self, dataset, corpus_digest, rank, world, folder, batch_size, max_length, progress, embedder, index_kwargs,
        dtype=None,
    ) -> DocumentIndex:  # fmt: skip
        # Every weight, in its own dtype: chunks embedded by another snapshot (or dtype) are never reused.
        embedder_fingerprint = native_fingerprint(embedder.state_dict().items())
        total = len(dataset)
        batches = [(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]
        state = {}
        if folder is not None:
            state = self._state(dataset, corpus_digest, batch_size, max_length, embedder_fingerprint, world, dtype)
            self._build_state(folder, rank, world, state)
        # embed_corpus writes one chunk per call-batch: pass rank-local batches one by one so chunk names match.
        pieces = {}
        bar = tqdm(total=len(batches), desc="Building index", disable=not progress or rank != 0, leave=False)
        for i, (start, stop) in enumerate(batches):
            if i % world == rank:
                embeddings = self._embed_rows(
                    dataset, stop - start, max_length, False, embedder, folder, range(start, stop), dtype
                )
                if folder is None:  # else the chunk file holds them
                    pieces[i] = embeddings
            bar.update(1)
        bar.close()
        documents = dataset if hasattr(dataset, "column_names") else None
        if folder is not None:

            def blocks() -> Iterator[tuple[list[str], torch.Tensor]]:
                for start, stop in batches:
                    name = folder / _chunk_name(start, stop - start)
                    stored = self._read_chunk(name, stop - start)
                    if stored is None:
                        raise RuntimeError(f"{name} was not written by its rank; run the build again.")
                    yield _ids_range(dataset, start, stop), stored

            index = self._assemble(folder, rank, world, blocks, state, embedder_fingerprint, index_kwargs)
            index.documents = documents
            return index
        embeddings = self._exchange_rows(pieces, batches, total, world)
        index = DocumentIndex(_ids(dataset), embeddings, documents=documents, **index_kwargs)
        index.embedder_fingerprint = embedder_fingerprint
        return index

    @staticmethod
    def _exchange_rows(pieces: dict[int, torch.Tensor], batches: list[tuple[int, int]], total: int, world: int):
        """All rows [total, D] from each rank's batches: filled into one buffer and summed across ranks (every row
        is non-zero on one rank only, so the sum is that rank's row, bit for bit; no second copy, no pickling)."""
        dim = next(iter(pieces.values())).shape[1] if pieces else 0
        if world > 1:
            dim = int(_all_reduce(torch.tensor([dim]), torch.distributed.ReduceOp.MAX)[0])
        out = torch.zeros(total, dim)
        for i, piece in pieces.items():
            out[batches[i][0] : batches[i][1]] = piece
        return _all_reduce(out) if world > 1 else out

    def _assemble(
        self,
        folder: Path,
        rank: int,
        world: int,
        blocks: Any,
        state: dict[str, Any],
        embedder_fingerprint: str,
        index_kwargs: dict[str, Any],
        stale: Sequence[str] = (),
    ) -> DocumentIndex:
        """Rank 0 streams `blocks()` into `folder/index` with the completed state, as one commit; under
        torch.distributed the other ranks then load that index (memory-mapped): the same bytes on every rank."""
        if world > 1:
            torch.distributed.barrier()  # every rank's embeddings are on disk
        index = None
        if rank == 0:
            with FolderCommit(folder, stale=(f"{INDEX_DIR}/**", *stale)) as staging:
                # The index and the completed state go in as one commit: a kill anywhere leaves a resumable build.
                index = DocumentIndex._write_streaming(
                    staging / INDEX_DIR, blocks(), settings=index_kwargs, embedder_fingerprint=embedder_fingerprint
                )
                index._write_rest(staging / INDEX_DIR, save_documents=False, final_directory=None)
                (staging / STATE_NAME).write_text(json.dumps({**state, "complete": True}, indent=2), encoding="utf-8")
        if world > 1:
            torch.distributed.barrier()  # rank 0 committed the index
        if index is None:
            index = DocumentIndex.from_pretrained(folder / INDEX_DIR, mmap=True)
        return index

    def _build_streaming(
        self, dataset, corpus_digest, rank, world, folder, batch_size, max_length, progress, embedder, index_kwargs,
        dtype=None,
    ) -> DocumentIndex:  # fmt: skip
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            if not hasattr(dataset, "n_shards"):
                raise TypeError(
                    f"A streamed corpus under torch.distributed must be a datasets.IterableDataset (got "
                    f"{type(dataset).__name__}) so that each rank reads its part; use "
                    "datasets.Dataset.to_iterable_dataset(num_shards=...) or load_dataset(..., streaming=True)."
                )
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        embedder_fingerprint = native_fingerprint(embedder.state_dict().items())
        state = {"build_format": BUILD_FORMAT, "streaming": True, "world_size": world, "batch_size": batch_size,
                 "max_length": max_length, "embedder_fingerprint": embedder_fingerprint}  # fmt: skip
        if dtype is not None:
            state["compute_dtype"] = str(_dtype(dtype)).removeprefix("torch.")
        previous = read_json(folder / STATE_NAME) if folder is not None and (folder / STATE_NAME).is_file() else {}
        if rank == 0 and previous and not previous.get("streaming"):
            raise ValueError(
                f"{folder} holds the build of a map-style corpus: use another output_dir for a streamed one."
            )
        part = None if folder is None else folder / f"stream-part-{rank:05d}-of-{world:05d}.safetensors"
        table, pieces, count = IdTable(), [], 0
        was_training = embedder.training
        embedder.eval()
        bar = tqdm(desc="Building index (streamed)", unit="doc", disable=not progress or rank != 0, leave=False)
        try:
            with contextlib.ExitStack() as stack:
                writer = None
                if part is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    writer = stack.enter_context(SafetensorsStreamWriter(part))
                streamed = hasattr(dataset, "iter")
                for batch in dataset.iter(batch_size=batch_size) if streamed else _batched(dataset, batch_size):
                    rows = [_check_row(row, f"Streamed corpus row {count + i} (rank {rank})")
                            for i, row in enumerate(_rows_of_batch(batch))]  # fmt: skip
                    ids = [row[0] for row in rows]
                    with torch.no_grad(), _autocast(self._device(embedder), dtype):
                        embeddings = self._embed_texts(
                            embedder, [row[1] or "" for row in rows], [row[2] for row in rows], ids, max_length
                        )
                    if writer is not None:
                        if not count:
                            writer.begin("embeddings", torch.float32, (embeddings.shape[1],))
                        writer.write(embeddings)
                    else:
                        pieces.append(embeddings)
                    table.extend(ids)
                    count += len(rows)
                    bar.update(len(rows))
                if writer is not None:
                    if not count:
                        writer.begin("embeddings", torch.float32, (0,))
                    for name, tensor in table.to_tensors().items():
                        writer.begin(name, tensor.dtype)
                        writer.write(tensor)
                    writer.close({"format": "pt"})
        finally:
            embedder.train(was_training)
            bar.close()
        if folder is not None:
            parts = [folder / f"stream-part-{r:05d}-of-{world:05d}.safetensors" for r in range(world)]

            def blocks() -> Iterator[tuple[list[str], torch.Tensor]]:
                for path in parts:
                    tensors = map_safetensors(path)
                    ids = IdTable.from_tensors(tensors["id_data"], tensors["id_offsets"])
                    embeddings = tensors["embeddings"]
                    for start in range(0, len(ids), 65536):
                        stop = min(start + 65536, len(ids))
                        yield ids.take(range(start, stop)), embeddings[start:stop]

            return self._assemble(folder, rank, world, blocks, state, embedder_fingerprint, index_kwargs,
                                  stale=("stream-part-*",))  # fmt: skip
        embeddings = torch.cat(pieces) if pieces else None
        ids = table.tolist()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (ids, embeddings))
            ids = [i for part_ids, _ in gathered for i in part_ids]
            embeddings = torch.cat([e for _, e in gathered if e is not None]) if ids else None
        if embeddings is None:
            raise ValueError("The streamed corpus is empty: there is nothing to index.")
        index = DocumentIndex(ids, embeddings, **index_kwargs)
        index.embedder_fingerprint = embedder_fingerprint
        return index

    def add_documents(self, dataset: Any, batch_size: int = 64, max_length: int = 288, progress: bool = False) -> None:
        """Embed new documents (columns id, title, text; checked as by build_index) with the current embedder and add
        them to the index and to `documents`, without rebuilding the index (DocumentIndex.add)."""
        if self.index is None:
            raise ValueError("No index: call build_index first.")
        check_corpus(dataset)
        ids = _ids(dataset)
        present = [doc_id for doc_id in ids if doc_id in self.index]
        if present:  # refused before any embedding
            raise ValueError(f"documents {present[:5]} are already in the index: ids must be unique.")
        embeddings = self._embed_rows(dataset, batch_size, max_length, progress, self.embedder, None, None, None)
        self.index.add(ids, embeddings)
        if self.documents is None:
            self.documents = dataset
        elif hasattr(self.documents, "column_names"):
            from datasets import Dataset, concatenate_datasets

            new = dataset if hasattr(dataset, "column_names") else Dataset.from_list(list(dataset))
            columns = [c for c in self.documents.column_names if c in new.column_names]
            old, new = self.documents.select_columns(columns), new.select_columns(columns)
            if new.features != old.features:
                new = new.cast(old.features)
            self.documents = concatenate_datasets([old, new])
        else:
            self.documents = list(self.documents) + list(dataset)
        if self.index.documents is not None:
            self.index.documents = self.documents

    def remove_documents(self, ids: Sequence[str]) -> None:
        """Remove documents from the index (DocumentIndex.remove); the documents dataset keeps its rows (they are
        looked up by id, so removed ones are simply never returned)."""
        if self.index is None:
            raise ValueError("No index: call build_index first.")
        self.index.remove([str(i) for i in ids])

    # ----- retrieval -------------------------------------------------------------------------------------------
    def _tokenize_queries(self, queries: Any, max_length: int) -> dict[str, torch.Tensor]:
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, (list, tuple)):
            return dict(
                self.tokenizer(list(queries), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            )
        return {key: queries[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in queries}

    def retrieve(
        self,
        queries: Any,
        k: int = 8,
        exclude_ids: Sequence[Sequence[str] | str | None] | None = None,
        add_null: bool = False,
        rescore: bool = True,
        max_length: int = 128,
        doc_max_length: int = 288,
    ) -> RetrievalOutput:
        """Top-k documents per query.

        queries: list of strings, or a tokenised batch (input_ids, attention_mask[, token_type_ids]).
        exclude_ids: per query, ids (or one id) never returned (REALM excludes the masked sentence's own document).
        add_null: append the null document (empty title/text, embedded by the document encoder) as candidate k+1.
        rescore: re-embed the candidates with the current embedder (scores carry gradients to both encoders);
            otherwise the scores are q(x) . E_index[z] (gradients reach the query encoder only).
        """
        if self.index is None:
            raise ValueError("No index: call build_index(dataset) or pass index=... first.")
        device = self._device()
        inputs = {key: value.to(device) for key, value in self._tokenize_queries(queries, max_length).items()}
        query_emb = self.embedder.embed_queries(**inputs)
        check_finite_rows(query_emb.detach(), "The embeddings of queries (rows)")
        batch = query_emb.shape[0]
        if exclude_ids is None:
            exclude_ids = [None] * batch
        if len(exclude_ids) != batch:
            raise ValueError(f"exclude_ids has {len(exclude_ids)} entries for {batch} queries")
        excluded = [set() if e is None else {e} if isinstance(e, str) else set(map(str, e)) for e in exclude_ids]
        extra = max((len(e) for e in excluded), default=0)
        index_scores, index_rows = self.index.search(query_emb.detach().float(), k + extra)
        found_ids = self.index.ids_at(index_rows.cpu())

        doc_ids: list[list[str | None]] = []
        kept_scores = torch.full((batch, k), float("-inf"))
        for b in range(batch):
            row_ids = []
            for j, doc_id in enumerate(found_ids[b]):
                if doc_id is None or doc_id in excluded[b]:
                    continue
                kept_scores[b, len(row_ids)] = index_scores[b, j]
                row_ids.append(doc_id)
                if len(row_ids) == k:
                    break
            doc_ids.append(row_ids + [None] * (k - len(row_ids)))
        mask = torch.tensor([[d is not None for d in row] for row in doc_ids], dtype=torch.bool)

        flat = [d for row in doc_ids for d in row if d is not None]
        records = {d: r for d, r in zip(flat, self.get_documents(flat), strict=True)} if flat else {}
        titles = [[None if d is None else str(records[d].get("title", "")) for d in row] for row in doc_ids]
        texts = [[None if d is None else str(records[d].get("text", "")) for d in row] for row in doc_ids]
        if add_null:
            for row_ids, row_titles, row_texts in zip(doc_ids, titles, texts, strict=True):
                row_ids.append(NULL_DOC_ID)
                row_titles.append("")
                row_texts.append("")
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
        width = mask.shape[1]
        doc_inputs = self.tokenize_documents(
            [t or "" for row in titles for t in row], [t or "" for row in texts for t in row], doc_max_length
        )
        doc_inputs = {key: value.to(device) for key, value in doc_inputs.items()}
        mask = mask.to(device)

        if rescore:
            doc_emb = self.embedder.embed_documents(**doc_inputs).view(batch, width, -1)
        else:
            stale = torch.zeros(batch, width, query_emb.shape[-1], device=device)
            for b in range(batch):
                present = [j for j, d in enumerate(doc_ids[b]) if d is not None and d != NULL_DOC_ID]
                if present:
                    stale[b, present] = self.index.get([doc_ids[b][j] for j in present]).to(device, stale.dtype)
            if add_null:
                with torch.no_grad():
                    null = self.embedder.embed_documents(**{key: v[-1:] for key, v in doc_inputs.items()})
                stale[:, -1] = null.to(stale.dtype)
            doc_emb = stale
        scores = torch.einsum("bd,bkd->bk", query_emb.float(), doc_emb.float()).masked_fill(~mask, float("-inf"))
        if add_null:
            kept_scores = torch.cat([kept_scores, scores[:, -1:].detach().cpu()], dim=1)
        seq = doc_inputs["input_ids"].shape[-1]
        return RetrievalOutput(
            scores=scores,
            mask=mask,
            doc_ids=doc_ids,
            texts=texts,
            titles=titles,
            doc_input_ids=doc_inputs["input_ids"].view(batch, width, seq),
            doc_attention_mask=doc_inputs["attention_mask"].view(batch, width, seq),
            query_embeddings=query_emb,
            doc_embeddings=doc_emb,
            index_scores=kept_scores.to(device),
            extra={"doc_token_type_ids": doc_inputs.get("token_type_ids")},
        )

    __call__ = retrieve

    # ----- persistence -------------------------------------------------------------------------------------------
    _hub_name = "This RealmStyleRetriever"

    def save_pretrained(self, save_directory: str | os.PathLike, save_embedder: bool = True) -> None:
        """embedder/ (save_pretrained, with the tokenizer), index/ (DocumentIndex), documents/ (save_to_disk), a model
        card and retriever_config.json, as one folder commit: a reader sees the previous save or this one, never a
        mix, and saving into the folder the retriever was loaded from works (its memory-mapped documents stay valid).
        `save_embedder=False` leaves the embedder's weights out (a model that holds the embedder itself, like
        RealmKnowledgeAugmentedMLM, saves them once); `from_pretrained` then needs `embedder=`."""
        target = Path(save_directory)
        with FolderCommit(target, stale=("embedder/**", f"{INDEX_DIR}/**", "documents/**")) as staging:
            if save_embedder:
                self.embedder.save_pretrained(str(staging / "embedder"))
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(str(staging / "embedder"))
            if self.index is not None:
                self.index.write_files(staging / INDEX_DIR, save_documents=False, final_directory=target / INDEX_DIR)
            if self.documents is not None:
                documents = self.documents
                if not hasattr(documents, "save_to_disk"):
                    from datasets import Dataset

                    documents = Dataset.from_list(list(documents))
                documents.save_to_disk(str(staging / "documents"))
            if card_is_ours(target / "README.md"):
                (staging / "README.md").write_text(self._model_card(), encoding="utf-8")
            config = {
                "has_index": self.index is not None,
                "has_documents": self.documents is not None,
                "has_embedder": save_embedder,
            }
            (staging / RETRIEVER_CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")

    def _hub_base(self) -> str | None:
        return getattr(getattr(self.embedder, "config", None), "encoder_name_or_path", None)

    def _set_hub_base(self, name: str | None) -> None:
        self.embedder.config.encoder_name_or_path = name

    def _model_card(self) -> str:
        size = "no index" if self.index is None else f"an index of {len(self.index):,} documents"
        base = self._hub_base()
        return model_card(
            title="REALM-style retriever",
            library_name=LIBRARY_NAME,
            base_model=base if is_hub_id(base) else None,
            tags=["retrieval", "realm", "dense-retrieval", LIBRARY_NAME],
            body=(
                f"A dense retriever: the embedder (`embedder/`, with its tokenizer), {size} (`index/`) and the "
                "documents (`documents/`, a datasets.Dataset with id, title, text). `retrieve` re-embeds the "
                "candidates with the current embedder, so scores stay fresh (and trainable) under a stale index."
            ),
            usage=(
                "from hf_kadapter import RealmStyleRetriever\n\n"
                'retriever = RealmStyleRetriever.from_pretrained("<this repo>")\n'
                'found = retriever.retrieve(["a question"], k=5)\n'
                "print(found.doc_ids, found.titles)"
            ),
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        embedder_class: Any = None,
        device: str | torch.device | None = None,
        embedder: nn.Module | None = None,
        mmap: bool = False,
        **download_kwargs: Any,
    ) -> RealmStyleRetriever:
        """Load a folder written by `save_pretrained`, or a Hub repo id (downloaded into the HF cache first); any
        interrupted save in a local folder is finished first.

        `embedder=` reuses an embedder instead of loading `embedder/` (needed when it was saved without it);
        `embedder_class` defaults to AutoModel; `mmap=True` maps the index's embeddings instead of reading them
        (DocumentIndex.from_pretrained). Hub options (revision, token, ...) go to the download.
        """
        download, unknown = split_download_kwargs(download_kwargs)
        if unknown:
            raise TypeError(f"Unexpected arguments {sorted(unknown)}.")
        folder = resolve_folder(directory, what="RealmStyleRetriever", **download)
        with reading_folder(folder):
            return cls._load(folder, directory, embedder_class, device, embedder, mmap)

    @classmethod
    def _load(
        cls, folder: Path, directory: Any, embedder_class: Any, device: Any, embedder: Any, mmap: bool = False
    ) -> RealmStyleRetriever:
        if not (folder / RETRIEVER_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} is not a saved RealmStyleRetriever (no {RETRIEVER_CONFIG_NAME}); save one with "
                "RealmStyleRetriever.save_pretrained."
            )
        config = read_json(folder / RETRIEVER_CONFIG_NAME)
        if embedder is None:
            if not config.get("has_embedder", True):
                raise ValueError(
                    f"{directory} was saved without the embedder's weights (save_embedder=False): pass the embedder "
                    "it was saved with, from_pretrained(folder, embedder=...)."
                )
            if embedder_class is None:
                from transformers import AutoModel

                embedder_class = AutoModel
            embedder = embedder_class.from_pretrained(str(folder / "embedder"))
        if device is not None:
            embedder = embedder.to(device)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder / "embedder"))
        documents = None
        if config.get("has_documents"):
            from datasets import load_from_disk

            documents = load_from_disk(str(folder / "documents"))
        index = None
        if config.get("has_index"):
            index = DocumentIndex.from_pretrained(folder / INDEX_DIR, device=device, mmap=mmap)
            index.documents = documents
        return cls(embedder, tokenizer, index=index, documents=documents)

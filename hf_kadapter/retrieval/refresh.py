"""`IndexRefreshCallback`: REALM's asynchronous index refresh inside a `Trainer` run, without stopping training.

Every `every_n_steps` optimiser steps a snapshot of the retriever's embedder re-embeds the retriever's CURRENT corpus
(the ids in its index, so documents added or removed during training are counted) in a background thread while
training goes on. The new index keeps the old one's backend and search settings (exact or faiss, nprobe,
chunk_size, ...). It is swapped in at a step fixed when the refresh starts, `swap_delay_steps` later: the same step on
every rank and in every run with the same seed, so runs are reproducible. The swap is a pointer change; adds and
removes made while the refresh ran are replayed on the new index first. Training only waits if the refresh is not
done by its swap step (the wait is recorded in `history`).

Under torch.distributed each rank embeds 1/N of the corpus (a contiguous slice of the ids), writes it to a folder all
ranks share (`refresh_dir`, by default `<output_dir>/index-refresh`), rank 0's thread assembles the index once
(DocumentIndex.build_on_disk: faiss trained there, one file) and every rank loads that same folder, memory-mapped:
identical indexes on every rank. The background threads make no collective calls (they could interleave with the
training's); the ranks agree on the corpus when a refresh starts and on success at the swap step through small
collectives on the main thread.

Each Trainer checkpoint gets an `index_refresh/` folder (one folder commit): the current index, the documents, the
callback's state and, when a refresh is in flight, its embedder snapshot, ids and the changes recorded so far. A run
resumed from that checkpoint restores all of it and restarts the in-flight refresh from the same snapshot, so it
ends with the same index as an uninterrupted run.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.fingerprint import native_fingerprint
from ..utils.io import FolderCommit, read_json, reading_folder, save_tensors_atomic
from .index import DocumentIndex
from .storage import IdTable, map_safetensors

__all__ = ["IndexRefreshCallback", "refresh_device"]

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "index_refresh"
STATE_NAME = "refresh_state.json"
SNAPSHOT_NAME = "snapshot.safetensors"
PENDING_IDS_NAME = "pending_ids.safetensors"
_POLL_SECONDS = 0.05


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def refresh_device(training: torch.device, device_count: int, local_world_size: int, local_rank: int) -> torch.device:
    """Where a refresh runs when no device is given: a GPU no training process uses (spread over the local ranks)
    when the node has more GPUs than processes, else the training device itself (never the CPU for a GPU run)."""
    if training.type != "cuda":
        return training
    spare = device_count - local_world_size
    if spare > 0:
        return torch.device("cuda", local_world_size + local_rank % spare)
    return training


@dataclass
class _Refresh:
    """One refresh: started at `start`, swapped in at `swap`."""

    start: int
    swap: int
    ids: IdTable
    settings: dict[str, Any]
    source: DocumentIndex
    snapshot: torch.nn.Module
    thread: threading.Thread | None = None
    result: DocumentIndex | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    embedded: int = 0
    cancelled: bool = False
    prior_changes: list = field(default_factory=list)


class IndexRefreshCallback(TrainerCallback):
    """Refreshes the retriever's index during a `Trainer` run (see the module docstring).

    Args:
        retriever: the RealmStyleRetriever whose index is refreshed (its `documents` hold the texts).
        dataset: not read any more (the refresh embeds the retriever's current corpus); used as `documents` when the
            retriever has none.
        every_n_steps: a refresh starts at every multiple of this step (when none is in flight).
        batch_size / max_length: documents embedded at once / their token length.
        device: where the snapshot embeds; default: a spare GPU, else the training device (see refresh_device).
        swap_delay_steps: steps between a refresh's start and its swap (default every_n_steps, so the refresh runs
            continuously, as REALM's index builder).
        refresh_dir: a folder shared by all ranks for the embedded parts and the assembled index; default
            `<output_dir>/index-refresh` under torch.distributed, in memory for a single process.
        num_threads: CPU threads of the refresh thread (OpenMP's setting is per thread, so training keeps its own);
            give the refresh its own cores, e.g. 1 of 2.
        save_with_checkpoints: write `index_refresh/` into every Trainer checkpoint and restore it on resume.
        wait_on_train_end: at the end of training, wait for a refresh in flight and swap it in.

    `refreshes` records (started_at_step, swapped_at_step) pairs and `history` one dict per swapped refresh (wall
    time, seconds training waited for it, documents this rank embedded).
    """

    def __init__(
        self,
        retriever: Any,
        dataset: Any = None,
        every_n_steps: int = 500,
        batch_size: int = 64,
        max_length: int = 288,
        device: str | torch.device | None = None,
        swap_delay_steps: int | None = None,
        refresh_dir: str | os.PathLike | None = None,
        num_threads: int | None = None,
        save_with_checkpoints: bool = True,
        wait_on_train_end: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        if swap_delay_steps is not None and swap_delay_steps < 1:
            raise ValueError(f"swap_delay_steps={swap_delay_steps} must be >= 1: a swap happens at a later step.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads={num_threads} must be >= 1.")
        if dataset is not None:
            if getattr(retriever, "documents", None) is None:
                retriever.documents = dataset
            elif dataset is not retriever.documents:
                warnings.warn(
                    "IndexRefreshCallback re-embeds the retriever's current corpus (the ids of retriever.index, texts "
                    "from retriever.documents): `dataset` is not read. Leave it out.",
                    FutureWarning,
                    stacklevel=2,
                )
        self.retriever = retriever
        self.every_n_steps = every_n_steps
        self.swap_delay_steps = every_n_steps if swap_delay_steps is None else swap_delay_steps
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = None if device is None else torch.device(device)
        self.refresh_dir = None if refresh_dir is None else Path(refresh_dir)
        self.num_threads = num_threads
        self.save_with_checkpoints = save_with_checkpoints
        self.wait_on_train_end = wait_on_train_end
        self.refreshes: list[tuple[int, int]] = []
        self.history: list[dict[str, Any]] = []
        self._pending: _Refresh | None = None
        _LIVE.add(self)

    # ----- state -------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a refresh thread is working now."""
        return self._pending is not None and self._pending.thread is not None and self._pending.thread.is_alive()

    @property
    def pending_swap_step(self) -> int | None:
        """The step the refresh in flight will be swapped in at (None without one)."""
        return None if self._pending is None else self._pending.swap

    def _snapshot_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        try:
            training = next(self.retriever.embedder.parameters()).device
        except StopIteration:
            return torch.device("cpu")
        count = torch.cuda.device_count() if training.type == "cuda" else 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return refresh_device(training, count, local_world, int(os.environ.get("LOCAL_RANK", "0")))

    # ----- Trainer events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        rank, world = _distributed()
        if self.refresh_dir is None and world > 1:
            self.refresh_dir = Path(args.output_dir) / "index-refresh"
        if world > 1:
            self._check_shared_folder(rank)
        if state.global_step > 0 and self.save_with_checkpoints:
            self._restore(args, state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self._pending is not None and step >= self._pending.swap:
            self._finish(step)
        if self._pending is None and step > 0 and step % self.every_n_steps == 0 and step < state.max_steps:
            self.start_refresh(step)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.save_with_checkpoints and args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / CHECKPOINT_SUBDIR
            self.save_state(folder)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            if self.wait_on_train_end:
                self._finish(state.global_step)
            else:
                self._abandon()
        return control

    # ----- starting and finishing a refresh ----------------------------------------------------------------------
    def start_refresh(self, step: int, swap_step: int | None = None) -> None:
        """Snapshot the embedder and the corpus now (on the main thread) and start re-embedding in the background."""
        index = self.retriever.index
        if index is None:
            raise ValueError("IndexRefreshCallback needs a retriever with an index: call retriever.build_index first.")
        snapshot = copy.deepcopy(self.retriever.embedder)
        swap = step + self.swap_delay_steps if swap_step is None else swap_step
        self._launch(_Refresh(step, swap, index.id_table.copy(), index.settings(), index, snapshot))

    def _launch(self, pending: _Refresh, prior_changes: Sequence[tuple[str, list[str]]] = ()) -> None:
        rank, world = _distributed()
        if world > 1:  # on the main thread: every rank must refresh the same corpus from the same step
            mine = (pending.start, pending.swap, len(pending.ids), pending.ids.digest())
            everyone: list[Any] = [None] * world
            torch.distributed.all_gather_object(everyone, mine)
            if any(other != mine for other in everyone):
                raise RuntimeError(
                    f"The ranks disagree on the index refresh starting at step {pending.start} (start, swap, number "
                    f"of documents, ids digest per rank: {everyone}): every rank must add and remove the same "
                    "documents, in the same order."
                )
        snapshot = pending.snapshot.to(self._snapshot_device()).eval()
        for parameter in snapshot.parameters():
            parameter.requires_grad_(False)
        pending.snapshot = snapshot
        pending.prior_changes = list(prior_changes)
        # The worker gets its own tokenizer copy: fast tokenizers keep padding/truncation state, so sharing one with
        # the training thread would race.
        worker = type(self.retriever)(
            snapshot, copy.deepcopy(self.retriever.tokenizer), documents=self.retriever.documents
        )
        pending.source.start_journal()
        pending.thread = threading.Thread(
            target=self._work, args=(pending, worker, rank, world), name="realm-index-refresh", daemon=True
        )
        self._pending = pending
        pending.thread.start()

    def _work(self, pending: _Refresh, worker: Any, rank: int, world: int) -> None:
        """The background thread: embed this rank's slice, then assemble (rank 0) or load the new index."""
        folder = None if self.refresh_dir is None else self.refresh_dir / f"refresh-{pending.start:09d}"
        try:
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)  # OpenMP threads: a per-thread setting
            started = time.perf_counter()
            total = len(pending.ids)
            low, high = rank * total // world, (rank + 1) * total // world
            blocks = _until_cancelled(
                worker.embed_ids(
                    pending.ids.take(range(low, high)), batch_size=self.batch_size, max_length=self.max_length
                ),
                pending,
            )
            fingerprint = native_fingerprint(pending.snapshot.state_dict().items())
            if folder is None:
                pieces = [(ids, embeddings) for ids, embeddings in blocks]
                new = DocumentIndex(
                    [i for ids, _ in pieces for i in ids],
                    torch.cat([embeddings for _, embeddings in pieces]),
                    **pending.settings,
                )
                new.embedder_fingerprint = fingerprint
                if new.backend == "faiss":
                    new.rebuild_faiss()  # here, not at the first search after the swap
            else:
                new = self._distributed_assembly(pending, folder, blocks, rank, world, fingerprint)
            if pending.source.device != new.device:
                new.to(pending.source.device)
            pending.embedded = high - low
            pending.seconds = time.perf_counter() - started
            pending.result = new
        except BaseException as error:  # noqa: BLE001 - re-raised on the training thread
            pending.error = error
            if folder is not None and not isinstance(error, _Cancelled):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"failed-rank{rank}.txt").write_text(f"{type(error).__name__}: {error}", encoding="utf-8")

    def _distributed_assembly(
        self, pending: _Refresh, folder: Path, blocks: Any, rank: int, world: int, fingerprint: str
    ) -> DocumentIndex:
        """Write this rank's part; rank 0 assembles the index once (one folder commit); every rank loads it."""
        folder.mkdir(parents=True, exist_ok=True)
        parts = [folder / f"part-{r:05d}-of-{world:05d}.safetensors" for r in range(world)]
        embedded = [embeddings for _, embeddings in blocks]
        dim = pending.source.dim
        save_tensors_atomic(parts[rank], {"embeddings": torch.cat(embedded) if embedded else torch.empty(0, dim)})
        target = folder / "index"
        if rank == 0:
            self._wait_for(parts, folder, pending)
            total = len(pending.ids)

            def assembled():
                for r, part in enumerate(parts):
                    embeddings = map_safetensors(part)["embeddings"]
                    low = r * total // world
                    for start in range(0, embeddings.shape[0], 65536):
                        stop = min(start + 65536, embeddings.shape[0])
                        yield pending.ids.take(range(low + start, low + stop)), embeddings[start:stop]

            DocumentIndex.build_on_disk(target, assembled(), embedder_fingerprint=fingerprint, **pending.settings)
            for part in parts:
                part.unlink(missing_ok=True)
        else:
            self._wait_for([target / "index_config.json"], folder, pending)
        return DocumentIndex.from_pretrained(target, mmap=True)  # the same bytes on every rank, rank 0's too

    @staticmethod
    def _wait_for(paths: Sequence[Path], folder: Path, pending: _Refresh) -> None:
        """Poll until `paths` exist; stop when another rank reports a failure or the refresh is abandoned."""
        while not all(path.exists() for path in paths):
            failed = sorted(folder.glob("failed-rank*.txt"))
            if failed:
                raise RuntimeError(f"another rank's refresh failed ({failed[0].read_text(encoding='utf-8')})")
            if pending.cancelled:
                raise RuntimeError("the refresh was abandoned")
            time.sleep(_POLL_SECONDS)

    def _finish(self, step: int) -> None:
        """Wait for the refresh if it is not done, agree across ranks that it succeeded, then swap it in."""
        pending, self._pending = self._pending, None
        waited = time.perf_counter()
        pending.thread.join()
        waited = time.perf_counter() - waited
        changes = pending.prior_changes + pending.source.stop_journal()
        failed = torch.tensor([0 if pending.error is None else 1])
        rank, world = _distributed()
        if world > 1:
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if int(failed[0]):
            reason = "on this rank" if pending.error is not None else "on another rank (see its log)"
            raise RuntimeError(f"background index refresh failed {reason}") from pending.error
        if self.retriever.index is not pending.source:
            logger.warning(
                "retriever.index was replaced while the refresh started at step %d ran: the refreshed index is "
                "dropped (the replacement stays).",
                pending.start,
            )
            return
        new = pending.result
        _replay(new, pending.source, changes)
        new.documents = pending.source.documents
        self.retriever.index = new  # the swap: a pointer change
        self.refreshes.append((pending.start, step))
        self.history.append(
            {
                "started": pending.start,
                "swapped": step,
                "seconds": round(pending.seconds, 3),
                "waited_seconds": round(waited, 3),
                "documents": len(new),
                "embedded_here": pending.embedded,
                "ranks": world,
            }
        )
        if self.refresh_dir is not None and rank == 0:  # earlier refreshes' folders (memory maps survive unlink)
            for old in self.refresh_dir.glob("refresh-*"):
                if old.name < f"refresh-{pending.start:09d}":
                    shutil.rmtree(old, ignore_errors=True)

    def _abandon(self) -> None:
        pending, self._pending = self._pending, None
        pending.cancelled = True
        pending.source.stop_journal()

    # ----- checkpoints -------------------------------------------------------------------------------------------
    def save_state(self, folder: str | os.PathLike) -> None:
        """Write the current index, the documents and the refresh state (with an in-flight refresh's snapshot, ids
        and the changes recorded since it started) into `folder`, as one folder commit."""
        folder = Path(folder)
        retriever, pending = self.retriever, self._pending
        stale = ("index/**", "documents/**", SNAPSHOT_NAME, PENDING_IDS_NAME)
        with FolderCommit(folder, stale=stale) as staging:
            retriever.index.write_files(staging / "index", save_documents=False)
            documents = retriever.documents
            if documents is not None:
                if not hasattr(documents, "save_to_disk"):
                    from datasets import Dataset

                    documents = Dataset.from_list(list(documents))
                documents.save_to_disk(str(staging / "documents"))
            record: dict[str, Any] = {
                "format_version": 1,
                "every_n_steps": self.every_n_steps,
                "swap_delay_steps": self.swap_delay_steps,
                "refreshes": self.refreshes,
                "history": self.history,
                "pending": None,
            }
            if pending is not None:
                save_model(pending.snapshot, str(staging / SNAPSHOT_NAME))
                save_tensors_atomic(staging / PENDING_IDS_NAME, pending.ids.to_tensors())
                journal = pending.source._journal or []
                record["pending"] = {
                    "start": pending.start,
                    "swap": pending.swap,
                    "changes": [[op, ids] for op, ids in pending.prior_changes + journal],
                }
            (staging / STATE_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")

    def _restore(self, args, state) -> None:
        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint) / CHECKPOINT_SUBDIR)
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / CHECKPOINT_SUBDIR)
        found = next((c for c in candidates if (c / STATE_NAME).is_file()), None)
        if found is None:
            logger.warning(
                "Resuming at step %d without an %s/ folder in the checkpoint (looked in %s): the retriever keeps the "
                "index it was given, which may be stale. Checkpoints written with IndexRefreshCallback hold it.",
                state.global_step,
                CHECKPOINT_SUBDIR,
                ", ".join(map(str, candidates)),
            )
            return
        self.load_state(found)

    def load_state(self, folder: str | os.PathLike) -> None:
        """Restore what save_state wrote: the retriever's index and documents, the records, and an in-flight refresh
        (restarted from its saved snapshot, to be swapped in at the same step as in the uninterrupted run)."""
        folder = Path(folder)
        retriever = self.retriever
        with reading_folder(folder):
            record = read_json(folder / STATE_NAME)
            mapped = retriever.index is not None and retriever.index.memory_mapped
            index = DocumentIndex.from_pretrained(folder / "index", mmap=mapped)
            documents = None
            if (folder / "documents").is_dir():
                from datasets import load_from_disk

                documents = load_from_disk(str(folder / "documents"))
            if retriever.index is not None and retriever.index.device != index.device:
                index.to(retriever.index.device)
            pending = record.get("pending")
            snapshot = ids = None
            if pending is not None:
                snapshot = copy.deepcopy(retriever.embedder)
                missing, unexpected = load_model(snapshot, str(folder / SNAPSHOT_NAME), strict=False)
                if missing or unexpected:
                    raise ValueError(
                        f"{folder / SNAPSHOT_NAME} does not fit the retriever's embedder (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}): resume with the embedder the run was started with."
                    )
                tensors = map_safetensors(folder / PENDING_IDS_NAME)
                ids = IdTable.from_tensors(tensors["id_data"], tensors["id_offsets"])
        had_documents = retriever.index is not None and retriever.index.documents is not None
        index.documents = documents if had_documents else None
        retriever.index = index
        if documents is not None:
            retriever.documents = documents
        self.refreshes = [tuple(pair) for pair in record.get("refreshes", [])]
        self.history = list(record.get("history", []))
        if pending is not None:
            changes = [(op, list(ids_)) for op, ids_ in pending["changes"]]
            refresh = _Refresh(pending["start"], pending["swap"], ids, index.settings(), index, snapshot)
            self._launch(refresh, prior_changes=changes)

    def _check_shared_folder(self, rank: int) -> None:
        """Under torch.distributed the parts meet in refresh_dir: every rank must see rank 0's files there."""
        token = [None]
        if rank == 0:
            self.refresh_dir.mkdir(parents=True, exist_ok=True)
            marker = self.refresh_dir / f".shared-{os.getpid()}-{time.time_ns()}"
            marker.touch()
            token = [marker.name]
        torch.distributed.broadcast_object_list(token, src=0)
        seen = torch.tensor([1 if (self.refresh_dir / token[0]).exists() else 0])
        torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.barrier()
        if rank == 0:
            (self.refresh_dir / token[0]).unlink(missing_ok=True)
        if not int(seen[0]):
            raise RuntimeError(
                f"refresh_dir={self.refresh_dir} is not shared by all ranks: each rank writes its part of the corpus "
                "there and rank 0 assembles the index. Pass a folder on a filesystem every node mounts."
            )


class _Cancelled(Exception):
    """The refresh was abandoned (end of training without waiting, or the interpreter exiting)."""


def _until_cancelled(blocks: Any, pending: _Refresh) -> Any:
    """The blocks, stopping at the next batch once the refresh is abandoned."""
    for block in blocks:
        if pending.cancelled:
            raise _Cancelled()
        yield block


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_refreshes() -> None:
    """At interpreter exit, stop refresh threads still running (a daemon thread inside torch when Python finalises
    aborts the process) and wait for them to leave, which they do at their next batch."""
    for callback in list(_LIVE):
        pending = callback._pending
        if pending is not None and pending.thread is not None:
            pending.cancelled = True
            pending.thread.join(timeout=60)


def _replay(new: DocumentIndex, source: DocumentIndex, changes: Sequence[tuple[str, list[str]]]) -> None:
    """Bring `new` to the corpus `source` has now, given the adds and removes made on `source` while the refresh ran:
    removed documents go, added ones come with the embeddings they were added with (a document removed and added
    again under the same id takes its new version)."""
    touched = list(dict.fromkeys(doc_id for _, ids in changes for doc_id in ids))
    added = {doc_id for op, ids in changes if op == "add" for doc_id in ids}
    drop = [doc_id for doc_id in touched if doc_id in new and (doc_id not in source or doc_id in added)]
    if drop:
        new.remove(drop)
    fresh = [doc_id for doc_id in touched if doc_id in added and doc_id in source]
    if fresh:
        new.add(fresh, source.get(fresh))

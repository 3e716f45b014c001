"""Writing and reading files so that a kill at any point leaves nothing half-done, and damaged files are named.

One mechanism commits every multi-file artefact (K-Adapter folders, entity tables, document indexes, retrievers,
feature caches, the final saves of the builders): a write-ahead commit INSIDE the target folder.

1. Every new file is written into a staging subfolder `target/.staging-<id>/` and fsynced. The writer holds a lock on
   that staging folder while it lives, so nobody mistakes it for garbage.
2. Under the folder's exclusive lock, an intent record `target/.commit-<time>-<id>.json` is written atomically: the
   files to move in and the stale files of ours to delete (files matching the artefact's own patterns that the new
   version does not have; anything else in the folder is foreign and never touched).
3. Each file is moved into place with os.replace, the stale ones are deleted, then the record and the staging
   folder are removed.

Every loader first calls `reading_folder`, which rolls a pending record forward (idempotent: a staged file that is
gone was already moved) and deletes staging folders whose writer is dead (a kill before the record: the old
version is untouched), then reads under a shared lock, so it sees the old complete version or the new one. File
names stay the fixed ones transformers and the Hub expect, foreign files (a Trainer's checkpoint-* folders beside a
saved model) survive, and saving into the folder an object was loaded from works: renames keep files that are
already open or memory-mapped valid.

Locks are `flock`s on the folders' own descriptors (no lock files); where locking is unavailable (a read-only
folder such as the Hub cache, where nothing is ever written partially, or a filesystem without flock) reading goes
ahead without one. Single files are written with `atomic_write` (temporary file + fsync + os.replace).

(hf_kadapter/kadapter/modeling_kadapter.py and hf_kadapter/retrieval/modeling_retriever.py keep private copies of the
helpers they need: they are shipped as remote code and may import nothing from this package; a test keeps the copies
identical.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save

try:  # POSIX; elsewhere folders are committed the same way, only without locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
RECORD_PREFIX = ".commit-"
BUILD_LOCK_NAME = ".hf_kadapter-build.lock"
# Hidden entries of the mechanism itself: never listed as an artefact's files, never uploaded.
MECHANISM_PATTERNS = (STAGING_PREFIX + "*", RECORD_PREFIX + "*", BUILD_LOCK_NAME, ".*.tmp")
# The weight files transformers' save_pretrained writes (one file or shards + index, variants included): the stale
# patterns of a model folder. Narrow on purpose: a user's "model_backup.safetensors" beside them is not ours.
WEIGHTS_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "model.*.safetensors",
    "model.*-*-of-*.safetensors",
    "model.safetensors.index.*.json",
)

# Tests set this to a callable(label) to kill or interrupt a job at a chosen write boundary.
_FAULT_HOOK: Callable[[str], None] | None = None


class DamagedFileError(ValueError):
    """A file exists but cannot be what it claims to be (cut short, not valid JSON, not UTF-8 ...)."""

    def __init__(self, path: str | os.PathLike, why: str, fix: str | None = None):
        fix = fix or (
            "It was probably cut short by a crash or a full disk, or edited by hand: save or build it again "
            "(or download it again)"
        )
        super().__init__(f"{path} is damaged: {why}. {fix}.")
        self.path = str(path)
        self.why = why


def _fault_point(label: str) -> None:
    """A write boundary: where the fault-injection tests kill the process."""
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(label)


# ---------------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------------
def _fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write through a temporary file in the same folder, then os.replace: a reader (or a build resumed after a
    crash) sees the old file or the new one, never half of one. The temporary file is locked while it lives, so
    recover_folder can tell the leftovers of a killed writer (deleted) from a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = _open_temporary(path)
    stream = os.fdopen(handle, mode, encoding=None if "b" in mode else encoding)
    try:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())
        _fault_point("atomic_write:written")
        os.replace(temp, path)
        _fault_point("atomic_write:replaced")
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    finally:
        stream.close()


def _open_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path` (`.<name>-<8 hex digits>.tmp`, as _temporaries finds them), locked.

    Created with mode 0o666 less the umask, as any file the user writes (mkstemp's files are 0600, and reading the
    umask means setting it with os.umask, for every thread of the process at once). A file that a recovery took for
    a dead writer's leftover between its creation and the lock is made again."""
    while True:
        temp = path.parent / f".{path.name}-{secrets.token_hex(4)}.tmp"
        try:
            handle = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return handle, temp
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        if os.path.lexists(temp):  # (not st_nlink: some network filesystems report 0 for linked files)
            return handle, temp
        os.close(handle)


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> None:
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("ensure_ascii", False)
    with atomic_write(path) as stream:
        json.dump(data, stream, **dump_kwargs)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, the same in every process: safetensors writes its metadata in hash-map order,
    which changes from one process to the next, so the header is rewritten with the metadata keys sorted (same
    length, same offsets). This is what lets a resumed build end in the same bytes as an uninterrupted one."""
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(canonical) > length:  # pragma: no cover - same keys and values cannot grow
        return payload
    return payload[:8] + canonical.ljust(length, b" ") + payload[8 + length :]


def save_tensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors (never pickle, the same bytes in every process) with the same guarantee as atomic_write."""
    payload = safetensors_bytes(tensors, metadata)
    with atomic_write(path, "wb") as stream:
        stream.write(payload)


def read_json(path: str | os.PathLike) -> Any:
    """json.load that names the file, line and column of what is wrong (bytes that are not UTF-8 included)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DamagedFileError(path, f"byte {error.start} (line {line}) is not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DamagedFileError(
            path, f"invalid JSON at line {error.lineno}, column {error.colno} ({error.msg})"
        ) from None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file (None when its header and size agree).

    Reads only the header: the 8-byte length, the JSON header, and checks that the data it describes ends exactly at
    the end of the file, which a file cut short by a crash never does.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                return f"it holds {size} bytes, fewer than a safetensors header"
            length = int.from_bytes(prefix, "little")
            if 8 + length > size:
                return f"its header announces {length} bytes but the file holds {size}"
            header = json.loads(stream.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"its header entry {key!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return f"it holds {size} bytes but its header describes {8 + length + end}"
    return None


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise DamagedFileError naming `path` unless it is a complete safetensors file."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise DamagedFileError(path, problem)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file, with a damaged file named instead of "incomplete metadata"."""
    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise DamagedFileError(path, f"safetensors cannot read it ({error})") from None


# ---------------------------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def _flock(path: str | os.PathLike, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """flock on the descriptor of `path` (a folder or a file); yields False where there is nothing to lock with
    (no fcntl, an unreadable folder, a filesystem without flock), True once held. Non-blocking: BlockingIOError."""
    if fcntl is None:
        yield False
        return
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(handle, operation)
            held = True
        except BlockingIOError:
            raise
        except OSError:
            held = False
        yield held
    finally:
        os.close(handle)


@contextmanager
def build_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock held by a builder of `folder` for the whole build: a second builder of the same cache, table or
    index waits for the first one, then finds its result (the lock file `.hf_kadapter-build.lock` stays, empty)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BUILD_LOCK_NAME
    path.touch(exist_ok=True)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_flock(path, exclusive=True, blocking=False))
    except BlockingIOError:
        logger.warning("Another process is building %s: waiting for it to finish.", folder)
        stack.enter_context(_flock(path, exclusive=True))
    with stack:
        yield


# ---------------------------------------------------------------------------------------------------------------
# Folder commits
# ---------------------------------------------------------------------------------------------------------------
def _is_mechanism_entry(name: str) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in MECHANISM_PATTERNS)


def _records(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(RECORD_PREFIX + "*.json") if p.is_file())


def _stagings(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(STAGING_PREFIX + "*") if p.is_dir())


def _temporaries(folder: Path) -> list[Path]:
    """atomic_write's temporary files (`.<name>-<8 random characters>.tmp`, as _open_temporary, and before it
    tempfile.mkstemp, names them) in `folder` and its direct subfolders (a build's partial/ for instance); other files
    are never touched."""
    return sorted(
        p
        for pattern in (".*-????????.tmp", "*/.*-????????.tmp")
        for p in folder.glob(pattern)
        if p.is_file() and all(c.isalnum() or c == "_" for c in p.name[-12:-4])
    )


def _relative_files(root: Path) -> list[str]:
    """Files under `root` as sorted posix paths, leaving out the mechanism's own entries at any depth."""
    found = []
    for current, folders, files in os.walk(root):
        folders[:] = [name for name in folders if not _is_mechanism_entry(name)]
        base = Path(current).relative_to(root)
        found += [(base / name).as_posix() for name in files if not _is_mechanism_entry(name)]
    return sorted(found)


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    """fnmatch segment by segment ("*" never crosses a "/"); a last segment "**" matches everything below."""
    parts = relative.split("/")
    for pattern in patterns:
        pieces = pattern.split("/")
        if pieces[-1] == "**":
            head = pieces[:-1]
            if len(parts) > len(head) and all(fnmatchcase(p, q) for p, q in zip(parts[: len(head)], head, strict=True)):
                return True
        elif len(parts) == len(pieces) and all(fnmatchcase(p, q) for p, q in zip(parts, pieces, strict=True)):
            return True
    return False


def _apply_record(folder: Path, record_path: Path) -> None:
    """Roll one intent record forward: move the staged files in, delete the stale ones, drop the record."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        staging, files, delete = folder / record["staging"], record["files"], record["delete"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(
            record_path,
            f"this commit record cannot be read ({error})",
            f"A save into {folder} was interrupted and its record is unreadable: check the folder's files, then "
            "delete the record and the .staging-* folders to go on",
        ) from None
    touched = {folder}
    for relative in files:
        source, target = staging / relative, folder / relative
        if os.path.lexists(source):  # else it was moved before the interruption
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            touched.add(target.parent)
            _fault_point("commit:moved")
    for relative in delete:
        target = folder / relative
        if target.is_file() or target.is_symlink():
            target.unlink()
            _fault_point("commit:deleted")
        parent = target.parent
        while parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    for touched_folder in sorted(touched):
        _fsync_dir(touched_folder)
    record_path.unlink()
    _fault_point("commit:recorded-removed")
    shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(folder)


def _clean_stagings(folder: Path) -> None:
    """Delete staging folders and temporary files whose writer is gone (killed before its commit or rename)."""
    for leftover in _stagings(folder) + _temporaries(folder):
        try:
            with _flock(leftover, exclusive=True, blocking=False) as held:
                if held and leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif held:
                    leftover.unlink(missing_ok=True)
        except BlockingIOError:
            continue  # a live writer is still filling it


def recover_folder(folder: str | os.PathLike) -> None:
    """Finish a save that was interrupted in `folder`: roll a pending record forward, drop the staging folders and
    temporary files of dead writers."""
    folder = Path(folder)
    if not folder.is_dir() or not (_records(folder) or _stagings(folder) or _temporaries(folder)):
        return
    if not os.access(folder, os.W_OK):
        if _records(folder):
            raise PermissionError(
                f"{folder} holds an interrupted save (a {RECORD_PREFIX}*.json record) and is read-only here: open "
                "it once with write access to finish the save, or copy the folder somewhere writable."
            )
        return
    if _records(folder):
        with _flock(folder, exclusive=True):
            for record in _records(folder):
                _apply_record(folder, record)
            _clean_stagings(folder)
        return
    # Only leftovers of dead writers (or a live writer's staging): clean them when the folder is free, never wait
    # (a reader of this folder in this very process holds its shared lock, and would deadlock on its own).
    try:
        with _flock(folder, exclusive=True, blocking=False):
            _clean_stagings(folder)
    except BlockingIOError:
        pass


@contextmanager
def reading_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Recover `folder`, then hold its shared lock while the caller reads it (no save can commit meanwhile)."""
    folder = Path(folder)
    if not folder.is_dir():
        yield
        return
    while True:
        recover_folder(folder)
        with _flock(folder, exclusive=False) as held:
            if not held or not _records(folder):
                yield
                return
        # A writer died between our recovery and our lock: recover again.


def reading_local(name_or_path: str | os.PathLike | None) -> contextlib.AbstractContextManager:
    """reading_folder for a local folder; nothing for a Hub repo id (the Hub cache is never written partially)."""
    if name_or_path is not None and os.path.isdir(name_or_path):
        return reading_folder(name_or_path)
    return contextlib.nullcontext()


class FolderCommit:
    """`with FolderCommit(folder, stale=patterns) as staging:` write the new version's files into `staging`; on a
    clean exit they replace the folder's files as one commit (see the module docstring).

    `stale`: patterns (fnmatch on posix paths relative to the folder; "dir/**" for a whole subfolder) of the files
    that belong to the artefact: those the new version does not write again are deleted. Files matching no pattern
    are foreign and kept. An exception inside the block discards the staging folder and leaves the folder as it was.
    """

    def __init__(self, folder: str | os.PathLike, stale: Sequence[str] = ()):
        self.folder = Path(folder)
        self.stale = tuple(stale)
        self.staging: Path | None = None
        self._lock: contextlib.ExitStack | None = None
        self._record: Path | None = None

    def __enter__(self) -> Path:
        if self.folder.is_file():
            raise ValueError(f"{self.folder} is a file; give a folder.")
        self.folder.mkdir(parents=True, exist_ok=True)
        recover_folder(self.folder)
        self._lock = contextlib.ExitStack()
        # Under the folder's shared lock, so no recovery can take the new staging folder for a dead writer's.
        with _flock(self.folder, exclusive=False):
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
            self._lock.enter_context(_flock(self.staging, exclusive=True))
        return self.staging

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._lock.close()
            # Once its record is written the staging folder belongs to the record: an exception while applying it
            # (Ctrl-C, a full disk) leaves both for the next reader to roll forward, never a record without its files.
            if self._record is None or not self._record.exists():
                shutil.rmtree(self.staging, ignore_errors=True)

    def _commit(self) -> None:
        staging, folder = self.staging, self.folder
        files = _relative_files(staging)
        for relative in files:
            with open(staging / relative, "rb") as stream:
                os.fsync(stream.fileno())
        for current, _, _ in os.walk(staging):
            _fsync_dir(current)
        for relative in files:  # refused before any record: a roll-forward must never fail
            parts = relative.split("/")
            in_the_way = [folder.joinpath(*parts[:i]) for i in range(1, len(parts))]
            if (folder / relative).is_dir() or any(p.is_file() for p in in_the_way):
                raise ValueError(
                    f"Cannot save {relative!r} into {folder}: a file stands where a folder is needed, or a folder "
                    "where a file is needed. Move it away or save elsewhere."
                )
        _fault_point("commit:staged")
        with _flock(folder, exclusive=True):
            for record in _records(folder):
                _apply_record(folder, record)
            new = set(files)
            delete = [p for p in _relative_files(folder) if p not in new and _matches(p, self.stale)]
            record = {"staging": staging.name, "files": files, "delete": delete}
            self._record = folder / f"{RECORD_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            with atomic_write(self._record) as stream:
                json.dump(record, stream)
            _fsync_dir(folder)
            _fault_point("commit:recorded")
            _apply_record(folder, self._record)


__all__ = [
    "BUILD_LOCK_NAME",
    "DamagedFileError",
    "FolderCommit",
    "MECHANISM_PATTERNS",
    "WEIGHTS_PATTERNS",
    "atomic_write",
    "build_lock",
    "check_safetensors",
    "load_safetensors",
    "read_json",
    "reading_folder",
    "reading_local",
    "recover_folder",
    "safetensors_bytes",
    "safetensors_problem",
    "save_tensors_atomic",
    "write_json_atomic",
]

"""Fault injection for the reliability tests: run a job in a forked child and SIGKILL it at its Nth write boundary
(hf_kadapter.utils.io._fault_point and the remote-code copies in modeling_kadapter and modeling_retriever) or after a delay.

A forked child inherits the loaded libraries, models and data, so a kill-and-resume round costs the job's own work,
not a Python start; the kill is a real SIGKILL (no finally blocks, no atexit), as after `kill -9`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import random
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import hf_kadapter.kadapter.modeling_kadapter as modeling_kadapter
import hf_kadapter.retrieval.modeling_retriever as modeling_retriever
import hf_kadapter.utils.io as shared_io

HOOKED = (shared_io, modeling_kadapter, modeling_retriever)  # the shared module and the remote-code copies
KILLED = -signal.SIGKILL
# Files that legitimately differ between two runs of the same job (wall-clock fields) and the mechanism's own.
VOLATILE_JSON_KEYS = {"build_seconds", "updated"}


class KillAt:
    """Counts write boundaries; SIGKILLs this process at boundary `kill_at` (1-based), or never."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.labels: list[str] = []

    def __call__(self, label: str) -> None:
        self.labels.append(label)
        if self.kill_at is not None and len(self.labels) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def fault_hook(hook: Callable[[str], None]) -> Iterator[None]:
    saved = [module._FAULT_HOOK for module in HOOKED]
    for module in HOOKED:
        module._FAULT_HOOK = hook
    try:
        yield
    finally:
        for module, previous in zip(HOOKED, saved, strict=True):
            module._FAULT_HOOK = previous


def boundaries(job: Callable[[], object]) -> list[str]:
    """The write boundaries an uninterrupted run of `job` passes, in order (the job runs here, in this process)."""
    counter = KillAt()
    with fault_hook(counter):
        job()
    return counter.labels


def run_child(job: Callable[[], object], kill_at: int | None = None, kill_after: float | None = None) -> int:
    """Run `job` in a forked child; kill it at boundary `kill_at` or after `kill_after` seconds. Returns its exit
    code (KILLED when it was killed, 1 with the traceback printed when it raised)."""
    gc.freeze()  # the child's collections (Trainer runs gc.collect) skip the parent's heap, and leave its pages shared
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            if kill_after is not None:
                timer = threading.Timer(kill_after, os.kill, args=(os.getpid(), signal.SIGKILL))
                timer.daemon = True
                timer.start()
            with fault_hook(KillAt(kill_at)):
                job()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    gc.unfreeze()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _normalised(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        value = json.loads(data)
    except ValueError:
        return data

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in VOLATILE_JSON_KEYS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.dumps(strip(value), sort_keys=True).encode()


def snapshot(folder: str | os.PathLike, ignore: Callable[[str], bool] = lambda name: False) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder` (JSON wall-clock fields dropped, lock files left out)."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and path.name != shared_io.BUILD_LOCK_NAME and not ignore(relative):
            found[relative] = _normalised(path)
    return found


def leftovers(folder: str | os.PathLike) -> list[str]:
    """Staging folders, commit records and temporary files still present under `folder`."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in Path(folder).rglob("*")
        if p.name.startswith((shared_io.STAGING_PREFIX, shared_io.RECORD_PREFIX)) or p.name.endswith(".tmp")
    )


def random_delays(seed: int, count: int, longest: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, longest) for _ in range(count)]


class Tally:
    """Counts faults tried and survived per job, for docs/reliability.md (written when HF_KADAPTER_RELIABILITY_REPORT
    names a JSON file)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, job: str, how: str, survived: bool) -> None:
        entry = self.counts.setdefault(job, {})
        key = f"{how}_{'survived' if survived else 'failed'}"
        entry[key] = entry.get(key, 0) + 1

    def write(self) -> None:
        target = os.environ.get("HF_KADAPTER_RELIABILITY_REPORT")
        if not target:
            return
        path = Path(target)
        report = json.loads(path.read_text()) if path.is_file() else {}
        report.setdefault(self.kind, {}).update(self.counts)
        path.write_text(json.dumps(report, indent=2, sort_keys=True))


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield buffer

"""What every benchmark here shares: the machine/versions/command preamble, the `--device` / `--threads` / `--json`
options, interleaved min-of-N timing and peak-memory probes.

Why one module: every figure in docs/performance.md must say where it was measured (machine, threads, library
versions, the exact command) and land in a JSON file, and two benchmarks must never disagree on how a time or a peak
is taken. The benchmarks are scripts run as `python benchmarks/<name>.py` (so this folder is on sys.path) and import
it as `_common`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "faiss-cpu")
MiB = 2**20


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, json_default: str | None = None) -> None:
    """--device, --threads and --json, the same in every benchmark."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N]; without a usable GPU, cuda falls back to cpu with a message saying so",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument(
        "--json", default=json_default, help="write the figures (and this preamble) to this JSON file"
    )


def resolve_device(name: str) -> torch.device:
    """The device to run on. `cuda` without a usable GPU is not an error: the benchmark runs on the CPU and says so
    (absolute times then are CPU times; the ratios keep their meaning)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device torch knows: use cpu or cuda (cuda:0, ...).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__} built " + (
            f"with CUDA {torch.version.cuda}" if torch.version.cuda else "for CPU only"
        )
        print(
            f"--device {name}: no CUDA device is usable here ({build}, torch.cuda.is_available() is False); "
            "running on the CPU instead. Install a CUDA build of torch on a machine with a GPU for GPU figures."
        )
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return device


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, resolve --device (stored back on args.device as the device actually used)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device = str(device)
    return device


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Preamble
# ---------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> str:
    """The 1-minute load average next to the core count: other work on the machine inflates CPU times."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return "load average unknown"
    busy = " (BUSY: other processes compete for the cores)" if load > cores - 0.5 else ""
    return f"{load:.1f} on {cores} cores{busy}"


def environment(device: torch.device | str = "cpu", command: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, threads, library versions and the command line: what a reader needs to compare a figure."""
    device = torch.device(device)
    command = [sys.executable, *sys.argv] if command is None else list(command)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "command": " ".join(shlex.quote(part) for part in command),
        "machine": f"{platform.platform()}, {_cpu_model()}, {os.cpu_count()} CPUs ({usable} usable)",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    for package in PACKAGES:
        version = _version(package)
        if version is not None:
            info[package.replace("-", "_")] = version
    info["torch"] = torch.__version__  # the running build (e.g. 2.13.0+cpu), not only the distribution's number
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_environment(info: Mapping[str, Any]) -> None:
    for key, value in info.items():
        print(f"{key}: {value}")


def start(args: argparse.Namespace, name: str) -> tuple[torch.device, dict[str, Any]]:
    """setup() + the preamble printed; returns the device and the environment (the JSON file's header)."""
    device = setup(args)
    info = {"benchmark": name, **environment(device, getattr(args, "command", None)), "clock": Clock(device).name}
    print_environment(info)
    return device, info


def write_json(path: str | os.PathLike | None, info: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
    """The preamble and the figures in one JSON file (nothing written when `path` is None)."""
    if not path:
        return
    result = {**info, "load_average_at_end": load_average(), **figures}
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"figures written to {path}")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
class Clock:
    """The clock a benchmark times with: process CPU time on a CPU run with one intra-op thread (the work done by
    this process: time other processes take from the cores does not count, which wall time on a shared machine
    would), else wall time (threads of one op wait for each other, and a GPU's work is not CPU time)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu" and torch.get_num_threads() == 1
        self.name = "process CPU time (time.process_time)" if self.cpu else "wall time (time.perf_counter)"

    def __call__(self) -> float:
        sync(self.device)
        return time.process_time() if self.cpu else time.perf_counter()


def interleaved(
    functions: Mapping[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    clock: Clock | None = None,
) -> dict[str, list[float]]:
    """Seconds of each function (on `clock`, default Clock(device)), `rounds` times, run in turn (order reversed
    every other round).

    On a shared machine other load only ever adds time and hits every function of a round alike, so the minimum of
    each list is its least disturbed time and ratios of minima are measured side by side.
    """
    clock = clock or Clock(device)
    for function in functions.values():
        for _ in range(warmup):
            function()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            gc.collect()
            began = clock()
            functions[name]()
            times[name].append(clock() - began)
    return times


def best(times: Sequence[float]) -> float:
    return min(times)


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of the code run between `start()` and `peak()`, relative to when the probe was made.

    CUDA: torch.cuda.max_memory_allocated (tensors, not the caching allocator's reserve).
    CPU: the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs at `start()`); where that
    reset is impossible, ru_maxrss, which then also covers what ran before `start()` (`exact` is then False).
    A resident set counts file pages mapped into the process too (a memory-mapped feature cache that was read).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.exact = True
        self.origin = self.current()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def start(self) -> int:
        """Reset the peak; returns the memory held now (weights, inputs ...), relative to the origin."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False
        return self.current() - self.origin

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.origin
        hwm = _proc_status_kib("VmHWM") if self.exact else None
        if hwm is None:
            self.exact = False
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return maxrss * (1 if sys.platform == "darwin" else 1024) - self.origin
        return hwm * 1024 - self.origin


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a saved checkpoint's size on disk, as a user would download it)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

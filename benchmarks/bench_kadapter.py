"""Cost of a K-Adapter training step next to a plain base forward and a full fine-tuning step.

For each model size, on one fixed batch, four measurements run, each in a fresh spawned process (so that their
peak memory can be told apart): the base forward alone, the adapter forward alone on precomputed hidden states,
a K-Adapter pretraining step (frozen base, forward + backward + AdamW) and a full fine-tuning step (base
unfrozen). Times are medians over `--repeats` steps after `--warmup` steps; every ratio is measured in this run.

    PYTHONPATH=. python benchmarks/bench_kadapter.py --sizes small,paper
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, RobertaConfig

from hf_kadapter import KAdapterConfig, KAdapterForFactualPretraining, KAdapterModel, KnowledgeAdapterConfig
from hf_kadapter.kadapter import default_tap_layers

MiB = 2**20
SEED = 0
NUM_RELATIONS = 8  # relation classes of the factual head (their number barely changes the cost)
PAD_ID = 1  # RoBERTa's padding id (BERT ignores it: padding is given by the attention mask)
PAPER_ADAPTER_PARAMS = 47_251_200  # one released-setting adapter on RoBERTa-large (3 x 15,750,400)
MEASUREMENTS = {
    "base_forward": "base forward (no_grad, eval)",
    "adapter_forward": "adapter forward alone (no_grad)",
    "kadapter_step": "K-Adapter step (frozen base)",
    "full_step": "full fine-tuning step",
}
Batch = dict[str, list]


# ---------------------------------------------------------------------------------------------------------------
# Models and batch
# ---------------------------------------------------------------------------------------------------------------
def paper_base_config() -> RobertaConfig:
    """RoBERTa-large's shape (random weights are enough for timing)."""
    return RobertaConfig(
        vocab_size=50265,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD_ID,
    )


def build_config(size: str) -> KAdapterConfig:
    """The K-Adapter config of one benchmark size, with a single adapter named "factual"."""
    if size == "small":
        base = BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
        )
        adapter = KnowledgeAdapterConfig(
            tap_layers=default_tap_layers(4), hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=256
        )
        return KAdapterConfig(base_config=base, adapters={"factual": adapter}, num_labels=NUM_RELATIONS)
    if size == "paper":
        return KAdapterConfig.from_paper(paper_base_config(), adapters=("factual",), num_labels=NUM_RELATIONS)
    raise ValueError(f"unknown size {size!r}; use 'small' or 'paper'.")


def make_batch(batch_size: int, seq_len: int) -> Batch:
    """One relation-classification batch; ids stay below 1000 so both sizes read the very same batch."""
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(4, 1000, (batch_size, seq_len), generator=generator)
    lengths = [seq_len - (i * seq_len) // (4 * batch_size) for i in range(batch_size)]  # some rows padded
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = PAD_ID
    return {
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "subject_positions": [1] * batch_size,
        "object_positions": [length // 2 for length in lengths],
        "labels": torch.randint(0, NUM_RELATIONS, (batch_size,), generator=generator).tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory probes
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
    """Peak memory of the code run between `start()` and `peak()`, plus what was held when it started.

    CUDA: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve).
    CPU: the process's resident set (Linux VmHWM after resetting it through /proc/self/clear_refs); where that
    reset is impossible, ru_maxrss, which then also covers model construction.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True
        self.origin = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _proc_status_kib("VmRSS")
        return (rss or 0) * 1024

    def start(self) -> int:
        """Reset the peak; returns the memory held now (model weights and inputs), relative to the origin."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False
        return self._current() - self.origin

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.origin
        hwm = _proc_status_kib("VmHWM") if self.exact else None
        if hwm is None:
            self.exact = False
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return maxrss * (1 if sys.platform == "darwin" else 1024) - self.origin
        return hwm * 1024 - self.origin


# ---------------------------------------------------------------------------------------------------------------
# One measurement (runs in its own spawned process)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """What one spawned process measured: step times in seconds and memory in bytes."""

    times: list[float]
    held_bytes: int  # memory held before the steps: weights, inputs (and on CPU the interpreter's growth)
    peak_bytes: int  # peak during warmup + timed steps, same origin as held_bytes
    trainable: int
    exact_memory: bool


def _training_step(
    model: KAdapterForFactualPretraining, inputs: dict[str, torch.Tensor]
) -> tuple[Callable[[], None], int]:
    """A step over the parameters the model trains now (AdamW), and how many there are."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def measure(size: str, kind: str, batch: Batch, device_name: str, warmup: int, repeats: int) -> Measurement:
    """Build the size's model (same seed everywhere), then time `kind` on the batch."""
    device = torch.device(device_name)
    probe = MemoryProbe(device)
    torch.manual_seed(SEED)
    model = KAdapterForFactualPretraining(build_config(size)).to(device)
    inputs = {key: torch.tensor(value, device=device) for key, value in batch.items()}
    base_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    base = model.kadapter.pretrained_model
    trainable = 0

    if kind == "base_forward":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                base(**base_inputs)

    elif kind == "adapter_forward":
        model.eval()
        adapter = model.kadapter.adapters[model.pretraining_adapter]
        with torch.no_grad():
            hidden_states = base(**base_inputs, output_hidden_states=True).hidden_states
        dtype = hidden_states[-1].dtype
        mask = inputs["attention_mask"][:, None, None, :].to(dtype)
        bias = (1.0 - mask) * torch.finfo(dtype).min  # as KAdapterModel.forward builds it

        def step() -> None:
            with torch.no_grad():
                adapter(hidden_states, bias)

    elif kind == "kadapter_step":
        step, trainable = _training_step(model, inputs)
    elif kind == "full_step":
        model.unfreeze_base()
        step, trainable = _training_step(model, inputs)
    else:
        raise ValueError(f"unknown measurement {kind!r}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    held = probe.start()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return Measurement(times, held, probe.peak(), trainable, probe.exact)


def run_isolated(*args: Any) -> Measurement:
    """Run `measure` in a fresh spawned process, so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def count_paper_adapter_params() -> dict[str, int]:
    """Build the paper's two-adapter model on the meta device (no memory, no init) and count each adapter."""
    with torch.device("meta"):
        model = KAdapterModel(KAdapterConfig.from_paper(paper_base_config()))
    return {name: sum(p.numel() for p in adapter.parameters()) for name, adapter in model.adapters.items()}


COLUMNS = ("ms/step", "min ms", "x base fwd", "peak MiB", "x base fwd", "above model", "trainable")
WIDTHS = (9, 9, 11, 10, 11, 12, 12)


def _row(label: str, cells: tuple[str, ...]) -> str:
    """One table line; `cells` may be shorter than the columns."""
    return f"{label:<40}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS, strict=False))


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def report_size(size: str, results: dict[str, Measurement | str], batch_shape: tuple[int, int]) -> None:
    """Print one size's table: median time and peak memory, each also as a ratio to the base forward."""
    done = {k: r for k, r in results.items() if isinstance(r, Measurement)}
    median = {k: statistics.median(r.times) for k, r in done.items()}
    ref_time = median.get("base_forward")
    ref_peak = done["base_forward"].peak_bytes if "base_forward" in done else None
    print(f"\n== {size}: batch {batch_shape[0]} x {batch_shape[1]} tokens ==")
    print(_row("measurement", COLUMNS))
    print("-" * (40 + sum(WIDTHS)))
    for kind, label in MEASUREMENTS.items():
        result = results.get(kind)
        if isinstance(result, str):
            print(f"{label:<40}  FAILED: {result}")
        elif result is not None:
            cells = (
                f"{median[kind] * 1e3:.1f}",
                f"{min(result.times) * 1e3:.1f}",
                _ratio(median[kind], ref_time),
                f"{result.peak_bytes / MiB:.0f}",
                _ratio(result.peak_bytes, ref_peak),
                f"{(result.peak_bytes - result.held_bytes) / MiB:.0f}",
                f"{result.trainable:,}" if result.trainable else "-",
            )
            print(_row(label, cells))
        if kind == "kadapter_step" and {"base_forward", "adapter_forward"} <= median.keys():
            estimate = median["base_forward"] + 3 * median["adapter_forward"]
            cells = (f"{estimate * 1e3:.1f}", "", _ratio(estimate, ref_time))
            print(_row("  estimate: base fwd + 3 x adapter fwd", cells))
            if kind in median:
                print(_row("  measured K-Adapter step / estimate", (f"{median[kind] / estimate:.2f}",)))
    if {"kadapter_step", "full_step"} <= median.keys():
        print(
            f"full fine-tuning step / K-Adapter step: time {median['full_step'] / median['kadapter_step']:.2f}x, "
            f"peak memory {done['full_step'].peak_bytes / done['kadapter_step'].peak_bytes:.2f}x"
        )
    if any(not r.exact_memory for r in done.values()):
        print("note: peak RSS could not be reset here; CPU peaks include model construction (ru_maxrss).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,paper", help="comma-separated: small, paper")
    parser.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 8 on CUDA")
    parser.add_argument("--seq-len", type=int, default=None, help="default 64 on CPU, 128 on CUDA (at most 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (creates the AdamW state)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (8 if on_cuda else 2)
    args.seq_len = args.seq_len or (128 if on_cuda else 64)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [size for size in args.sizes if size not in ("small", "paper")]
    if unknown or not args.sizes:
        parser.error(f"--sizes takes small and/or paper, got {args.sizes}")
    if not 2 <= args.seq_len <= 512 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("need 2 <= --seq-len <= 512, --batch-size >= 1, --repeats >= 1, --warmup >= 0")
    return args


def _load() -> str:
    """The 1-minute load average next to the core count: other work on the machine inflates CPU timings."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return "load average unknown"
    busy = " -- BUSY: other processes compete for the cores, CPU times are inflated" if load > cores - 0.5 else ""
    return f"load average {load:.1f} on {cores} cores{busy}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    total = time.perf_counter()
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} intra-op threads (unchanged)")
    print(f"timing: median of {args.repeats} steps after {args.warmup} warmup steps, time.perf_counter")
    if torch.device(args.device).type == "cuda":
        print("peak memory: torch.cuda.max_memory_allocated during the steps (weights included), per fresh process")
    else:
        print(
            "peak memory: peak resident set (VmHWM, reset after the model is built) minus the process's resident set "
            "before building it, per fresh spawned process; so it covers weights + activations + grads + AdamW state "
            "(plus allocator slack). 'above model' subtracts what was resident once the model was built. Every row "
            "holds the same model (base + 1 adapter + heads), also for the base-forward rows."
        )
    counts = count_paper_adapter_params()
    for name, count in counts.items():
        verdict = "ok" if count == PAPER_ADAPTER_PARAMS else f"MISMATCH, expected {PAPER_ADAPTER_PARAMS:,}"
        print(f"paper adapter {name!r} (meta device): {count:,} parameters ({verdict})")

    batch = make_batch(args.batch_size, args.seq_len)
    print(f"before measuring: {_load()}")
    for size in args.sizes:
        results: dict[str, Measurement | str] = {}
        for kind in MEASUREMENTS:
            try:
                results[kind] = run_isolated(size, kind, batch, args.device, args.warmup, args.repeats)
            except Exception as error:  # a crashed or OOM-killed worker: report it, go on with the rest
                results[kind] = f"{type(error).__name__}: {error}"
        report_size(size, results, (args.batch_size, args.seq_len))
        print(f"after {size} (includes this benchmark's own threads): {_load()}")
    print(f"\ntotal wall time {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()

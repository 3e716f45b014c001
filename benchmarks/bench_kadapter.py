"""Cost of a K-Adapter training step next to a plain base forward, the estimate "base forward + 3 x adapter forward"
and a full fine-tuning step.

For each size, on one fixed batch, these run side by side in ONE process, interleaved (each round runs every one
once, the order reversed every other round; the best round of each counts, as other load only ever adds time):

* base_forward      the base alone (no_grad, eval);
* adapter_forward   the adapter alone on precomputed hidden states (no_grad, eval): the estimate's unit;
* kadapter_step     a K-Adapter pretraining step: frozen base forward + adapter and head forward/backward + fused AdamW;
* cached_step       the same step on precomputed hidden states (what the feature cache gives: no base forward);
* optimizer_step    fused AdamW over the adapter and head alone (part of the step, outside the estimate);
* no_dropout_step   the K-Adapter step with the adapter's and head's dropout off (eval mode): what dropout costs
                    (on CPUs attention dropout also forces SDPA's unfused path);
* full_step         full fine-tuning of the same model (base unfrozen);
* half_base_step    (with --half-base) the K-Adapter step with the base in bfloat16 (cast_base).

Peak memory is measured apart, in a fresh spawned process per step kind (a peak must be the step's own).

    python benchmarks/bench_kadapter.py --sizes small,paper --json bench_kadapter.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from _common import MemoryProbe, MiB, add_common_arguments, interleaved, start, write_json
from transformers import BertConfig, RobertaConfig

from hf_kadapter import KAdapterConfig, KAdapterForFactualPretraining, KAdapterModel, KnowledgeAdapterConfig
from hf_kadapter.kadapter import default_tap_layers

SEED = 0
NUM_RELATIONS = 8  # relation classes of the factual head (their number barely changes the cost)
PAD_ID = 1  # RoBERTa's padding id (BERT ignores it: padding is given by the attention mask)
PAPER_ADAPTER_PARAMS = 47_251_200  # one released-setting adapter on RoBERTa-large (3 x 15,750,400)
MEASUREMENTS = {
    "base_forward": "base forward (no_grad, eval)",
    "adapter_forward": "adapter forward alone (no_grad)",
    "kadapter_step": "K-Adapter step (frozen base)",
    "cached_step": "  the step on cached hidden states",
    "optimizer_step": "  of which fused AdamW",
    "no_dropout_step": "  the step without dropout",
    "full_step": "full fine-tuning step",
    "half_base_step": "K-Adapter step, bfloat16 base",
}
MEMORY_KINDS = ("base_forward", "kadapter_step", "full_step", "half_base_step")
Batch = dict[str, torch.Tensor]


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
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "subject_positions": torch.ones(batch_size, dtype=torch.long),
        "object_positions": torch.tensor([length // 2 for length in lengths]),
        "labels": torch.randint(0, NUM_RELATIONS, (batch_size,), generator=generator),
    }


def _training_step(
    model: KAdapterForFactualPretraining, inputs: Batch, dropout: bool = True
) -> tuple[Callable[[], None], Any, int]:
    """A step over the parameters the model trains now with fused AdamW (what Trainer uses by default), the
    optimizer, and how many parameters train. `dropout=False` runs it in eval mode (no dropout anywhere)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type in ("cpu", "cuda"))

    def step() -> None:
        model.train(dropout)
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer, sum(p.numel() for p in params)


def make_steps(size: str, batch: Batch, device: torch.device, kinds: list[str]) -> tuple[dict[str, Callable], dict]:
    """Every measurement of `kinds` as a callable, on models built with the same seed; and trainable counts."""
    inputs = {key: value.to(device) for key, value in batch.items()}
    base_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    steps: dict[str, Callable[[], None]] = {}
    trainable: dict[str, int] = {}

    def fresh() -> KAdapterForFactualPretraining:
        torch.manual_seed(SEED)
        return KAdapterForFactualPretraining(build_config(size)).to(device)

    model = fresh()
    base = model.kadapter.pretrained_model
    with torch.no_grad():
        base.eval()
        hidden_states = base(**base_inputs, output_hidden_states=True).hidden_states
    indices = model.cached_hidden_state_indices()
    cached = torch.stack([hidden_states[i] for i in indices], dim=1)  # (batch, S, seq, hidden): a cache's batch
    if "base_forward" in kinds:

        def base_forward() -> None:
            with torch.no_grad():
                base(**base_inputs)

        steps["base_forward"] = base_forward
    if "adapter_forward" in kinds:
        adapter = model.kadapter.adapters[model.pretraining_adapter]
        mask = inputs["attention_mask"][:, None, None, :].to(cached.dtype)
        bias = (1.0 - mask) * torch.finfo(cached.dtype).min  # as KAdapterModel builds it

        def adapter_forward() -> None:
            was = adapter.training
            adapter.eval()
            with torch.no_grad():
                adapter(hidden_states, bias)
            adapter.train(was)

        steps["adapter_forward"] = adapter_forward
    if {"kadapter_step", "cached_step", "optimizer_step", "no_dropout_step"} & set(kinds):
        steps["kadapter_step"], _, trainable["kadapter_step"] = _training_step(model, inputs)
        cached_inputs = {k: v for k, v in inputs.items() if k != "input_ids"} | {"cached_hidden_states": cached}
        steps["cached_step"], _, trainable["cached_step"] = _training_step(model, cached_inputs)
        steps["no_dropout_step"], _, trainable["no_dropout_step"] = _training_step(model, inputs, dropout=False)
        if "optimizer_step" in kinds:  # on copies of the trained parameters, whose gradients the steps never clear
            copies = [p.detach().clone().requires_grad_() for p in model.parameters() if p.requires_grad]
            for copy in copies:
                copy.grad = torch.full_like(copy, 1e-3)
            steps["optimizer_step"] = torch.optim.AdamW(copies, lr=1e-5, fused=device.type in ("cpu", "cuda")).step
    if "half_base_step" in kinds:
        half = fresh()
        half.cast_base(torch.bfloat16)
        steps["half_base_step"], _, trainable["half_base_step"] = _training_step(half, inputs)
    if "full_step" in kinds:
        full = fresh()
        full.unfreeze_base()
        steps["full_step"], _, trainable["full_step"] = _training_step(full, inputs)
    return {kind: steps[kind] for kind in kinds if kind in steps}, trainable


# ---------------------------------------------------------------------------------------------------------------
# Memory (one spawned process per step kind)
# ---------------------------------------------------------------------------------------------------------------
def peak_memory(size: str, kind: str, batch: Batch, device_name: str, threads: int) -> dict[str, Any]:
    """Peak memory of `kind` (two steps: the second runs with the optimizer state), in this fresh process."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    probe = MemoryProbe(device)
    step = make_steps(size, batch, device, [kind])[0][kind]
    held = probe.start()
    for _ in range(2):
        step()
    peak = probe.peak()
    return {"peak_mib": peak / MiB, "above_model_mib": (peak - held) / MiB, "exact": probe.exact}


def run_isolated(*args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(peak_memory, *args).result()


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def count_paper_adapter_params() -> dict[str, int]:
    """Build the paper's two-adapter model on the meta device (no memory, no init) and count each adapter."""
    with torch.device("meta"):
        model = KAdapterModel(KAdapterConfig.from_paper(paper_base_config()))
    return {name: sum(p.numel() for p in adapter.parameters()) for name, adapter in model.adapters.items()}


def measure_size(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    batch = make_batch(args.batch_size, args.seq_len)
    kinds = [k for k in MEASUREMENTS if k != "half_base_step" or args.half_base]
    steps, trainable = make_steps(size, batch, device, kinds)
    times = interleaved(steps, args.repeats, device, warmup=args.warmup)
    del steps
    best = {kind: min(values) for kind, values in times.items()}
    memory = {}
    for kind in MEMORY_KINDS:
        if kind in best and not args.skip_memory:
            try:
                memory[kind] = run_isolated(size, kind, batch, str(device), torch.get_num_threads())
            except Exception as error:  # an OOM-killed worker: report it, go on
                memory[kind] = {"error": f"{type(error).__name__}: {error}"}
    estimate = best["base_forward"] + 3 * best["adapter_forward"]
    figures = {
        "batch": [args.batch_size, args.seq_len],
        "best_ms": {k: v * 1e3 for k, v in best.items()},
        "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "estimate_ms": estimate * 1e3,
        "step_over_estimate": best["kadapter_step"] / estimate,
        "step_over_base_forward": best["kadapter_step"] / best["base_forward"],
        "cached_step_over_base_forward": best["cached_step"] / best["base_forward"],
        "step_minus_optimizer_over_estimate": (best["kadapter_step"] - best["optimizer_step"]) / estimate,
        "full_over_kadapter_time": best["full_step"] / best["kadapter_step"],
        "trainable": trainable,
        "memory": memory,
    }
    if all("peak_mib" in memory.get(k, {}) for k in ("kadapter_step", "full_step")):
        figures["full_over_kadapter_peak"] = memory["full_step"]["peak_mib"] / memory["kadapter_step"]["peak_mib"]
    report(size, figures)
    return figures


def report(size: str, figures: dict[str, Any]) -> None:
    best, memory = figures["best_ms"], figures["memory"]
    base = best["base_forward"]
    print(f"\n== {size}: batch {figures['batch'][0]} x {figures['batch'][1]} tokens ==")
    print(f"{'measurement':<40}{'best ms':>10}{'x base fwd':>12}{'peak MiB':>10}{'above model':>13}{'trainable':>13}")
    for kind, label in MEASUREMENTS.items():
        if kind not in best:
            continue
        peak = memory.get(kind, {})
        peak_cells = (
            f"{peak['peak_mib']:>10.0f}{peak['above_model_mib']:>13.0f}" if "peak_mib" in peak else f"{'':>23}"
        )
        count = figures["trainable"].get(kind)
        print(
            f"{label:<40}{best[kind]:>10.1f}{best[kind] / base:>11.2f}x{peak_cells}"
            f"{(f'{count:,}' if count else '-'):>13}"
        )
        if "error" in peak:
            print(f"  memory: FAILED {peak['error']}")
    print(f"estimate base fwd + 3 x adapter fwd: {figures['estimate_ms']:.1f} ms")
    print(
        f"K-Adapter step / estimate: {figures['step_over_estimate']:.2f} (without the optimizer step: "
        f"{figures['step_minus_optimizer_over_estimate']:.2f}); step / base forward: "
        f"{figures['step_over_base_forward']:.2f}x; cached step / base forward: "
        f"{figures['cached_step_over_base_forward']:.2f}x"
    )
    line = f"full fine-tuning step / K-Adapter step: time {figures['full_over_kadapter_time']:.2f}x"
    if "full_over_kadapter_peak" in figures:
        line += f", peak memory {figures['full_over_kadapter_peak']:.2f}x"
    print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,paper", help="comma-separated: small, paper")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64, help="at most 512")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the best counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (creates the AdamW state)")
    parser.add_argument("--half-base", action="store_true", help="also time the step with a bfloat16 base")
    parser.add_argument("--skip-memory", action="store_true", help="time only (no peak-memory processes)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.command = None if argv is None else [sys.executable, __file__, *argv]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [size for size in args.sizes if size not in ("small", "paper")]
    if unknown or not args.sizes:
        parser.error(f"--sizes takes small and/or paper, got {args.sizes}")
    if not 2 <= args.seq_len <= 512 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("need 2 <= --seq-len <= 512, --batch-size >= 1, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, info = start(args, "kadapter_step")
    print(f"timing: best of {args.repeats} interleaved rounds after {args.warmup} warmup runs, {info['clock']}")
    print(
        "peak memory: per step kind in a fresh spawned process, "
        + (
            "torch.cuda.max_memory_allocated (weights included)"
            if device.type == "cuda"
            else "peak resident set (VmHWM) minus the resident set before building the model; 'above model' "
            "subtracts what was resident once the model was built"
        )
    )
    counts = count_paper_adapter_params()
    for name, count in counts.items():
        verdict = "ok" if count == PAPER_ADAPTER_PARAMS else f"MISMATCH, expected {PAPER_ADAPTER_PARAMS:,}"
        print(f"paper adapter {name!r} (meta device): {count:,} parameters ({verdict})")
    figures = {"paper_adapter_parameters": counts, "sizes": {}}
    for size in args.sizes:
        figures["sizes"][size] = measure_size(size, args, device)
    write_json(args.json, info, figures)
    return figures


if __name__ == "__main__":
    main()

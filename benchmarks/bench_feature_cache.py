"""One epoch of factual adapter pretraining with and without the feature cache, on the same data.

The base is random (weights do not change the cost) and frozen; the adapter and head train with the standard
`transformers.Trainer` (fused AdamW, default dropout). Each cache (one per storage dtype, `--dtypes`) is built once,
timed apart, with its size on disk. Epochs are timed `--repeats` times per mode (plain, then one per cache dtype),
the modes in turn and their order reversed every other round; the best of each counts (other work on a shared
machine only ever adds time). The weights trained with and without the cache are compared: with a float32 cache they
must be identical (the cache only replaces the frozen base's forward, eval mode, no dropout, by a read); a half
precision cache's difference is reported. Every number printed is measured in this run.

The default base has the shape of all-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads), so a run fits within a few
minutes on 2 CPU cores (BERT-base, below, takes several times longer). The adapter keeps the released K-Adapter's
depth (3 taps x 2 transformer layers) and is sized so that its parameters are about the same share of the base's
encoder layers as the released adapter's of RoBERTa-large (47M / 302M = 0.16); the script prints the ratio used.
The speed-up grows with the base's share of the work. BERT-base with the same proportions:

    python benchmarks/bench_feature_cache.py --json feature_cache_minilm.json
    python benchmarks/bench_feature_cache.py --hidden 768 --layers 12 --adapter-hidden 384 --adapter-heads 6
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import Clock, MiB, add_common_arguments, start, write_json
from datasets import Dataset
from transformers import BertConfig, Trainer, TrainerCallback, TrainingArguments

from hf_kadapter import KAdapterConfig, KAdapterForFactualPretraining, KnowledgeAdapterConfig
from hf_kadapter.kadapter import default_tap_layers
from hf_kadapter.kadapter.feature_cache import CachedFeatureCollator, build_feature_cache

SEED = 0
PAD_ID = 0
VOCAB = 1000
NUM_RELATIONS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=384, help="base hidden size (BERT-base: 768)")
    parser.add_argument("--layers", type=int, default=6, help="base layers (BERT-base: 12)")
    parser.add_argument("--heads", type=int, default=12, help="base attention heads")
    parser.add_argument("--adapter-hidden", type=int, default=128)
    parser.add_argument("--adapter-heads", type=int, default=2)
    parser.add_argument("--adapter-layers", type=int, default=2, help="transformer layers per adapter layer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--dtypes", default="float32,float16", help="cache storage dtypes, comma-separated (float32, float16, bfloat16)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per mode (the best counts)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.command = None if argv is None else [sys.executable, __file__, *argv]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in ("float32", "float16", "bfloat16") for d in args.dtypes):
        parser.error(f"--dtypes takes float32, float16 and/or bfloat16, got {args.dtypes}")
    return args


def make_model(args: argparse.Namespace) -> KAdapterForFactualPretraining:
    torch.manual_seed(SEED)
    base = BertConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.seq_len),
        pad_token_id=PAD_ID,
    )
    adapter = KnowledgeAdapterConfig(
        tap_layers=default_tap_layers(args.layers),
        hidden_size=args.adapter_hidden,
        num_layers=args.adapter_layers,
        num_attention_heads=args.adapter_heads,
        intermediate_size=4 * args.adapter_hidden,
    )
    config = KAdapterConfig(base_config=base, adapters={"factual": adapter}, num_labels=NUM_RELATIONS)
    return KAdapterForFactualPretraining(config).eval()


def make_dataset(args: argparse.Namespace) -> Dataset:
    """Full-length rows (seq_len tokens each), marker positions and relation labels."""
    generator = torch.Generator().manual_seed(SEED)
    n, length = args.examples, args.seq_len
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(4, VOCAB, (n, length), generator=generator).tolist(),
            "attention_mask": [[1] * length] * n,
            "subject_positions": torch.randint(1, length // 2, (n,), generator=generator).tolist(),
            "object_positions": torch.randint(length // 2, length, (n,), generator=generator).tolist(),
            "labels": torch.randint(0, NUM_RELATIONS, (n,), generator=generator).tolist(),
        }
    )


def pad_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads input_ids / attention_mask, stacks the rest (stand-in for the package's collator)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in features[0]:
        values = [torch.as_tensor(f[key]) for f in features]
        if key in ("input_ids", "attention_mask"):
            fill = PAD_ID if key == "input_ids" else 0
            values = [torch.nn.functional.pad(v, (0, width - len(v)), value=fill) for v in values]
        batch[key] = torch.stack(values)
    return batch


class EpochTimer(TrainerCallback):
    """Time from the epoch's start to its end (data loading and steps, not Trainer's one-off setup), on the
    benchmarks' clock (benchmarks/_common.py: process CPU time with one thread on a CPU, else wall time)."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = self.clock()

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = self.clock() - self.start


def train_one_epoch(
    model: KAdapterForFactualPretraining,
    dataset: Dataset,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    args: argparse.Namespace,
    out: Path,
) -> float:
    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        use_cpu=torch.device(args.device).type == "cpu",
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    timer = EpochTimer(Clock(args.device))
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    return timer.seconds


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, info = start(args, "feature_cache")
    dataset = make_dataset(args)
    model = make_model(args).to(device)
    core = model.kadapter
    encoder = getattr(core.pretrained_model, "encoder", core.pretrained_model)
    steps = -(-args.examples // args.batch_size)
    print(
        f"data: {args.examples} examples x {args.seq_len} tokens, batch {args.batch_size} ({steps} steps/epoch)\n"
        f"base: random BERT hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {4 * args.hidden} "
        f"({count(core.pretrained_model) / 1e6:.1f}M params, frozen)\n"
        f"adapter: taps {default_tap_layers(args.layers)}, {args.adapter_layers} layers x hidden {args.adapter_hidden} "
        f"per tap ({count(core.adapters) / 1e6:.2f}M params, {count(core.adapters) / count(encoder):.2f} x the "
        f"base's encoder layers); the cache holds hidden states {model.cached_hidden_state_indices()} of "
        f"{args.layers + 1} (the taps and the last layer)"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    caches, builds, disks = {}, {}, {}
    try:
        for dtype in args.dtypes:
            began = time.perf_counter()
            caches[dtype] = build_feature_cache(model, dataset, work / "cache", batch_size=args.batch_size, dtype=dtype)
            builds[dtype] = time.perf_counter() - began
            disks[dtype] = caches[dtype].disk_bytes()
            print(f"cache build, {dtype} (one-off): {builds[dtype]:.1f} s, {disks[dtype] / MiB:.1f} MiB on disk")
        modes = ["plain", *args.dtypes]
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for repeat in range(args.repeats):  # in turn, so a burst of load elsewhere hits every mode alike
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                model = make_model(args).to(device)  # same initial weights and data order: only the base forward differs
                if mode == "plain":
                    seconds = train_one_epoch(model, dataset, pad_collate, args, work / mode)
                else:
                    collator = CachedFeatureCollator(pad_collate, caches[mode], model=model)
                    seconds = train_one_epoch(model, caches[mode].attach(dataset), collator, args, work / mode)
                times[mode].append(seconds)
                weights[mode] = trainable(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {mode: min(values) for mode, values in times.items()}
    figures: dict[str, Any] = {"steps_per_epoch": steps, "epoch_s": best, "epoch_s_all": times, "caches": {}}
    print(f"epoch without cache: {best['plain']:.2f} s (best of {', '.join(f'{t:.2f}' for t in times['plain'])})")
    float32_disk = disks.get("float32")
    for dtype in args.dtypes:
        drift = max((weights["plain"][k] - weights[dtype][k]).abs().max().item() for k in weights["plain"])
        disk = disks[dtype]
        entry = {
            "build_s": builds[dtype],
            "disk_mib": disk / MiB,
            "disk_over_float32": None if float32_disk is None else disk / float32_disk,
            "epoch_over_plain": best[dtype] / best["plain"],
            "speed_up": best["plain"] / best[dtype],
            "max_trained_weight_difference": drift,
            "identical_trained_weights": all(torch.equal(weights["plain"][k], weights[dtype][k]) for k in weights[dtype]),
        }
        saved = best["plain"] - best[dtype]
        entry["payback_epochs"] = builds[dtype] / saved if saved > 0 else None
        figures["caches"][dtype] = entry
        print(
            f"epoch with the {dtype} cache: {best[dtype]:.2f} s (best of {', '.join(f'{t:.2f}' for t in times[dtype])})"
            f" = {entry['epoch_over_plain']:.2f} of an epoch without ({entry['speed_up']:.2f}x faster); "
            f"disk {entry['disk_mib']:.1f} MiB"
            + ("" if entry["disk_over_float32"] is None else f" ({entry['disk_over_float32']:.2f} of float32)")
            + f"; trained weights {'IDENTICAL to' if entry['identical_trained_weights'] else 'differ from'} the "
            f"uncached run's (max |difference| {drift:.2e})"
        )
    write_json(args.json, info, figures)
    return figures


if __name__ == "__main__":
    main()

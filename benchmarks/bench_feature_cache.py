"""One epoch of factual adapter pretraining with and without the feature cache, on the same data.

The base is random (weights do not change the cost) and frozen; the adapter and head train with the standard
`transformers.Trainer` (AdamW, default dropout). The one-off cache build is timed separately, with the cache's size
on disk. Each epoch is timed `--repeats` times per mode, alternating, and the best counts (other work on a shared
machine only ever adds time). The weights trained with and without the cache are compared: they must agree, as the
cache only replaces the frozen base's forward (eval mode, no dropout) by a read. Every number printed is measured
in this run.

The default base has the shape of all-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads), so a run fits well within
3 minutes on 2 quiet CPU cores (BERT-base, below, takes several). The adapter keeps the released K-Adapter's depth
(3 taps x 2 transformer layers) and is sized so that its parameters are about the same share of the base's
encoder layers as the released adapter's of RoBERTa-large (47M / 302M = 0.16); the script prints the ratio used.
The speed-up grows with the base's share of the work. BERT-base with the same proportions:

    PYTHONPATH=. python benchmarks/bench_feature_cache.py
    PYTHONPATH=. python benchmarks/bench_feature_cache.py --hidden 768 --layers 12 --adapter-hidden 384 --adapter-heads 6
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import BertConfig, Trainer, TrainerCallback, TrainingArguments

from hf_kadapter import KAdapterConfig, KAdapterForFactualPretraining, KnowledgeAdapterConfig
from hf_kadapter.kadapter import default_tap_layers
from hf_kadapter.kadapter.feature_cache import CachedFeatureCollator, build_feature_cache

SEED = 0
PAD_ID = 0
VOCAB = 1000
NUM_RELATIONS = 8


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="cache dtype")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per mode (the best counts)")
    return parser.parse_args()


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
    """Wall time from the epoch's start to its end: data loading and steps, not Trainer's one-off setup."""

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.start


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
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=False,
        logging_strategy="no",
    )
    timer = EpochTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[timer])
    trainer.train()
    return timer.seconds


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dataset = make_dataset(args)
    model = make_model(args)
    core = model.kadapter
    encoder = getattr(core.pretrained_model, "encoder", core.pretrained_model)
    print(
        f"torch {torch.__version__} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n"
        f"data: {args.examples} examples x {args.seq_len} tokens, batch {args.batch_size} "
        f"({-(-args.examples // args.batch_size)} steps/epoch)\n"
        f"base: random BERT hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {4 * args.hidden} "
        f"({count(core.pretrained_model) / 1e6:.1f}M params, frozen)\n"
        f"adapter: taps {default_tap_layers(args.layers)}, {args.adapter_layers} layers x hidden {args.adapter_hidden} "
        f"per tap ({count(core.adapters) / 1e6:.2f}M params, {count(core.adapters) / count(encoder):.2f} x the "
        f"base's encoder layers); cache dtype {args.dtype}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    try:
        start = time.perf_counter()
        cache = build_feature_cache(model, dataset, work / "cache", batch_size=args.batch_size, dtype=args.dtype)
        build_s = time.perf_counter() - start
        print(f"cache build (one-off): {build_s:.1f} s, {cache.disk_bytes() / 2**20:.1f} MiB on disk, {cache}")

        attached = cache.attach(dataset)
        times: dict[str, list[float]] = {"plain": [], "cached": []}
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for repeat in range(args.repeats):  # alternating, so a burst of load elsewhere hits both the same way
            for mode in ("plain", "cached") if repeat % 2 == 0 else ("cached", "plain"):
                model = make_model(args)  # same initial weights and data order: only the base forward differs
                if mode == "plain":
                    seconds = train_one_epoch(model, dataset, pad_collate, args, work / mode)
                else:
                    collator = CachedFeatureCollator(pad_collate, cache, model=model)
                    seconds = train_one_epoch(model, attached, collator, args, work / mode)
                times[mode].append(seconds)
                weights[mode] = trainable(model)
        drift = max((weights["plain"][k] - weights["cached"][k]).abs().max().item() for k in weights["plain"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    steps = -(-args.examples // args.batch_size)
    plain_s, cached_s = min(times["plain"]), min(times["cached"])
    for label, mode, best in (("without cache:", "plain", plain_s), ("with cache:", "cached", cached_s)):
        runs = ", ".join(f"{t:.1f}" for t in times[mode])
        print(f"epoch {label:<14} {best:.1f} s ({best / steps * 1000:.0f} ms/step; best of {runs} s)")
    saved = plain_s - cached_s
    payback = f"the build pays for itself after {build_s / saved:.2f} epochs" if saved > 0 else "no time saved"
    print(f"epoch speed-up: {plain_s / cached_s:.2f}x ({payback})")
    print(f"max |trained weight difference| between an epoch with and one without the cache: {drift:.2e}")


if __name__ == "__main__":
    main()

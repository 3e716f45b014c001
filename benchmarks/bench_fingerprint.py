"""What the model fingerprint (hf_kadapter.utils.fingerprint) costs next to loading the model, at real model sizes.

For each shape (BERT-base, RoBERTa-large; random weights saved to a temporary folder, safetensors) it measures,
on a warm page cache, the best of `--repeats` runs of:

* load: `AutoModel.from_pretrained(folder)` (transformers 5 memory-maps the weights: this reads almost nothing);
* load + forward: load, then one forward of 16 tokens (every weight is read once: what first use pays anyway);
* stored fingerprint: `base_fingerprint(model)`, all three views of a float32 model (computed once, when a base
  is wrapped with adapters or a table is built);
* check: the one-view comparison done at every load (`tensors_match_fingerprint`), float32 and float16 bases;
* native fingerprint: the one-view identity used for feature-cache keys and resumed index builds.

It prints the seconds and the ratios to the load times, and writes them as JSON (`--json`). Fingerprints hash
weights in host memory: `--device cuda` is accepted for uniformity, the hashing itself runs on the CPU.

    PYTHONPATH=. python benchmarks/bench_fingerprint.py --json bench_fingerprint.json
    PYTHONPATH=. python benchmarks/bench_fingerprint.py --shapes bert-base --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from _common import add_common_arguments, start, write_json
from transformers import AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel
from transformers.utils import logging as hf_logging

from hf_kadapter.utils.fingerprint import base_fingerprint, base_tensors, native_fingerprint, tensors_match_fingerprint

SHAPES = {
    "bert-base": (BertModel, BertConfig()),
    "roberta-large": (
        RobertaModel,
        RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, max_position_embeddings=514, pad_token_id=1),
    ),  # fmt: skip
}


def best(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (other work on a shared machine only ever adds time), and a result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


@torch.no_grad()
def first_forward(model: torch.nn.Module) -> torch.Tensor:
    """One forward of 16 tokens: reads every weight once (the memory-mapped pages come in)."""
    return model(input_ids=torch.arange(2, 18)[None]).last_hidden_state


def measure(name: str, repeats: int) -> dict[str, float | int | str]:
    model_class, config = SHAPES[name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model_class(config, add_pooling_layer=False).save_pretrained(folder)
        del model_class
        AutoModel.from_pretrained(folder)  # warm the page cache
        load_s, model = best(lambda: AutoModel.from_pretrained(folder), repeats)
        read_s, _ = best(lambda: first_forward(AutoModel.from_pretrained(folder)), repeats)
        stored_s, stored = best(lambda: base_fingerprint(model), repeats)
        check_s, same = best(lambda: tensors_match_fingerprint(base_tensors(model), stored), repeats)
        native_s, _ = best(lambda: native_fingerprint(base_tensors(model)), repeats)
        half = AutoModel.from_pretrained(folder, dtype=torch.float16)
        check_half_s, same_half = best(lambda: tensors_match_fingerprint(base_tensors(half), stored), repeats)
    assert same and same_half, "the fingerprint must match the same weights in float32 and float16"
    weights = sum(p.numel() for p in model.parameters())
    return {
        "shape": name,
        "parameters": weights,
        "float32_bytes": 4 * weights,
        "load_s": round(load_s, 4),
        "load_and_forward_s": round(read_s, 4),
        "stored_fingerprint_s": round(stored_s, 4),
        "check_float32_s": round(check_s, 4),
        "check_float16_s": round(check_half_s, 4),
        "native_fingerprint_s": round(native_s, 4),
        "stored_over_load": round(stored_s / load_s, 2),
        "check_over_load": round(check_s / load_s, 2),
        "stored_over_load_and_forward": round(stored_s / read_s, 2),
        "check_over_load_and_forward": round(check_s / read_s, 2),
        "hash_gb_per_s": round(4 * weights / check_s / 1e9, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    add_common_arguments(parser, json_default="bench_fingerprint.json")
    parser.add_argument("--output", dest="json", help="the same as --json (its earlier name)")
    args = parser.parse_args(argv)
    args.command = None if argv is None else [sys.executable, __file__, *argv]
    _, info = start(args, "fingerprint")
    info["clock"] = f"wall time (time.perf_counter), best of {args.repeats} (loading includes reading the files)"
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results = {"shapes": [measure(name, args.repeats) for name in args.shapes]}
    for row in results["shapes"]:
        print(
            f"{row['shape']:>13}: {row['parameters'] / 1e6:.0f}M parameters | load {row['load_s']:.3f}s, load+forward "
            f"{row['load_and_forward_s']:.3f}s | stored fingerprint {row['stored_fingerprint_s']:.3f}s "
            f"({row['stored_over_load']}x load, {row['stored_over_load_and_forward']}x load+forward) | check "
            f"{row['check_float32_s']:.3f}s fp32 / {row['check_float16_s']:.3f}s fp16 ({row['check_over_load']}x "
            f"load, {row['check_over_load_and_forward']}x load+forward) | native {row['native_fingerprint_s']:.3f}s"
        )
    write_json(args.json, info, results)
    return results


if __name__ == "__main__":
    main()

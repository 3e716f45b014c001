"""PELT table building vs plain forwards of the same masked LM over the same masked inputs.

`build_entity_table` does sampling, masking, tokenization, batching, the forward and the per-entity sums; the
baselines only run forwards over pre-tokenized, pre-padded batches of exactly the inputs the build feeds the model
(same order, same batch size, same padding). Two baselines are timed in the same run: the full masked-LM forward
(`model(**batch)`, logits over the vocabulary at every position, what one would run naively) and the encoder forward
alone (`model.base_model(**batch)`, the compute the build cannot avoid). The ratio build/encoder is the overhead of
everything PELT adds.

    python benchmarks/bench_pelt.py                       # MiniLM-sized random BERT MLM (fits 2 CPU cores, < 3 min)
    python benchmarks/bench_pelt.py --hidden 768 --layers 12 --heads 12 --intermediate 3072   # BERT-base sized

Random weights and a synthetic corpus: throughput does not depend on what the weights know.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
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
    """The padded batches build_entity_table runs, built beforehand (same inputs, same order, same padding)."""
    dataset = load_entity_corpus(corpus)
    plan = _plan(dataset, max_occurrences, seed, set(), False)
    encoder = _MaskedEncoder(tokenizer, max_length)
    ids, _, _ = encoder.encode(_texts(dataset, plan.records), plan.starts, plan.ends)
    device = next(model.parameters()).device
    batches = []
    for first in range(0, len(ids), CHUNK_SIZE):  # the build sorts by length within chunks of CHUNK_SIZE
        chunk = ids[first : first + CHUNK_SIZE]
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i]))
        for start in range(0, len(order), batch_size):
            batches.append(encoder.pad([chunk[i] for i in order[start : start + batch_size]], device))
    return batches, len(plan), len(plan.entity_ids), sum(len(x) for x in ids)


def time_forwards(function, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            function(**batch)
    return time.perf_counter() - start


def main() -> None:
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
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
    model = BertForMaskedLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    corpus = make_corpus(args.occurrences, args.entities, args.seed, words=len(tokenizer) - 205)
    batches, occurrences, entities, tokens = baseline_batches(
        model, tokenizer, corpus, args.max_occurrences, args.seed, args.batch_size, args.max_length
    )
    print(
        f"model: random BertForMaskedLM, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {len(tokenizer)} ({params / 1e6:.1f}M parameters); "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    )
    print(
        f"corpus: {len(corpus)} records, {occurrences} sampled occurrences of {entities} entities "
        f"(max_occurrences {args.max_occurrences}), {tokens} tokens ({tokens / occurrences:.1f} per occurrence), "
        f"batch size {args.batch_size}, {len(batches)} batches"
    )

    with torch.inference_mode():  # warm-up (allocator, kernels), not timed
        model(**batches[-1])

    def build() -> float:
        start = time.perf_counter()
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
        seconds = time.perf_counter() - start
        assert int(table.counts.sum()) == occurrences and not bool(torch.isnan(table.sums).any())
        return seconds

    # Rounds interleave the three measurements, and each keeps its best round: on a shared machine other load
    # only ever slows a pass down, so the minimum is the least disturbed measurement of each.
    timings: dict[str, list[float]] = {"build": [], "mlm": [], "encoder": []}
    for _ in range(args.rounds):
        timings["build"].append(build())
        timings["encoder"].append(time_forwards(model.base_model, batches))
        timings["mlm"].append(time_forwards(model, batches))
    rates = {name: occurrences / min(seconds) for name, seconds in timings.items()}

    def rounds(name: str) -> str:
        return ", ".join(f"{s:.1f}" for s in timings[name])

    print(f"rounds: {args.rounds} (interleaved; best round kept; seconds per round listed)")
    print(f"build_entity_table    : {rates['build']:8.1f} occurrences/s  [{rounds('build')} s]")
    print(f"plain MLM forwards    : {rates['mlm']:8.1f} occurrences/s  [{rounds('mlm')} s]")
    print(f"plain encoder forwards: {rates['encoder']:8.1f} occurrences/s  [{rounds('encoder')} s]")
    print(f"ratio build / MLM forwards    : {rates['build'] / rates['mlm']:.3f}")
    print(f"ratio build / encoder forwards: {rates['build'] / rates['encoder']:.3f}")


if __name__ == "__main__":
    main()

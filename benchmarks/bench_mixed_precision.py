"""What a half-precision frozen model costs in accuracy, and gains in time, for each use of a frozen model here.

Real weights and real text (the package's WordNet suite), float32 against bfloat16 and float16, side by side:

* adapter training: a factual K-Adapter on all-MiniLM-L6-v2, the base kept in half precision (`cast_base`), the
  adapter and head float32. Figures: the difference of the head's logits (eval mode) and of the base's tapped
  hidden states against float32, the final loss of a short training run (same data, order and seed), and the
  time of a training step.
* table building: a PELT entity table built with SPLADE-tiny (a BertForMaskedLM) in float32 and with a half copy
  of it. Figures: cosine between each entity's float32 and half-precision vector, build time.
* index building: RetrieverEmbedder on all-MiniLM-L6-v2 embedding documents under autocast
  (`build_index(..., dtype=...)`). Figures: cosine of each document's embeddings, agreement of the top-10
  documents retrieved for the suite's questions, embedding time.

Times are the best of interleaved rounds (other load only ever adds time).

    python benchmarks/bench_mixed_precision.py --json mixed_precision.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import time
from typing import Any

import torch
from _common import add_common_arguments, interleaved, start, write_json

SEED = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTIONS = ("adapter", "table", "index")


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_kadapter").setLevel(logging.WARNING)


def relative_max(difference: torch.Tensor, reference: torch.Tensor) -> float:
    """max |difference| / max |reference|: the error at the scale of the values."""
    return (difference.abs().max() / reference.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# Adapter training
# ---------------------------------------------------------------------------------------------------------------
def relation_batches(tokenizer, count: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Suite sentences with two linked mentions: markers at the mentions' first tokens, the relation label a hash
    of the pair (learnable by memorising; what matters here is the same data in every precision)."""
    from hf_kadapter.bench.wordnet import read_table

    rows = [r for r in read_table("mentions") if len(r["mentions"]) >= 2][:count]
    encoded = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=max_length, return_offsets_mapping=True
    )
    examples = []
    for row, ids, offsets in zip(rows, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        first, second = row["mentions"][0], row["mentions"][1]
        starts = [i for i, (a, b) in enumerate(offsets) if b > a]

        def token_at(char: int, starts=starts, offsets=offsets) -> int | None:
            return next((i for i in starts if offsets[i][0] <= char < offsets[i][1]), None)

        subject, obj = token_at(first["char_start"]), token_at(second["char_start"])
        if subject is None or obj is None:
            continue
        label = sum(map(ord, first["entity_id"] + second["entity_id"])) % 8
        examples.append((ids, subject, obj, label))
    batches = []
    for start_index in range(0, len(examples) - batch_size + 1, batch_size):
        part = examples[start_index : start_index + batch_size]
        width = max(len(ids) for ids, *_ in part)
        input_ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for row, (ids, *_) in enumerate(part):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "subject_positions": torch.tensor([s for _, s, _, _ in part]),
                "object_positions": torch.tensor([o for _, _, o, _ in part]),
                "labels": torch.tensor([label for *_, label in part]),
            }
        )
    return batches


def adapter_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import AutoTokenizer

    import hf_kadapter as hk
    from hf_kadapter.bench.models import default_encoder
    from hf_kadapter.kadapter import default_tap_layers

    path = default_encoder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in relation_batches(tokenizer, args.examples, args.batch_size, args.max_length)
    ]
    held_out, train = batches[0], batches[1 : 1 + args.steps]

    def build(dtype: torch.dtype):
        torch.manual_seed(SEED)
        adapter = hk.KnowledgeAdapterConfig(
            tap_layers=default_tap_layers(6), hidden_size=128, num_attention_heads=2, intermediate_size=512
        )
        model = hk.KAdapterForFactualPretraining.from_base(path, adapters={"factual": adapter}, num_labels=8)
        model.to(device)
        if dtype != torch.float32:
            model.cast_base(dtype)
        return model

    models = {name: build(dtype) for name, dtype in DTYPES.items()}
    figures: dict[str, Any] = {"base": path, "train_batches": len(train), "batch_size": args.batch_size}
    with torch.no_grad():
        outputs = {}
        for name, model in models.items():
            model.eval()
            logits = model(**held_out).logits
            core = model.kadapter
            kept = core.pretrained_model(
                input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"], output_hidden_states=True
            ).hidden_states
            taps = [kept[i].float() for i in core.cached_hidden_state_indices()]
            outputs[name] = (logits, taps)
    reference_logits, reference_taps = outputs["float32"]
    mask = held_out["attention_mask"].bool()
    for name in ("bfloat16", "float16"):
        logits, taps = outputs[name]
        figures[name] = {
            "logits_max_abs_difference": (logits - reference_logits).abs().max().item(),
            "logits_relative_max_difference": relative_max(logits - reference_logits, reference_logits),
            "hidden_states_relative_max_difference": max(
                relative_max((t - r)[mask], r[mask]) for t, r in zip(taps, reference_taps, strict=True)
            ),
        }
    figures["logits_max_abs"] = reference_logits.abs().max().item()

    # A short training run per precision: same initial weights, data, order and dropout draws.
    for name, model in models.items():
        torch.manual_seed(SEED)
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=device.type in ("cpu", "cuda")
        )
        losses = []
        for batch in train:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            held = model(**held_out).loss.item()
        figures.setdefault(name, {}).update({"losses": losses, "final_loss": losses[-1], "held_out_loss": held})
    for name in ("bfloat16", "float16"):
        entry, reference = figures[name], figures["float32"]
        entry["final_loss_relative_difference"] = abs(entry["final_loss"] - reference["final_loss"]) / reference[
            "final_loss"
        ]
        entry["held_out_loss_relative_difference"] = abs(entry["held_out_loss"] - reference["held_out_loss"]) / (
            reference["held_out_loss"]
        )

    # Step time, interleaved (the models keep training: only the cost is measured here).
    def stepper(model):
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=device.type in ("cpu", "cuda")
        )
        batch = train[0]

        def step() -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        return step

    times = interleaved({name: stepper(model) for name, model in models.items()}, args.rounds, device)
    for name in DTYPES:
        figures[name]["step_ms"] = min(times[name]) * 1e3
        figures[name]["step_over_float32"] = min(times[name]) / min(times["float32"])
        figures[name]["base_weight_mib"] = sum(
            p.numel() * p.element_size() for p in models[name].kadapter.pretrained_model.parameters()
        ) / 2**20
    print(f"\n== adapter training: {path} base, factual adapter, {len(train)} steps of batch {args.batch_size} ==")
    print(f"{'base dtype':<10}{'logits rel.':>12}{'states rel.':>12}{'final loss':>12}{'rel. diff':>10}"
          f"{'held-out':>10}{'step ms':>9}{'x fp32':>8}{'base MiB':>10}")  # fmt: skip
    for name in DTYPES:
        entry = figures[name]
        print(
            f"{name:<10}{entry.get('logits_relative_max_difference', 0):>12.2e}"
            f"{entry.get('hidden_states_relative_max_difference', 0):>12.2e}{entry['final_loss']:>12.4f}"
            f"{entry.get('final_loss_relative_difference', 0):>10.2e}{entry['held_out_loss']:>10.4f}"
            f"{entry['step_ms']:>9.1f}{entry['step_over_float32']:>8.2f}{entry['base_weight_mib']:>10.1f}"
        )
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Table building
# ---------------------------------------------------------------------------------------------------------------
def table_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hf_kadapter.bench.models import default_mlm
    from hf_kadapter.bench.wordnet import read_table
    from hf_kadapter.pelt.build import build_entity_table

    path = default_mlm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = read_table("mentions")
    random.Random(SEED).shuffle(rows)
    corpus = [{"text": r["text"], "mentions": r["mentions"]} for r in rows[: args.table_records]]
    full = AutoModelForMaskedLM.from_pretrained(path).to(device).eval()
    models = {name: full if dtype == torch.float32 else copy.deepcopy(full).to(dtype) for name, dtype in DTYPES.items()}
    tables = {}

    def builder(name):
        def build() -> None:
            tables[name] = build_entity_table(
                models[name], tokenizer, corpus, batch_size=64, max_length=args.max_length, progress=False
            )

        return build

    times = interleaved({name: builder(name) for name in DTYPES}, args.rounds, device, warmup=0)
    reference = tables["float32"]
    figures: dict[str, Any] = {
        "model": path,
        "records": len(corpus),
        "entities": len(reference.entity_ids),
        "occurrences": int(reference.counts.sum()),
    }
    print(f"\n== table building: {path}, {len(corpus)} records, {figures['entities']} entities ==")
    print(f"{'model dtype':<12}{'min cosine':>12}{'mean cosine':>13}{'build s':>9}{'x fp32':>8}")
    for name in DTYPES:
        table = tables[name]
        assert table.entity_ids == reference.entity_ids
        cosine = torch.nn.functional.cosine_similarity(table.sums.float(), reference.sums.float(), dim=-1)
        figures[name] = {
            "min_cosine": cosine.min().item(),
            "mean_cosine": cosine.mean().item(),
            "build_s": min(times[name]),
            "build_over_float32": min(times[name]) / min(times["float32"]),
        }
        entry = figures[name]
        print(
            f"{name:<12}{entry['min_cosine']:>12.5f}{entry['mean_cosine']:>13.5f}{entry['build_s']:>9.2f}"
            f"{entry['build_over_float32']:>8.2f}"
        )
    return figures


# ---------------------------------------------------------------------------------------------------------------
# Index building
# ---------------------------------------------------------------------------------------------------------------
def index_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_kadapter.bench.models import default_encoder
    from hf_kadapter.bench.wordnet import read_table
    from hf_kadapter.retrieval.index import DocumentIndex
    from hf_kadapter.retrieval.modeling_retriever import RetrieverEmbedder
    from hf_kadapter.retrieval.retriever import RealmStyleRetriever

    path = default_encoder()
    torch.manual_seed(SEED)
    embedder = RetrieverEmbedder.from_encoder(path, pooling="mean").to(device).eval()
    retriever = RealmStyleRetriever(embedder, AutoTokenizer.from_pretrained(path))
    every = read_table("documents")
    picked = read_table("questions")[: args.questions]
    gold = {q["gold_document"] for q in picked}  # every question's document is in the corpus, the rest fills it
    documents = [d for d in every if d["id"] in gold] + [d for d in every if d["id"] not in gold]
    documents = documents[: max(args.documents, len(gold))]
    corpus = Dataset.from_list([{"id": d["id"], "title": d["title"], "text": d["text"]} for d in documents])
    questions = [q["question"] for q in picked]
    embeddings = {}

    def embedder_run(name):
        def run() -> None:
            dtype = None if name == "float32" else DTYPES[name]
            embeddings[name] = retriever.embed_corpus(corpus, batch_size=64, max_length=128, progress=False, dtype=dtype)

        return run

    times = interleaved({name: embedder_run(name) for name in DTYPES}, args.rounds, device, warmup=0)
    with torch.no_grad():
        inputs = retriever.tokenizer(questions, padding=True, truncation=True, max_length=64, return_tensors="pt")
        queries = embedder.embed_queries(**{k: v.to(device) for k, v in inputs.items()}).float().cpu()
    ids = list(corpus["id"])
    found = {name: DocumentIndex(ids, e).search(queries, 10)[1] for name, e in embeddings.items()}
    figures: dict[str, Any] = {"embedder": path, "documents": len(ids), "questions": len(questions)}
    print(f"\n== index building: {path} embedder, {len(ids)} documents, {len(questions)} questions ==")
    print(f"{'autocast':<10}{'min cosine':>12}{'mean cosine':>13}{'top-10 overlap':>16}{'top-1 same':>12}"
          f"{'embed s':>9}{'x fp32':>8}")  # fmt: skip
    for name in DTYPES:
        cosine = torch.nn.functional.cosine_similarity(embeddings[name], embeddings["float32"], dim=-1)
        overlap = sum(
            len(set(a) & set(b)) for a, b in zip(found[name].tolist(), found["float32"].tolist(), strict=True)
        ) / found["float32"].numel()
        top1 = (found[name][:, 0] == found["float32"][:, 0]).float().mean().item()
        figures[name] = {
            "min_cosine": cosine.min().item(),
            "mean_cosine": cosine.mean().item(),
            "top10_overlap": overlap,
            "top1_agreement": top1,
            "embed_s": min(times[name]),
            "embed_over_float32": min(times[name]) / min(times["float32"]),
        }
        entry = figures[name]
        print(
            f"{name:<10}{entry['min_cosine']:>12.5f}{entry['mean_cosine']:>13.5f}{overlap:>16.3f}{top1:>12.3f}"
            f"{entry['embed_s']:>9.2f}{entry['embed_over_float32']:>8.2f}"
        )
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--examples", type=int, default=700, help="suite sentences for adapter training")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the short run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--table-records", type=int, default=2000)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best counts)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.command = None if argv is None else [sys.executable, __file__, *argv]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or any(s not in SECTIONS for s in sections):
        parser.error(f"--sections takes {SECTIONS}, got {sections}")
    device, info = start(args, "mixed_precision")
    _quiet()
    began = time.perf_counter()
    figures: dict[str, Any] = {}
    for section in sections:
        figures[section] = {"adapter": adapter_section, "table": table_section, "index": index_section}[section](
            args, device
        )
    print(f"\ntotal wall time {time.perf_counter() - began:.0f} s")
    write_json(args.json, info, figures)
    return figures


if __name__ == "__main__":
    main()

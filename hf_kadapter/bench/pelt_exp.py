"""PELT on the WordNet suite: does an entity's slot vector, computed by the masked LM from other texts, help type it?

Protocol:

1. An entity table is built by the masked LM (`build_entity_table`) over the suite's linked corpus (`mentions`),
   with every held-out entity's own definition left out (its vector comes only from what OTHER texts say about it).
   The held-out entities enter as a NEW DOMAIN: the table is first built for the training-side entities, the
   held-out entities' vectors are built separately and added with `add_entities`. Each seed samples its own
   occurrences (`max_occurrences`), so the knowledge source varies with the seed too.
2. Downstream: typing an entity from its NAME, on held-out entities: the masked LM stays frozen (its vectors live in
   its own input space) and a linear multi-label probe reads its [CLS] and mean-pooled last hidden states. Conditions: the name alone; the name + a plain mask in the slot (" ( [MASK] )", no vector); the name +
   a slot holding a vector from a SHUFFLED table (another entity's vector); the name + its PELT slot.
3. Gains, paired by seed: PELT − shuffled table and PELT − mask slot; the control shuffled − name-only must sit at
   zero.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import ExperimentResult, GainSpec, LinearProbe, UnitStore, encode_frozen, seed_everything, train_small
from .wordnet import COARSE_TYPES, read_table, suite_manifest

CONDITIONS = {
    "name_only": "the entity's name alone",
    "mask_slot": "name + ' ( [MASK] )' with the plain mask embedding (the slot's form, no knowledge)",
    "shuffled_table": "name + slot holding another entity's vector (a shuffled table)",
    "pelt_slot": "name + slot holding the entity's PELT vector",
}
# Typing held-out entities from the name: the metrics' notes (the composed experiment reports the same metrics).
NAME_TYPING_NOTES = {
    "coarse_accuracy": f"coarse type ({', '.join(COARSE_TYPES)}) of held-out entities from the name",
    "type_micro_f1": "micro F1 over coarse + fine types (multi-label, logit > 0)",
}


@dataclass
class PELTSettings:
    mlm: str
    seeds: list[int]
    eval_split: str = "test"
    max_occurrences: int = 16
    leave_out_own: str = "all"  # whose own definition is left out of the corpus: "all", "eval" or "none"
    train_limit: int | None = None
    eval_limit: int | None = None
    epochs: float = 20.0
    learning_rate: float = 3e-3
    batch_size: int = 128
    max_length: int = 24
    table_max_length: int = 64
    norm: float = 7.0


def _entity_inputs(name: str, entity_id: str, condition: str, tokenizer: Any, pelt: Any, max_length: int):
    if condition == "name_only":
        return {**tokenizer(name, truncation=True, max_length=max_length), "entity_positions": [], "entity_ids": []}
    if condition == "mask_slot":
        text = f"{name} ( {tokenizer.mask_token} )"
        return {**tokenizer(text, truncation=True, max_length=max_length), "entity_positions": [], "entity_ids": []}
    encoding = pelt(name, entities=[{"char_start": 0, "char_end": len(name), "entity_id": entity_id}],
                    truncation=True, max_length=max_length)  # fmt: skip
    return dict(encoding)


def _collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad ids; entity slots as [batch, max_entities] padded with -1 (what PELTModel takes)."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        slots = max(1, max(len(r["entity_positions"]) for r in rows))
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
        for key in ("entity_positions", "entity_ids"):
            batch[key] = torch.tensor([list(r[key]) + [-1] * (slots - len(r[key])) for r in rows])
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
        return batch

    return collate


def _shuffled(table: Any, seed: int) -> Any:
    """The same vectors assigned to other entities (a derangement-free permutation is not needed: self-hits are rare
    and keep the control honest about chance)."""
    from ..pelt import EntityLookupTable  # noqa: PLC0415

    order = list(range(len(table)))
    random.Random(2000 + seed).shuffle(order)
    return EntityLookupTable(
        table.entity_ids, table.sums[order], table.counts[order], names=table.names, aliases=table.aliases,
        norm=table.norm, metadata=dict(table.metadata),
    )  # fmt: skip


def new_domain_table(
    mlm: Any, tokenizer: Any, records: list[dict[str, Any]], names: dict[str, str], held_out: set[str],
    settings: PELTSettings, folder: Path, seed: int,
) -> Any:  # fmt: skip
    """The entity table of one seed: built for the known entities, then the held-out entities' vectors built on their
    own and added with `add_entities` (a new domain plugged into an existing table). Both builds are resumable."""
    from ..pelt import build_entity_table  # noqa: PLC0415

    common = dict(entity_names=names, max_occurrences=settings.max_occurrences, seed=seed,
                  max_length=settings.table_max_length, norm=settings.norm, progress=False, batch_size=128)
    known = build_entity_table(mlm, tokenizer, records, skip_entities=sorted(held_out),
                               output_dir=folder / f"seed{seed}" / "known", **common)
    new = build_entity_table(mlm, tokenizer, records, skip_entities=known,
                             output_dir=folder / f"seed{seed}" / "new", **common)  # fmt: skip
    table = known.copy()
    table.add_entities(new)
    return table


def run_pelt(
    settings: PELTSettings, suite_dir: Path, workdir: Path, progress: Callable[[str], None] = print
) -> ExperimentResult:
    from transformers import AutoModelForMaskedLM, AutoTokenizer  # noqa: PLC0415

    from ..pelt import PELTModel, PELTTokenizer  # noqa: PLC0415

    result = ExperimentResult(
        method="pelt",
        description="Typing held-out entities from their name, with and without their PELT slot",
        conditions=dict(CONDITIONS),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    units = UnitStore(workdir / "units", {k: v for k, v in vars(settings).items() if k != "seeds"})
    result.units = units
    with result.phase("data"):
        tokenizer = AutoTokenizer.from_pretrained(settings.mlm)
        mlm = AutoModelForMaskedLM.from_pretrained(settings.mlm).eval()
        entities = {e["id"]: e for e in read_table("entities", suite_dir)}
        corpus = read_table("mentions", suite_dir)
        eval_ids = {e for e, row in entities.items() if row["split"] == settings.eval_split}
        train_ids = {e for e, row in entities.items() if row["split"] == "train"}
        leave_out = {"eval": eval_ids, "all": eval_ids | train_ids, "none": set()}[settings.leave_out_own]
        records = [r for r in corpus if r["own"] not in leave_out]
        mentioned = {m["entity_id"] for r in records for m in r["mentions"]}
        train = sorted(train_ids & mentioned)
        evaluation = sorted(eval_ids & mentioned)
        train = _limit(train, settings.train_limit)
        evaluation = _limit(evaluation, settings.eval_limit)
        fine = suite_manifest(suite_dir)["fine_labels"]
        label_names = list(COARSE_TYPES) + [f for f in fine if f not in COARSE_TYPES]
        type2id = {label: i for i, label in enumerate(label_names)}

        def targets(ids: list[str]) -> list[list[float]]:
            rows = []
            for entity_id in ids:
                row = [0.0] * len(type2id)
                for label in [entities[entity_id]["coarse_type"], *entities[entity_id]["fine_types"]]:
                    row[type2id[label]] = 1.0
                rows.append(row)
            return rows

        train_targets, eval_targets = targets(train), targets(evaluation)
        names = {e: entities[e]["name"] for e in entities}
    result.data.update(
        mlm=settings.mlm, train_entities=len(train), eval_entities=len(evaluation), corpus_records=len(records),
        left_out_own_definitions=settings.leave_out_own, max_occurrences=settings.max_occurrences,
        eval_split=settings.eval_split,
    )  # fmt: skip
    progress(f"  data: {len(train)} train / {len(evaluation)} {settings.eval_split} entities, {len(records)} texts")
    collate = _collate(tokenizer)
    coarse_ids = np.array([type2id[t] for t in COARSE_TYPES])
    gold = np.array(eval_targets) > 0.5
    gold_coarse = np.array([type2id[entities[e]["coarse_type"]] for e in evaluation])

    for seed in settings.seeds:
        # ----- the knowledge source: a table per seed; held-out entities added as a new domain -----------------
        with result.phase("entity tables"):
            table = new_domain_table(mlm, tokenizer, records, names, eval_ids, settings, workdir / "tables", seed)
        covered = sum(1 for e in evaluation if e in table)
        progress(f"  table seed {seed}: {len(table)} entities, {int(table.counts.sum())} occurrences, "
                 f"{covered}/{len(evaluation)} held-out entities with a vector")  # fmt: skip
        shuffled = _shuffled(table, seed)

        for condition in CONDITIONS:

            def downstream(
                condition: str = condition, seed: int = seed, table: Any = table, shuffled: Any = shuffled
            ) -> dict[str, Any]:
                plugged_table = shuffled if condition == "shuffled_table" else table
                pelt = PELTTokenizer(tokenizer, plugged_table)
                plugged = PELTModel(mlm, plugged_table)  # checks the table was built by this very model
                features = {}
                for split, ids in (("train", train), ("eval", evaluation)):
                    rows = [_entity_inputs(names[e], e, condition, tokenizer, pelt, settings.max_length) for e in ids]
                    features[split] = encode_frozen(plugged, rows, collate)
                seed_everything(seed)
                probe = LinearProbe(features["train"].shape[-1], len(type2id))
                curve = train_small(probe, probe.rows(features["train"], torch.tensor(train_targets)), None,
                                    output_dir=workdir / "trainer", seed=seed, epochs=settings.epochs,
                                    learning_rate=settings.learning_rate, batch_size=settings.batch_size,
                                    warmup_ratio=0.06)  # fmt: skip
                logits = probe.predict(features["eval"])
                return {"curve": curve, "logits": logits.numpy().round(4).tolist()}

            with result.phase("downstream typing"):
                outcome = units.get_or_run(f"typing/{condition}/seed{seed}", downstream)
            logits = np.array(outcome["logits"])
            correct = result.add_typing_scores(condition, seed, logits, gold, coarse_ids, gold_coarse)
            result.curves.setdefault("typing_loss", {}).setdefault(condition, {})[str(seed)] = outcome["curve"]
            progress(f"  typing {condition}, seed {seed}: coarse accuracy {correct.mean():.3f}")

    result.metric_notes = dict(NAME_TYPING_NOTES)
    for metric in ("coarse_accuracy", "type_micro_f1"):
        result.gains += [
            GainSpec(f"PELT − shuffled table ({metric})", "pelt_slot", "shuffled_table", metric),
            GainSpec(f"PELT − mask slot ({metric})", "pelt_slot", "mask_slot", metric),
        ]
    result.gains += [
        GainSpec("shuffled table − name only (control)", "shuffled_table", "name_only", "coarse_accuracy",
                 kind="control"),
        GainSpec("mask slot − name only (slot form)", "mask_slot", "name_only", "coarse_accuracy", kind="info"),
    ]  # fmt: skip
    return result


def _limit(ids: list[str], limit: int | None) -> list[str]:
    if limit is None or len(ids) <= limit:
        return ids
    return sorted(random.Random(0).sample(ids, limit))


__all__ = ["CONDITIONS", "PELTSettings", "run_pelt"]

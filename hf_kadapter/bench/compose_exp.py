"""K-Adapter and PELT composed in one model: PELT slots in the input of a K-Adapter typing model.

Both methods work on the masked LM here (an entity table lives in its builder's input space): a factual adapter is
pretrained on the masked LM's encoder (as in the K-Adapter experiment), the typing model is
`PELTModel(KAdapterForEntityTyping(...), table)` and reads "@ Luzon ( [slot] ) @". Typing held-out entities from the
name, base and adapter frozen (probe regime). Conditions: the K-Adapter model alone; with a slot holding another
entity's vector (shuffled table); with the entity's PELT slot. The gain measures whether PELT's knowledge still gets
through when the model also carries a knowledge adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core import ExperimentResult, GainSpec, UnitStore, predict_batches, seed_everything, train_small
from .kadapter_exp import _subsample, _write_jsonl, fact_label
from .pelt_exp import NAME_TYPING_NOTES, _limit, _shuffled, new_domain_table
from .wordnet import COARSE_TYPES, read_table, suite_manifest

CONDITIONS = {
    "kadapter": "K-Adapter typing model (masked LM's encoder + pretrained factual adapter, frozen), name only",
    "kadapter_shuffled_table": "the same + a slot holding another entity's vector (shuffled table)",
    "kadapter_pelt": "the same + the entity's PELT slot",
}


@dataclass
class ComposeSettings:
    mlm: str
    seeds: list[int]
    eval_split: str = "test"
    fact_limit: int | None = None
    fact_label: str = "relation+type"
    adapter_hidden: int = 64
    adapter_layers: int = 1
    adapter_heads: int = 2
    max_length: int = 48
    pretrain_epochs: float = 2.0
    pretrain_lr: float = 5e-4
    pretrain_batch: int = 32
    train_limit: int | None = None
    eval_limit: int | None = None
    max_occurrences: int = 16
    table_max_length: int = 64
    norm: float = 7.0
    head_epochs: float = 8.0
    head_lr: float = 1e-3
    head_batch: int = 64


def run_compose(
    settings: ComposeSettings, suite_dir: Path, workdir: Path, progress: Callable[[str], None] = print
) -> ExperimentResult:
    from transformers import AutoModelForMaskedLM, AutoTokenizer  # noqa: PLC0415

    from .. import (  # noqa: PLC0415
        KAdapterForEntityTyping,
        KAdapterForFactualPretraining,
        KnowledgeAdapterConfig,
        PELTDataCollator,
        PELTModel,
        PELTTokenizer,
        default_tap_layers,
    )
    from ..kadapter.data import KAdapterDataCollator, build_label_vocab, load_factual, preprocess_factual  # noqa

    result = ExperimentResult(
        method="composed",
        description="PELT slots inside a K-Adapter typing model (both on the masked LM): typing held-out entities "
        "from the name",
        conditions=dict(CONDITIONS),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    units = UnitStore(workdir / "units", {k: v for k, v in vars(settings).items() if k != "seeds"})
    result.units = units
    with result.phase("data"):
        tokenizer = AutoTokenizer.from_pretrained(settings.mlm)
        mlm = AutoModelForMaskedLM.from_pretrained(settings.mlm).eval()
        entities = {e["id"]: e for e in read_table("entities", suite_dir)}
        records = [r for r in read_table("mentions", suite_dir) if r["own"] is None]  # no entity's own definition
        mentioned = {m["entity_id"] for r in records for m in r["mentions"]}
        eval_ids = {e for e, row in entities.items() if row["split"] == settings.eval_split}
        train = _limit(sorted(e for e in mentioned if entities[e]["split"] == "train"), settings.train_limit)
        evaluation = _limit(sorted(eval_ids & mentioned), settings.eval_limit)
        fine = suite_manifest(suite_dir)["fine_labels"]
        type2id = {label: i for i, label in enumerate(list(COARSE_TYPES) + [f for f in fine if f not in COARSE_TYPES])}
        names = {e: row["name"] for e, row in entities.items()}
        facts = _subsample([f for f in read_table("facts", suite_dir) if f["split"] == "train"], settings.fact_limit)
        for row in facts:
            row["relation"] = fact_label(row, settings.fact_label)
        loaded = load_factual(_write_jsonl(workdir / "facts_train.jsonl", facts))
        relation2id = build_label_vocab(loaded, field="relation")
        fact_features = preprocess_factual(loaded, tokenizer, relation2id, max_length=settings.max_length,
                                           on_error="skip")  # fmt: skip
    result.data.update(mlm=settings.mlm, train_entities=len(train), eval_entities=len(evaluation),
                       facts=len(fact_features), eval_split=settings.eval_split)  # fmt: skip
    progress(f"  data: {len(train)} train / {len(evaluation)} {settings.eval_split} entities, {len(fact_features)} facts")
    spec = KnowledgeAdapterConfig(
        tap_layers=default_tap_layers(mlm.config.num_hidden_layers), num_layers=settings.adapter_layers,
        hidden_size=settings.adapter_hidden, num_attention_heads=settings.adapter_heads,
        intermediate_size=4 * settings.adapter_hidden,
    )  # fmt: skip

    def targets(entity_id: str) -> list[float]:
        row = [0.0] * len(type2id)
        for label in [entities[entity_id]["coarse_type"], *entities[entity_id]["fine_types"]]:
            row[type2id[label]] = 1.0
        return row

    def inputs(entity_id: str, pelt: Any | None) -> dict[str, Any]:
        """'@ name @' (the K-Adapter entity marker around the mention), with the PELT slot after the name."""
        text = f"@ {names[entity_id]} @"
        span = {"char_start": 2, "char_end": 2 + len(names[entity_id]), "entity_id": entity_id}
        if pelt is None:
            encoding = tokenizer(text, truncation=True, max_length=settings.max_length)
            row = {**encoding, "entity_positions": [], "entity_ids": []}
        else:
            encoding = pelt(text, entities=[span], truncation=True, max_length=settings.max_length)
            row = dict(encoding)
        return {**row, "head_entity_positions": encoding.char_to_token(0), "labels": targets(entity_id)}

    gold = np.array([targets(e) for e in evaluation]) > 0.5
    gold_coarse = np.array([type2id[entities[e]["coarse_type"]] for e in evaluation])
    coarse_ids = np.array([type2id[t] for t in COARSE_TYPES])
    for seed in settings.seeds:
        folder = workdir / "adapters" / f"seed{seed}"

        def pretrain(seed: int = seed, folder: Path = folder) -> dict[str, Any]:
            seed_everything(seed)
            model = KAdapterForFactualPretraining.from_base(
                mlm, adapters={"factual": spec}, num_labels=len(relation2id),
                id2label={i: n for n, i in relation2id.items()}, label2id=dict(relation2id),
            )  # fmt: skip
            curve = train_small(model, fact_features, KAdapterDataCollator(tokenizer, label_kind="scalar"),
                                output_dir=workdir / "trainer", seed=seed, epochs=settings.pretrain_epochs,
                                learning_rate=settings.pretrain_lr, batch_size=settings.pretrain_batch,
                                warmup_ratio=0.06)  # fmt: skip
            model.save_pretrained(folder)
            return {"curve": curve}

        with result.phase("adapter pretraining (masked LM's encoder)"):
            units.get_or_run(f"pretrain/seed{seed}", pretrain)
        with result.phase("entity tables"):
            table = new_domain_table(mlm, tokenizer, records, names, eval_ids, settings, workdir / "tables", seed)
        shuffled = _shuffled(table, seed)

        for condition in CONDITIONS:

            def downstream(condition: str = condition, seed: int = seed, folder: Path = folder,
                           table: Any = table, shuffled: Any = shuffled) -> dict[str, Any]:  # fmt: skip
                plugged_table = shuffled if condition == "kadapter_shuffled_table" else table
                pelt = None if condition == "kadapter" else PELTTokenizer(tokenizer, plugged_table)
                rows = {split: [inputs(e, pelt) for e in ids] for split, ids in (("train", train),
                                                                                 ("eval", evaluation))}  # fmt: skip
                seed_everything(seed)
                typing = KAdapterForEntityTyping.from_base(
                    mlm, adapters={}, num_labels=len(type2id), problem_type="multi_label_classification"
                )
                typing.load_adapter(folder, name="factual")
                typing.freeze_base()
                typing.freeze_adapter()
                model = PELTModel(typing, plugged_table)  # checks the table belongs to this encoder
                collate = PELTDataCollator(tokenizer)
                curve = train_small(model, rows["train"], collate, output_dir=workdir / "trainer", seed=seed,
                                    epochs=settings.head_epochs, learning_rate=settings.head_lr,
                                    batch_size=settings.head_batch, warmup_ratio=0.06)  # fmt: skip
                logits = predict_batches(model, rows["eval"], collate, 256, lambda out: out.logits)
                return {"curve": curve, "logits": logits.round(4).tolist()}

            with result.phase("downstream typing"):
                outcome = units.get_or_run(f"typing/{condition}/seed{seed}", downstream)
            logits = np.array(outcome["logits"])
            correct = result.add_typing_scores(condition, seed, logits, gold, coarse_ids, gold_coarse)
            result.curves.setdefault("typing_loss", {}).setdefault(condition, {})[str(seed)] = outcome["curve"]
            progress(f"  composed {condition}, seed {seed}: coarse accuracy {correct.mean():.3f}")

    result.metric_notes = dict(NAME_TYPING_NOTES)
    for metric in ("coarse_accuracy", "type_micro_f1"):
        result.gains += [
            GainSpec(f"K-Adapter + PELT − K-Adapter ({metric})", "kadapter_pelt", "kadapter", metric),
            GainSpec(f"K-Adapter + PELT − shuffled table ({metric})", "kadapter_pelt", "kadapter_shuffled_table",
                     metric),
        ]  # fmt: skip
    result.gains.append(
        GainSpec("shuffled table − K-Adapter alone (control)", "kadapter_shuffled_table", "kadapter",
                 "coarse_accuracy", kind="control")
    )  # fmt: skip
    return result


__all__ = ["CONDITIONS", "ComposeSettings", "run_compose"]

"""K-Adapter on the WordNet suite: does a factual adapter pretrained on relation facts help type unseen entities?

Protocol (all on the same frozen encoder, the same typing data and the same fine-tuning budget):

1. Pretrain a factual adapter (`KAdapterForFactualPretraining`, base frozen, the feature cache skipping the base
   on every epoch) on the suite's relation facts; a CONTROL adapter of the same size is pretrained on the same
   sentences with the labels shuffled (same optimisation, no facts). Each seed pretrains its own pair.
2. Downstream: entity typing (`KAdapterForEntityTyping`) on entities never seen by the typing training split, in
   context (another definition that mentions the entity) and from the name alone ("@ Luzon @": nothing to read but
   what the model knows of the entity). Conditions: the base alone + head; the base + a fresh (untrained) adapter;
   the base + the pretrained adapter; the base + the shuffled-label adapter. Base and adapters stay frozen and the
   fusion + head train (the "probe" regime): what differs between conditions is only what the adapter knows.
   Optionally (`paper_regime_seeds`) also the paper's regime: the base fine-tuned with the adapters frozen.
3. Gains are paired by seed against the strongest no-knowledge controls: pretrained − fresh and pretrained −
   shuffled; the control shuffled − fresh must sit at zero. Test results are also split by whether the entity
   appears in the pretraining facts (knowledge can only help where it was given).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .core import ExperimentResult, GainSpec, UnitStore, predict_batches, seed_everything, train_small
from .wordnet import COARSE_TYPES, read_table, suite_manifest

CONDITIONS = {
    "head_only": "frozen base + typing head (no adapter)",
    "fresh_adapter": "frozen base + an untrained adapter of the same size (frozen)",
    "pretrained_adapter": "frozen base + the factual adapter pretrained on the facts (frozen)",
    "shuffled_adapter": "frozen base + an adapter pretrained on the same facts with shuffled labels (frozen)",
}
PAPER_CONDITIONS = ("fresh_adapter", "pretrained_adapter", "shuffled_adapter")
FACT_LABELS = ("relation", "relation+type")


@dataclass
class KAdapterSettings:
    encoder: str
    seeds: list[int]
    fact_limit: int | None = None
    typing_train_limit: int | None = None
    typing_test_limit: int | None = None
    eval_split: str = "test"
    fact_label: str = "relation+type"
    taps: list[int] | None = None
    adapter_hidden: int = 256
    adapter_layers: int = 2
    adapter_heads: int = 4
    max_length: int = 64
    pretrain_epochs: float = 3.0
    pretrain_lr: float = 2e-4
    pretrain_batch: int = 32
    head_epochs: float = 5.0
    head_lr: float = 1e-3
    head_batch: int = 32
    feature_cache_dtype: str = "float32"
    paper_regime_seeds: int = 0  # also fine-tune the base (adapters frozen) as the paper does, on this many seeds
    paper_train_limit: int | None = 2000  # typing examples the (costly) paper regime fine-tunes on
    paper_epochs: float = 5.0
    paper_lr: float = 5e-5
    paper_batch: int = 16


def _subsample(rows: list[dict[str, Any]], limit: int | None, seed: int = 0) -> list[dict[str, Any]]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def fact_label(fact: dict[str, Any], scheme: str) -> str:
    """The pretraining label: the relation alone (as T-REx), or the relation with its target's type.

    "relation+type" makes the task carry entity knowledge: the target (object) appears in the sentence by its name
    only, so predicting that India is a location and the Karakoram an object needs knowledge of those entities,
    while the relation alone can mostly be read off the sentence."""
    if scheme == "relation":
        return fact["relation"]
    if scheme == "relation+type":
        return f"{fact['relation']}:{fact['obj_type']}"
    raise ValueError(f"fact_label={scheme!r} is not one of {FACT_LABELS}.")


class _Data:
    """Tokenized facts and typing splits, written through the package's own loaders and preprocessing."""

    def __init__(self, settings: KAdapterSettings, suite_dir: Path, workdir: Path, tokenizer: Any):
        from ..kadapter.data import (  # noqa: PLC0415
            build_label_vocab,
            load_entity_typing,
            load_factual,
            preprocess_entity_typing,
            preprocess_factual,
        )

        facts = read_table("facts", suite_dir)
        fact_train = _subsample([f for f in facts if f["split"] == "train"], settings.fact_limit)
        fact_dev = [f for f in facts if f["split"] == "dev"]
        for rows in (fact_train, fact_dev):
            for row in rows:
                row["relation"] = fact_label(row, settings.fact_label)
                row["id"] = f"{row['docid']}:{row['obj_start']}"
        typing = read_table("typing", suite_dir)
        typing_train = _subsample([r for r in typing if r["split"] == "train"], settings.typing_train_limit)
        typing_eval = _subsample([r for r in typing if r["split"] == settings.eval_split], settings.typing_test_limit)
        # Typing from the name alone ("@ Luzon @"): one row per entity of the typing sets, no context to read.
        names_train, names_eval = (_name_rows(rows) for rows in (typing_train, typing_eval))
        fine = suite_manifest(suite_dir)["fine_labels"]
        self.label_names = list(COARSE_TYPES) + [f for f in fine if f not in COARSE_TYPES]

        loaded = {
            "fact_train": load_factual(_write_jsonl(workdir / "facts_train.jsonl", fact_train)),
            "fact_dev": load_factual(_write_jsonl(workdir / "facts_dev.jsonl", fact_dev)),
            "typing_train": load_entity_typing(_write_jsonl(workdir / "typing_train.jsonl", typing_train)),
            "typing_eval": load_entity_typing(_write_jsonl(workdir / "typing_eval.jsonl", typing_eval)),
            "name_train": load_entity_typing(_write_jsonl(workdir / "name_train.jsonl", names_train)),
            "name_eval": load_entity_typing(_write_jsonl(workdir / "name_eval.jsonl", names_eval)),
        }
        self.relation2id = build_label_vocab(loaded["fact_train"], loaded["fact_dev"], field="relation")
        self.type2id = {label: i for i, label in enumerate(self.label_names)}
        vocab = build_label_vocab(loaded["typing_train"], loaded["typing_eval"], field="labels")
        unknown = set(vocab) - set(self.type2id)
        if unknown:
            raise ValueError(f"typing labels {sorted(unknown)} are not in the suite's label list: rebuild the suite.")
        self.facts = {
            name: preprocess_factual(loaded[name], tokenizer, self.relation2id, max_length=settings.max_length,
                                     on_error="skip")
            for name in ("fact_train", "fact_dev")
        }  # fmt: skip
        self.typing = {
            name: preprocess_entity_typing(loaded[name], tokenizer, self.type2id, max_length=settings.max_length,
                                           on_error="skip")
            for name in ("typing_train", "typing_eval", "name_train", "name_eval")
        }  # fmt: skip
        fact_entities = {f["subj_label"] for f in fact_train} | {f["obj_label"] for f in fact_train}
        self.eval_entities, self.eval_in_facts, self.gold_coarse = {}, {}, {}
        for task, rows in (("context", typing_eval), ("name", names_eval)):
            by_id = {r["id"]: r for r in rows}
            kept = [by_id[i] for i in self.typing[f"{'typing' if task == 'context' else 'name'}_eval"]["id"]]
            self.eval_entities[task] = [r["entity_id"] for r in kept]
            self.eval_in_facts[task] = np.array([e in fact_entities for e in self.eval_entities[task]])
            self.gold_coarse[task] = np.array([self.type2id[r["labels"][0]] for r in kept])
        self.sizes = {
            "facts_train": len(self.facts["fact_train"]),
            "facts_dev": len(self.facts["fact_dev"]),
            "typing_train": len(self.typing["typing_train"]),
            f"typing_{settings.eval_split}": len(self.typing["typing_eval"]),
            f"{settings.eval_split}_entities": len(set(self.eval_entities["context"])),
            f"{settings.eval_split}_examples_whose_entity_is_in_the_facts": int(self.eval_in_facts["context"].sum()),
            "name_train": len(self.typing["name_train"]),
            f"name_{settings.eval_split}": len(self.typing["name_eval"]),
            "relation_labels": len(self.relation2id),
            "type_labels": len(self.type2id),
        }


def _name_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One name-only typing record per entity of `rows`: the mention itself as the whole text."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["entity_id"] not in seen:
            mention = row["sent"][row["start"] : row["end"]]
            seen[row["entity_id"]] = {"id": row["entity_id"], "entity_id": row["entity_id"], "sent": mention,
                                      "start": 0, "end": len(mention), "labels": row["labels"]}  # fmt: skip
    return list(seen.values())


def _adapter_spec(settings: KAdapterSettings, num_hidden_layers: int):
    from ..kadapter import KnowledgeAdapterConfig, default_tap_layers  # noqa: PLC0415

    return KnowledgeAdapterConfig(
        tap_layers=settings.taps or default_tap_layers(num_hidden_layers),
        num_layers=settings.adapter_layers,
        hidden_size=settings.adapter_hidden,
        num_attention_heads=settings.adapter_heads,
        intermediate_size=4 * settings.adapter_hidden,
    )


# ---------------------------------------------------------------------------------------------------------------
# The probe regime, fast: base and adapters are frozen, so what the head reads at the marker never changes.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MarkerFeatures:
    """What a marker head reads at each example's marker: the base's last hidden state and each adapter's output."""

    base: torch.Tensor  # (N, H)
    adapters: dict[str, torch.Tensor]  # name -> (N, H)


@torch.no_grad()
def marker_features(model: Any, cache: Any, dataset: Any, collator: Callable, batch_size: int = 128) -> MarkerFeatures:
    """Run the frozen part of an entity-typing model (base states from the feature cache, frozen adapters) once and
    keep the vectors at the entity marker: with base and adapters frozen, training the fusion and the head on these
    is the same computation as training the whole model, without re-running the adapters every epoch."""
    from ..kadapter.feature_cache import CachedFeatureCollator  # noqa: PLC0415

    was_training = model.training
    model.eval()
    attached = cache.attach(dataset, verify=False)
    feed = CachedFeatureCollator(collator, cache, model=model)
    base_parts, adapter_parts = [], []
    names = model.active_adapters()
    for start in range(0, len(attached), batch_size):
        batch = feed([attached[i] for i in range(start, min(start + batch_size, len(attached)))])
        positions = batch["entity_positions"]
        out = model.kadapter(
            attention_mask=batch["attention_mask"], cached_hidden_states=batch["cached_hidden_states"],
            return_dict=True,
        )  # fmt: skip
        rows = torch.arange(len(positions))
        base_parts.append(out.base_last_hidden_state[rows, positions])
        adapter_parts.append([a[rows, positions] for a in out.adapter_hidden_states])
    model.train(was_training)
    return MarkerFeatures(
        base=torch.cat(base_parts),
        adapters={name: torch.cat([part[i] for part in adapter_parts]) for i, name in enumerate(names)},
    )


class _ProbeHead(torch.nn.Module):
    """The trainable part of an entity-typing model in the probe regime: its fusion and its classifier."""

    def __init__(self, model: Any):
        super().__init__()
        self.fusion = model.kadapter.fusion
        self.classifier = model.classifier
        self.names = model.active_adapters()

    def forward(self, base: torch.Tensor, adapter_outputs: torch.Tensor | None = None, labels=None):
        adapters = {name: adapter_outputs[:, i] for i, name in enumerate(self.names)}
        logits = self.classifier(self.fusion(base, adapters))
        loss = None if labels is None else F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return {"loss": loss, "logits": logits}


def _stacked(features: MarkerFeatures) -> torch.Tensor:
    if not features.adapters:
        return torch.zeros(len(features.base), 0, features.base.shape[-1])
    return torch.stack(list(features.adapters.values()), dim=1)


def train_probe(
    model: Any, features: MarkerFeatures, labels: torch.Tensor, *, output_dir: Path, seed: int, epochs: float,
    learning_rate: float, batch_size: int,
) -> list[tuple[int, float]]:  # fmt: skip
    """Train the model's fusion + head (in place) on precomputed marker features, with the standard Trainer."""
    stacked = _stacked(features)
    rows = [{"base": features.base[i], "adapter_outputs": stacked[i], "labels": labels[i]} for i in range(len(labels))]
    return train_small(_ProbeHead(model), rows, None, output_dir=output_dir, seed=seed, epochs=epochs,
                       learning_rate=learning_rate, batch_size=batch_size, warmup_ratio=0.06)  # fmt: skip


@torch.no_grad()
def probe_logits(model: Any, features: MarkerFeatures) -> torch.Tensor:
    head = _ProbeHead(model).eval()
    return head(features.base, _stacked(features))["logits"]


def run_kadapter(
    settings: KAdapterSettings, suite_dir: Path, workdir: Path, progress: Callable[[str], None] = print
) -> ExperimentResult:
    from transformers import AutoTokenizer  # noqa: PLC0415

    from .. import KAdapterForEntityTyping, KAdapterForFactualPretraining  # noqa: PLC0415
    from ..kadapter.data import KAdapterDataCollator  # noqa: PLC0415
    from ..kadapter.feature_cache import CachedFeatureCollator, build_feature_cache  # noqa: PLC0415
    from ..kadapter.modeling_kadapter import load_base_model  # noqa: PLC0415

    result = ExperimentResult(
        method="kadapter",
        description="Entity typing in context on held-out entities, frozen encoder: does a factual adapter help?",
        conditions=dict(CONDITIONS),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    units = UnitStore(workdir / "units", {k: v for k, v in vars(settings).items() if k != "seeds"})
    result.units = units
    with result.phase("data"):
        tokenizer = AutoTokenizer.from_pretrained(settings.encoder)
        data = _Data(settings, suite_dir, workdir / "data", tokenizer)
        base = load_base_model(settings.encoder)
        spec = _adapter_spec(settings, base.config.num_hidden_layers)
    result.data.update(data.sizes, encoder=settings.encoder, taps=spec.tap_layers, fact_label=settings.fact_label)
    progress(f"  data: {data.sizes}")

    def typing_model(seed: int, own_base: bool = False) -> Any:
        """The typing head on the shared frozen base, or on a private copy of it when the base will train."""
        seed_everything(seed)
        return KAdapterForEntityTyping.from_base(
            copy.deepcopy(base) if own_base else base,
            adapters={},
            num_labels=len(data.type2id),
            id2label={i: n for n, i in data.type2id.items()},
            label2id=dict(data.type2id),
            problem_type="multi_label_classification",
        )

    def pretraining_model(seed: int) -> Any:
        seed_everything(seed)
        return KAdapterForFactualPretraining.from_base(
            base,
            adapters={"factual": spec},
            num_labels=len(data.relation2id),
            id2label={i: n for n, i in data.relation2id.items()},
            label2id=dict(data.relation2id),
        )

    with result.phase("feature cache (frozen base, once)"):
        probe_model = pretraining_model(0)
        cache_dir = workdir / "feature-cache"
        caches = {
            name: build_feature_cache(probe_model, dataset, cache_dir, batch_size=64,
                                      dtype=settings.feature_cache_dtype, progress=False)
            for name, dataset in {**data.facts, **data.typing}.items()
        }  # fmt: skip
    progress(f"  feature caches: {sum(c.disk_bytes() for c in caches.values()) / 2**20:.0f} MiB")
    fact_collator = KAdapterDataCollator(tokenizer, label_kind="scalar")
    typing_collator = KAdapterDataCollator(tokenizer, label_kind="multi_hot")

    # ----- 1. pretraining: factual adapter and shuffled-label control, per seed --------------------------------
    adapters: dict[tuple[str, int], Path] = {}
    for seed in settings.seeds:
        for kind in ("pretrained", "shuffled"):
            folder = workdir / "adapters" / f"{kind}-seed{seed}"
            adapters[(kind, seed)] = folder

            def pretrain(kind: str = kind, seed: int = seed, folder: Path = folder) -> dict[str, Any]:
                model = pretraining_model(seed)
                train = caches["fact_train"].attach(data.facts["fact_train"])
                if kind == "shuffled":
                    labels = list(train["labels"])
                    random.Random(1000 + seed).shuffle(labels)
                    train = train.remove_columns("labels").add_column("labels", labels)
                collator = CachedFeatureCollator(fact_collator, caches["fact_train"], model=model)
                curve = train_small(model, train, collator, output_dir=workdir / "trainer", seed=seed,
                                    epochs=settings.pretrain_epochs, learning_rate=settings.pretrain_lr,
                                    batch_size=settings.pretrain_batch, warmup_ratio=0.06)  # fmt: skip
                dev = caches["fact_dev"].attach(data.facts["fact_dev"])
                dev_collator = CachedFeatureCollator(fact_collator, caches["fact_dev"], model=model)
                logits = predict_batches(model, dev, dev_collator, 128, lambda out: out.logits)
                accuracy = float((logits.argmax(-1) == np.array(dev["labels"])).mean())
                model.save_pretrained(folder)
                return {"curve": curve, "dev_accuracy": accuracy}

            with result.phase("adapter pretraining"):
                outcome = units.get_or_run(f"pretrain/{kind}/seed{seed}", pretrain)
            result.curves.setdefault("pretraining_loss", {}).setdefault(kind, {})[str(seed)] = outcome["curve"]
            result.runs("fact_dev_accuracy", f"{kind}_adapter").add(seed, score=[outcome["dev_accuracy"]])
            progress(f"  pretrain {kind} adapter, seed {seed}: fact dev accuracy {outcome['dev_accuracy']:.3f}")

    # ----- 2. downstream typing, per task, condition and seed --------------------------------------------------
    coarse_ids = np.array([data.type2id[t] for t in COARSE_TYPES])
    tasks = {"context": ("typing_train", "typing_eval"), "name": ("name_train", "name_eval")}
    runs = [(task, "probe", condition, seed) for task in tasks for seed in settings.seeds for condition in CONDITIONS]
    runs += [("context", "paper", condition, seed) for seed in settings.seeds[: settings.paper_regime_seeds]
             for condition in PAPER_CONDITIONS]  # fmt: skip
    for task, regime, condition, seed in runs:
        train_name, eval_name = tasks[task]

        def downstream(task=task, regime=regime, condition=condition, seed=seed, train_name=train_name,
                       eval_name=eval_name) -> dict[str, Any]:  # fmt: skip
            model = typing_model(seed, own_base=regime == "paper")
            if condition == "fresh_adapter":
                model.add_adapter("factual", spec)
            elif condition in ("pretrained_adapter", "shuffled_adapter"):
                model.load_adapter(adapters[(condition.split("_")[0], seed)], name="factual")
            if regime == "paper":  # the paper's fine-tuning: base trained, adapters frozen, full forward
                model.unfreeze_base()
                model.freeze_adapter()
                subset = data.typing[train_name]
                if settings.paper_train_limit is not None and len(subset) > settings.paper_train_limit:
                    subset = subset.shuffle(seed=0).select(range(settings.paper_train_limit))
                curve = train_small(model, subset, typing_collator, output_dir=workdir / "trainer",
                                    seed=seed, epochs=settings.paper_epochs, learning_rate=settings.paper_lr,
                                    batch_size=settings.paper_batch, warmup_ratio=0.06)  # fmt: skip
                logits = predict_batches(model, data.typing[eval_name], typing_collator, 64, lambda out: out.logits)
                return {"curve": curve, "logits": logits.round(4).tolist()}
            model.freeze_base()
            model.freeze_adapter()  # the "probe" regime: only the fusion and the head train
            features = {
                split: marker_features(model, caches[name], data.typing[name], typing_collator)
                for split, name in (("train", train_name), ("eval", eval_name))
            }
            labels = torch.tensor(data.typing[train_name]["labels"])
            curve = train_probe(model, features["train"], labels, output_dir=workdir / "trainer", seed=seed,
                                epochs=settings.head_epochs, learning_rate=settings.head_lr,
                                batch_size=settings.head_batch)  # fmt: skip
            return {"curve": curve, "logits": probe_logits(model, features["eval"]).numpy().round(4).tolist()}

        phase = "downstream typing" if regime == "probe" else "downstream typing (paper regime)"
        with result.phase(phase):
            outcome = units.get_or_run(f"typing/{task}/{regime}/{condition}/seed{seed}", downstream)
        name = condition if regime == "probe" else f"{condition}[paper]"
        prefix = "" if task == "context" else "name_"
        logits = np.array(outcome["logits"])
        gold = np.array(data.typing[eval_name]["labels"]) > 0.5
        correct = result.add_typing_scores(name, seed, logits, gold, coarse_ids, data.gold_coarse[task], prefix)
        in_facts = data.eval_in_facts[task]
        for subset, rows in (("in_facts", in_facts), ("not_in_facts", ~in_facts)):
            result.runs(f"{prefix}coarse_accuracy[{subset}]", name).add(seed, score=correct[rows])
        if task == "context":
            result.curves.setdefault(f"typing_loss{'' if regime == 'probe' else '_paper'}", {}).setdefault(
                condition, {}
            )[str(seed)] = outcome["curve"]
        progress(f"  typing ({task}, {regime}) {condition}, seed {seed}: coarse accuracy {correct.mean():.3f}")

    result.metric_notes = {
        "coarse_accuracy": f"typing in context: coarse type ({', '.join(COARSE_TYPES)}) correct, {settings.eval_split} "
        "split",
        "type_micro_f1": "typing in context: micro F1 over coarse + fine types (multi-label, logit > 0)",
        "coarse_accuracy[in_facts]": "typing in context, examples whose entity appears in the pretraining facts",
        "coarse_accuracy[not_in_facts]": "typing in context, examples whose entity is absent from the facts",
        "name_coarse_accuracy": "typing from the name alone ('@ name @'): only what the model knows of the entity",
        "name_type_micro_f1": "typing from the name alone: micro F1 over coarse + fine types",
        "fact_dev_accuracy": "pretraining task accuracy on held-out fact sentences",
    }
    for metric in ("coarse_accuracy", "type_micro_f1", "coarse_accuracy[in_facts]", "name_coarse_accuracy",
                   "name_coarse_accuracy[in_facts]", "name_type_micro_f1"):  # fmt: skip
        result.gains += [
            GainSpec(f"pretrained − fresh adapter ({metric})", "pretrained_adapter", "fresh_adapter", metric),
            GainSpec(f"pretrained − shuffled adapter ({metric})", "pretrained_adapter", "shuffled_adapter", metric),
        ]
    result.gains += [
        GainSpec("shuffled − fresh adapter (control)", "shuffled_adapter", "fresh_adapter", "coarse_accuracy",
                 kind="control"),
        GainSpec("shuffled − fresh adapter (control, name)", "shuffled_adapter", "fresh_adapter",
                 "name_coarse_accuracy", kind="control"),
        GainSpec("fresh adapter − head only (adapter capacity)", "fresh_adapter", "head_only", "coarse_accuracy",
                 kind="info"),
        GainSpec("pretrained − fresh adapter, paper regime", "pretrained_adapter[paper]", "fresh_adapter[paper]",
                 "coarse_accuracy"),
        GainSpec("pretrained − shuffled adapter, paper regime", "pretrained_adapter[paper]",
                 "shuffled_adapter[paper]", "coarse_accuracy"),
    ]  # fmt: skip
    return result


__all__ = ["CONDITIONS", "KAdapterSettings", "fact_label", "run_kadapter"]

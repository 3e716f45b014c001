"""The benchmark's fast probe regime computes exactly what the K-Adapter typing model computes: the fusion and head
trained on precomputed marker features are the model's own, and its forward then gives the probe's logits."""

from __future__ import annotations

import torch
from conftest import VOCAB, tiny_adapter
from datasets import Dataset

import hf_kadapter as hk
from hf_kadapter.bench.kadapter_exp import marker_features, probe_logits, train_probe
from hf_kadapter.kadapter.feature_cache import CachedFeatureCollator, build_feature_cache


class PadCollator:
    """Right-pad ids and masks; stack the rest (what KAdapterDataCollator does, without a tokenizer)."""

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [1] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] + [0] * (width - len(r["attention_mask"])) for r in rows]),
            "entity_positions": torch.tensor([r["entity_positions"] for r in rows]),
        }
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
        return batch


def typing_rows(size: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "entity_positions": [], "labels": []}
    for _ in range(size):
        length = int(torch.randint(4, 10, (1,), generator=generator))
        ids = torch.randint(4, VOCAB, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["entity_positions"].append(int(torch.randint(0, length, (1,), generator=generator)))
        rows["labels"].append([float(ids[0] % 2), float(ids[-1] % 3 == 0), 0.0])
    return Dataset.from_dict(rows)


def test_probe_training_equals_training_the_models_fusion_and_head(base_dirs, tmp_path):
    torch.manual_seed(0)
    model = hk.KAdapterForEntityTyping.from_base(
        base_dirs["bert"], adapters={"factual": tiny_adapter()}, num_labels=3,
        problem_type="multi_label_classification",
    )  # fmt: skip
    model.freeze_base()
    model.freeze_adapter()
    train, evaluation = typing_rows(24, 0), typing_rows(9, 1)
    collate = PadCollator()
    caches = {name: build_feature_cache(model, data, tmp_path, batch_size=4, progress=False)
              for name, data in (("train", train), ("eval", evaluation))}  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    features = marker_features(model, caches["train"], train, collate)
    train_probe(model, features, torch.tensor(train["labels"]), output_dir=tmp_path / "t", seed=0, epochs=3,
                learning_rate=1e-2, batch_size=8)  # fmt: skip
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("kadapter.fusion.", "classifier.")) for n in changed)

    expected = probe_logits(model, marker_features(model, caches["eval"], evaluation, collate))
    feed = CachedFeatureCollator(collate, caches["eval"], model=model)
    batch = feed([{**evaluation[i], "cached_hidden_states": i} for i in range(len(evaluation))])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        full = model(**batch).logits
        uncached = model(**{k: v for k, v in batch.items() if k != "cached_hidden_states"}).logits
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncached, expected, rtol=1e-4, atol=1e-5)

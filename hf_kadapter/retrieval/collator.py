"""Salient span masking batches for REALM pretraining with the plain `Trainer`.

Finding named entities and dates (spaCy) is slow, so it runs once, in preprocessing: `salient_span_features`
tokenises texts (`dataset.map(..., batched=True)`) and stores each text's salient spans as token spans. The masking
itself is drawn anew for every batch by `RealmSalientSpanCollator` (one span per text, as REALM), so every epoch
masks other spans. The columns (`input_ids`, `attention_mask`, `salient_spans`, and an optional `exclude_ids`: the
document(s) a text comes from, never retrieved for it) are all arguments of `RealmKnowledgeAugmentedMLM.forward`,
so Trainer's default `remove_unused_columns=True` keeps them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .realm import salient_spans

IGNORE_INDEX = -100


def salient_span_features(
    texts: Sequence[str] | Mapping[str, Any],
    tokenizer: Any,
    nlp: Any = None,
    max_length: int = 128,
    use_spacy: bool = True,
    text_column: str = "text",
) -> dict[str, list]:
    """Tokenise texts and find their salient spans (named entities, dates) as token spans [start, end).

    `texts` is a list of strings or a batch of a `datasets.Dataset` (`dataset.map(salient_span_features,
    batched=True, fn_kwargs={"tokenizer": tok})`, reading `text_column`). Needs a fast tokenizer (offsets); spans cut
    away by `max_length` are dropped. Returns input_ids, attention_mask and salient_spans (lists, unpadded).
    """
    if isinstance(texts, Mapping):
        texts = texts[text_column]
    texts = list(texts)
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    spans_per_text = []
    for row, text in enumerate(texts):
        offsets, special = encoded["offset_mapping"][row], encoded["special_tokens_mask"][row]
        found = salient_spans(text, nlp=nlp, use_spacy=use_spacy)
        spans = []
        for start, end, _ in found:
            tokens = [i for i, (s, e) in enumerate(offsets) if not special[i] and s < end and e > start]
            if tokens:
                spans.append([tokens[0], tokens[-1] + 1])
        spans_per_text.append(spans)
    return {
        "input_ids": list(encoded["input_ids"]),
        "attention_mask": list(encoded["attention_mask"]),
        "salient_spans": spans_per_text,
    }


@dataclass
class RealmSalientSpanCollator:
    """Pad `salient_span_features` rows (right) and mask one salient span per text with the mask token.

    Labels keep the original ids of the masked tokens (-100 elsewhere). A text without a salient span gets one
    random non-special token masked instead, so every example has a target. `exclude_ids` (a document id or a list
    of them per example), when present, is passed through as lists for `RealmKnowledgeAugmentedMLM`. `seed` (an
    int or a random.Random) makes the masking reproducible.
    """

    tokenizer: Any
    seed: int | random.Random | None = None
    pad_to_multiple_of: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = self.seed if isinstance(self.seed, random.Random) else random.Random(self.seed)
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} needs a mask token and a pad token for salient span MLM."
            )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("RealmSalientSpanCollator got an empty list of features.")
        if "salient_spans" not in features[0]:
            raise ValueError(
                "The features have no salient_spans column: build them with salient_span_features (with Trainer, "
                "pass the model whose forward names it, RealmKnowledgeAugmentedMLM, so remove_unused_columns keeps it)."
            )
        rows = [list(torch.as_tensor(f["input_ids"]).tolist()) for f in features]
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (feature, row) in enumerate(zip(features, rows, strict=True)):
            input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = torch.as_tensor(feature.get("attention_mask") or [1] * len(row))
            chosen = self._choose(row, feature["salient_spans"] or [])
            if chosen is None:
                continue
            labels[i, chosen] = input_ids[i, chosen]
            input_ids[i, chosen] = self.tokenizer.mask_token_id
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "exclude_ids" in features[0]:
            batch["exclude_ids"] = [
                []
                if f["exclude_ids"] is None
                else [f["exclude_ids"]]
                if isinstance(f["exclude_ids"], str)
                else list(f["exclude_ids"])
                for f in features
            ]
        return batch

    def _choose(self, row: list[int], spans: Sequence[Sequence[int]]) -> list[int] | None:
        """Token positions to mask: one salient span, else one random non-special token (None if there is none)."""
        if spans:
            start, end = self._rng.choice(list(spans))
            return list(range(int(start), int(end)))
        special = self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
        candidates = [i for i, is_special in enumerate(special) if not is_special]
        return [self._rng.choice(candidates)] if candidates else None


__all__ = ["RealmSalientSpanCollator", "salient_span_features"]

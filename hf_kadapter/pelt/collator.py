"""Batching PELTTokenizer outputs for `Trainer`: padding that keeps every entity slot on its token.

PELTTokenizer returns, per example, `input_ids` / `attention_mask` (/ `token_type_ids`) and the ragged
`entity_positions` / `entity_ids` (one entry per slot). A batch needs them padded: sequences to one length (on the
tokenizer's padding side), entity fields to one width with -1 (no slot). Left padding moves every token to the
right, so each position field (`entity_positions`, and a head's `head_entity_positions` or `*_positions` marker) is
shifted by the padding put before it; forgetting that plugs entity vectors onto the wrong tokens. Every column
these features carry is an argument of `PELTModel.forward`, so Trainer's default `remove_unused_columns=True` keeps
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
SEQUENCE_INPUTS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}


def _token_labels(values: Sequence[Any], lengths: Sequence[int]) -> bool:
    """Per-token labels (masked-LM, tagging: one integer per token) rather than one target vector per example
    (multi-label classification: a multi-hot row as long as the label set; give it as floats)."""
    return all(
        len(value) == length and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        for value, length in zip(values, lengths, strict=True)
    )


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


@dataclass
class PELTDataCollator:
    """Collate PELTTokenizer features (lists, not yet padded) into a batch for `PELTModel`.

    - sequences (`input_ids`, `attention_mask`, `token_type_ids`, `special_tokens_mask`) are padded on the
      tokenizer's `padding_side` to the longest example (rounded up to `pad_to_multiple_of`);
    - `entity_positions` / `entity_ids` are padded with -1 to the most slots in the batch; with left padding every
      position field (`*positions`, -1 left alone) is shifted by the example's left padding;
    - `labels`: per-token labels (masked-LM / tagging: one integer per token) are padded with -100 on the same side;
      a number, or one target vector per example (a multi-hot row for multi-label typing), is stacked.

    `tokenizer` is the PELTTokenizer or the tokenizer it wraps (its pad token id and padding side are used).
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        if getattr(inner, "pad_token_id", None) is None:
            raise ValueError(f"{type(inner).__name__} has no pad token; set one before collating.")
        self.pad_token_id = int(inner.pad_token_id)
        self.padding_side = getattr(inner, "padding_side", "right")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PELTDataCollator got an empty list of features.")
        features = [{key: _as_list(value) for key, value in feature.items()} for feature in features]
        lengths = [len(feature["input_ids"]) for feature in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shifts = [width - length if self.padding_side == "left" else 0 for length in lengths]
        batch: dict[str, torch.Tensor] = {}
        for name in features[0]:
            values = [feature.get(name) for feature in features]
            if any(value is None for value in values):
                raise ValueError(f"column {name!r} is missing (None) in some features of the batch.")
            if name in SEQUENCE_INPUTS:
                pad = self.pad_token_id if name == "input_ids" else SEQUENCE_INPUTS[name]
                batch[name] = self._pad(values, width, pad)
            elif name in ("entity_positions", "entity_ids"):
                batch[name] = self._pad_entities(values, shifts if name == "entity_positions" else None)
            elif name == "labels" and isinstance(values[0], (list, tuple)):
                if _token_labels(values, lengths):
                    batch[name] = self._pad(values, width, IGNORE_INDEX)
                else:  # one vector per example (multi-hot classification targets): stacked, never padded
                    batch[name] = torch.as_tensor(values)
            elif name.endswith("positions"):
                batch[name] = self._shift(torch.as_tensor(values, dtype=torch.long), shifts)
            elif isinstance(values[0], str) or (
                isinstance(values[0], list) and values[0] and isinstance(values[0][0], str)
            ):
                continue  # text columns (ids, words) travel with the data but are no model input
            else:
                batch[name] = torch.as_tensor(values)
        return batch

    def _pad(self, rows: list[list[int]], width: int, pad: int) -> torch.Tensor:
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out

    def _pad_entities(self, rows: list[list[int]], shifts: list[int] | None) -> torch.Tensor:
        most = max((len(row) for row in rows), default=0)
        out = torch.full((len(rows), most), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            kept = [value for value in row if value >= 0]  # already padded rows carry -1 at the end
            out[i, : len(kept)] = torch.as_tensor(kept, dtype=torch.long)
        return out if shifts is None else self._shift(out, shifts)

    @staticmethod
    def _shift(positions: torch.Tensor, shifts: list[int]) -> torch.Tensor:
        offset = torch.as_tensor(shifts, dtype=torch.long).view(-1, *([1] * (positions.dim() - 1)))
        return torch.where(positions >= 0, positions + offset, positions)


__all__ = ["PELTDataCollator"]

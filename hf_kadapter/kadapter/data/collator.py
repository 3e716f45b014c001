"""Batching K-Adapter features into the tensors the heads take.

One collator covers every head: sequences are right-padded (always right, whatever the tokenizer's
padding_side, so the marker and head positions computed in preprocessing stay valid), labels get the dtype
their loss needs, and text columns that ride along for traceability (e.g. "id") are dropped instead of
breaking `torch.tensor`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LABEL_KINDS = ("scalar", "multi_hot", "token")
IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


def _kind(value: Any) -> str:
    """'numeric' (numbers, tensors, arrays, nested lists of numbers; [] too), 'none', or 'text' (anything else)."""
    if value is None:
        return "none"
    if isinstance(value, torch.Tensor):
        return "numeric"
    if isinstance(value, np.ndarray):
        return "numeric" if value.dtype.kind in "biuf" else "text"
    if isinstance(value, (list, tuple)):
        return "text" if any(_kind(item) != "numeric" for item in value) else "numeric"
    if isinstance(value, (numbers.Number, np.generic)):
        return "numeric"
    return "text"


def _tensor(name: str, value: Any) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"column {name!r}: cannot make a tensor of {value!r} ({error}).") from None


def _rows(name: str, value: Any) -> tuple[tuple[int, ...], list[torch.Tensor]]:
    """A sequence feature as (leading shape, list of 1-D rows): [len] -> ((), [row]); [choices, len] ->
    ((choices,), rows), where a list of lists may be ragged."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, (list, tuple)) for item in value):
        rows = [_tensor(name, item).long() for item in value]
        if any(row.dim() != 1 for row in rows):
            raise ValueError(f"column {name!r}: sequences have at most two dimensions ([num_choices, length]).")
        return (len(rows),), rows
    tensor = _tensor(name, value).long()
    if tensor.dim() == 0:
        raise ValueError(f"column {name!r}: expected a sequence, got a single number.")
    return tuple(tensor.shape[:-1]), list(tensor.reshape(-1, tensor.shape[-1]))


@dataclass
class KAdapterDataCollator:
    """Collate a list of feature dicts (from the K-Adapter preprocessing functions) into a batch of tensors.

    - input_ids are padded with the tokenizer's pad id, attention_mask / token_type_ids with 0,
      special_tokens_mask with 1; 2-D features (multiple choice: [num_choices, length]) are padded on the
      last dimension. Padding goes right, up to a multiple of `pad_to_multiple_of` when given.
    - labels by `label_kind`: "scalar" -> LongTensor (batch,) of class ids (floats give a FloatTensor, for
      regression); "multi_hot" -> FloatTensor (batch, num_labels); "token" -> LongTensor padded with -100.
    - *_positions fields -> LongTensor; any other numeric column is stacked as a tensor; text columns
      (strings, lists of strings, None) are dropped.
    """

    tokenizer: Any
    label_kind: str = "scalar"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind={self.label_kind!r} is not supported; use one of {LABEL_KINDS}.")
        multiple = self.pad_to_multiple_of
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"pad_to_multiple_of={multiple!r} must be a positive int or None.")

    def _pad_values(self) -> dict[str, int]:
        values = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
        if self.label_kind == "token":
            values["labels"] = IGNORE_INDEX
        return values

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("KAdapterDataCollator got an empty list of features.")
        names = list(dict.fromkeys(name for feature in features for name in feature))
        pad_values = self._pad_values()
        batch: dict[str, torch.Tensor] = {}
        for name in names:
            values = [feature.get(name) for feature in features]
            kinds = {_kind(value) for value in values}
            if kinds == {"none"} and name != "input_ids":
                continue  # a column left empty everywhere (e.g. labels of unlabelled data) is no input
            if kinds != {"numeric"}:
                if "text" not in kinds or self._is_input(name):
                    raise ValueError(
                        f"column {name!r} needs a number (or numeric list) in every feature; got {values!r:.200}"
                    )
                continue  # text columns (ids, words) travel with the data but are no model input
            if name == "input_ids":
                batch[name] = self._pad(name, values, self._pad_id())
            elif name in pad_values:
                batch[name] = self._pad(name, values, pad_values[name])
            elif name == "labels":
                batch[name] = self._labels(values)
            elif name.endswith("positions"):
                batch[name] = self._stack(name, values).long()
            else:
                batch[name] = self._stack(name, values)
        return batch

    @staticmethod
    def _is_input(name: str) -> bool:
        return name in MODEL_INPUTS or name == "labels" or name.endswith("positions")

    def _pad_id(self) -> int:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError(
                f"{type(self.tokenizer).__name__} has no pad token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token) before collating."
            )
        return int(pad_id)

    def _pad(self, name: str, values: list[Any], pad: int) -> torch.Tensor:
        # Each feature becomes (leading shape, its last-dimension rows); rows may differ in length, even
        # within one feature (the choices of a multiple-choice example).
        parts = [_rows(name, value) for value in values]
        leads = {lead for lead, _ in parts}
        if len(leads) != 1:
            raise ValueError(
                f"column {name!r}: every feature needs the same leading shape (e.g. the same number of choices); "
                f"got {sorted(leads)}."
            )
        length = max((len(row) for _, rows in parts for row in rows), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        lead = leads.pop()
        out = torch.full((len(parts), *lead, length), pad, dtype=torch.long)
        flat = out.view(len(parts), math.prod(lead), length)
        for i, (_, rows) in enumerate(parts):
            for j, row in enumerate(rows):
                flat[i, j, : len(row)] = row
        return out

    def _stack(self, name: str, values: list[Any]) -> torch.Tensor:
        tensors = [_tensor(name, value) for value in values]
        if len({tuple(t.shape) for t in tensors}) != 1:
            raise ValueError(
                f"column {name!r} has values of different shapes {[tuple(t.shape) for t in tensors]}: "
                "only the input sequences and token labels are padded; pad it in preprocessing or drop it."
            )
        return torch.stack(tensors)

    def _labels(self, values: list[Any]) -> torch.Tensor:
        if self.label_kind == "multi_hot":
            labels = self._stack("labels", values)
            if labels.dim() != 2:
                raise ValueError(
                    f"label_kind='multi_hot' needs one vector per example; got labels of shape {tuple(labels.shape)}."
                )
            return labels.float()
        labels = self._stack("labels", values)
        if labels.dim() != 1:
            raise ValueError(
                f"label_kind='scalar' needs one number per example; got labels of shape {tuple(labels.shape)} "
                "(use label_kind='multi_hot' for label vectors, 'token' for per-token labels)."
            )
        return labels if labels.is_floating_point() else labels.long()

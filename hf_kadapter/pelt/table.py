"""The entity lookup table of PELT (Ye et al., 2022): one vector per entity, computed by a masked LM itself.

Each row is the SUM, over (up to K) occurrences of the entity, of the masked LM's output at a mask token that
replaced the mention, after the LM head's transform (so it lives in the model's word-embedding space). Sums and
occurrence counts are kept (not normalised vectors) so that tables can be merged exactly and more occurrences added
later; `vectors()` normalises to a fixed L2 norm at use time (7 in the paper).

A table only means something inside the model that built it, so it records the fingerprints of that model's encoder
(where the vectors are plugged in) and of its LM head's transform (which made the vectors), and `check_model`
refuses any other. Saved as safetensors (sums, counts) plus JSON (entity vocabulary, metadata) and a model card, as
one folder commit (hf_kadapter.utils.io); never pickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import cached_file

from ..utils.fingerprint import (
    base_fingerprint,
    base_tensors,
    compare_fingerprints,
    fingerprint_tensors,
    tensors_match_fingerprint,
)
from ..utils.hub import DOWNLOAD_KWARGS, LIBRARY_NAME, HubMixin, card_is_ours, is_hub_id, model_card
from ..utils.io import FolderCommit, load_safetensors, read_json, reading_local, safetensors_bytes
from .lm_head import _is_kadapter, _unwrap, lm_head_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS_NAME = "entity_table.safetensors"
VOCAB_NAME = "entity_vocab.json"
CONFIG_NAME = "entity_table_config.json"
CARD_NAME = "README.md"
_DOWNLOAD_KWARGS = (*DOWNLOAD_KWARGS, "subfolder")
ON_DUPLICATE = ("sum", "keep", "raise")
REQUIRED_METADATA = ("model_fingerprint", "model_name_or_path", "hidden_size", "model_type", "max_occurrences", "seed")
_TABLE_FILES = (CONFIG_NAME, VOCAB_NAME, TENSORS_NAME)


class EntityTableMismatchError(ValueError):
    """An entity table is used with (or merged into a table of) another model than the one that built it."""


# ---------------------------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------------------------
def _kadapter_base(model: nn.Module) -> nn.Module:
    core = model if hasattr(model, "pretrained_model") else getattr(model, "kadapter", None)
    base = getattr(core, "pretrained_model", None)
    if not isinstance(base, nn.Module):
        raise TypeError(f"{type(model).__name__} looks like a K-Adapter model but has no base encoder.")
    return base


def _encoder(model: nn.Module) -> nn.Module:
    """The encoder whose embedding space the vectors live in: a K-Adapter model's base, a task model's base_model."""
    model = _unwrap(model)
    if _is_kadapter(model):
        return _kadapter_base(model)
    return getattr(model, "base_model", model) if isinstance(model, PreTrainedModel) else model


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint (hf_kadapter.utils.fingerprint) of the encoder whose embedding space a table's vectors live in.

    - a K-Adapter model or head: its `config.base_fingerprint` (the frozen base the adapters sit on), so a table
      built with the masked LM of that base works with the K-Adapter model;
    - a masked LM (or any task model): `base_fingerprint(model.base_model)`, the encoder without its head (the head's
      transform has its own fingerprint, `lm_head_fingerprint`);
    - a bare encoder: `base_fingerprint(model)`.
    Wrappers (DistributedDataParallel, PELTModel) are looked through.
    """
    model = _unwrap(model)
    fingerprint = getattr(model.config, "base_fingerprint", None) if _is_kadapter(model) else None
    fingerprint = fingerprint or base_fingerprint(_encoder(model))
    if fingerprint is None:
        raise ValueError(
            f"The weights of {type(model).__name__} are not loaded (meta device): load them before fingerprinting."
        )
    return fingerprint


def lm_head_fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of a masked LM's head transform (dense -> activation -> layer norm), which turns encoder states
    into PELT vectors; None for a model without one (bare encoder, K-Adapter model)."""
    tensors = lm_head_tensors(model)
    return None if tensors is None else fingerprint_tensors(tensors)


def _model_name(model: nn.Module) -> str:
    """A readable name for error messages: the checkpoint it came from, else its class."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    name = getattr(config, "base_model_name_or_path", None) if _is_kadapter(model) else None
    name = name or getattr(config, "name_or_path", None) or ""
    return f"{type(model).__name__} ({name})" if name else f"{type(model).__name__} (random weights built from config)"


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------
class EntityLookupTable(HubMixin):
    """Entity vectors of one model: `sums` [N, H] float32 and `counts` [N] int64, with ids, names and aliases.

    `table.index(entity_id)` is an entity's row; `table.vectors(rows)` gives the normalised vectors the plug puts
    into the model's input. Build one with `hf_kadapter.pelt.build_entity_table`.
    """

    def __init__(
        self,
        entity_ids: Sequence[str],
        sums: torch.Tensor,
        counts: torch.Tensor,
        names: Sequence[str | None] | None = None,
        aliases: Sequence[Iterable[str]] | None = None,
        norm: float = 7.0,
        metadata: dict[str, Any] | None = None,
    ):
        entity_ids = list(entity_ids)
        sums = torch.as_tensor(sums).detach().to("cpu", torch.float32)
        counts = torch.as_tensor(counts).detach().to("cpu", torch.long)
        # Tensors made under torch.inference_mode cannot be updated in place later (add_entities does).
        sums = sums.clone() if sums.is_inference() else sums
        counts = counts.clone() if counts.is_inference() else counts
        if sums.dim() != 2 or counts.shape != (sums.shape[0],) or len(entity_ids) != sums.shape[0]:
            raise ValueError(
                f"An entity table needs sums [N, H], counts [N] and N ids; got sums {tuple(sums.shape)}, counts "
                f"{tuple(counts.shape)} and {len(entity_ids)} ids."
            )
        bad = [e for e in entity_ids if not isinstance(e, str) or not e]
        if bad:
            raise TypeError(f"Entity ids must be non-empty strings (e.g. Wikidata 'Q90'); got {bad[:5]}.")
        if bool((counts < 0).any()):
            raise ValueError("Entity counts must be >= 0.")
        finite = torch.isfinite(sums).all(dim=1)
        if not bool(finite.all()):
            bad = [entity_ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise ValueError(
                f"The sums of entities {bad[:10]} ({len(bad)} in all) hold NaN or inf: their vectors would be NaN. "
                "Rebuild them with a model that gives finite outputs (float16 overflows: build in float32), or "
                "leave those entities out."
            )
        self.entity_ids = entity_ids
        self.sums = sums
        self.counts = counts
        self.names: list[str | None] = [None] * len(entity_ids) if names is None else list(names)
        self.aliases: list[list[str]] = [[] for _ in entity_ids] if aliases is None else [list(a) for a in aliases]
        if len(self.names) != len(entity_ids) or len(self.aliases) != len(entity_ids):
            raise ValueError(
                f"{len(entity_ids)} entities but {len(self.names)} names and {len(self.aliases)} alias lists."
            )
        if norm <= 0:
            raise ValueError(f"norm must be positive, got {norm}.")
        self.norm = float(norm)
        self.metadata: dict[str, Any] = {key: None for key in REQUIRED_METADATA}
        self.metadata.update(metadata or {})
        if self.metadata["hidden_size"] not in (None, int(sums.shape[1])):
            raise ValueError(
                f"metadata says hidden_size {self.metadata['hidden_size']} but the sums have {sums.shape[1]} columns."
            )
        self.metadata["hidden_size"] = int(sums.shape[1])
        self._rows = self._row_index(entity_ids)

    @staticmethod
    def _row_index(entity_ids: list[str]) -> dict[str, int]:
        rows: dict[str, int] = {}
        for row, entity_id in enumerate(entity_ids):
            if entity_id in rows:
                raise ValueError(f"Entity {entity_id!r} appears twice in the table (rows {rows[entity_id]} and {row}).")
            rows[entity_id] = row
        return rows

    # ----- lookup ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entity_ids)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._rows

    def __repr__(self) -> str:
        return (
            f"EntityLookupTable(entities={len(self)}, hidden_size={self.hidden_size}, norm={self.norm}, "
            f"model={self.metadata.get('model_name_or_path')!r}, fingerprint={self.metadata.get('model_fingerprint')!r})"
        )

    @property
    def hidden_size(self) -> int:
        return int(self.sums.shape[1])

    def index(self, entity_id: str) -> int:
        """The row of `entity_id`; KeyError naming it when the table does not hold it."""
        try:
            return self._rows[entity_id]
        except KeyError:
            raise KeyError(f"Entity {entity_id!r} is not in the entity table ({len(self)} entities).") from None

    def vectors(self, indices: torch.Tensor | Sequence[int] | None = None, norm: float | None = None) -> torch.Tensor:
        """`sums[i] / ||sums[i]|| * norm` for the given rows (all rows when None), shaped indices.shape + (H,).

        Rows never seen while building (count 0) have no vector and raise, as do out-of-range rows (e.g. the -1
        padding of PELTTokenizer's outputs, which the caller must drop first).
        """
        norm = self.norm if norm is None else float(norm)
        rows = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long, device="cpu")
        if rows.numel() and bool(((rows < 0) | (rows >= len(self))).any()):
            bad = sorted(set(rows[(rows < 0) | (rows >= len(self))].tolist()))
            raise IndexError(f"Entity rows {bad[:10]} are outside the table's {len(self)} rows.")
        flat = rows.reshape(-1)
        empty = flat[self.counts[flat] == 0]
        if empty.numel():
            ids = [self.entity_ids[i] for i in sorted(set(empty.tolist()))[:10]]
            raise ValueError(
                f"Entities {ids} have no occurrences in the table (count 0), hence no vector: leave them as plain text."
            )
        picked = self.sums[flat]
        lengths = picked.norm(dim=-1, keepdim=True)
        if bool((lengths == 0).any()):
            raise ValueError("Some requested entity rows sum to the zero vector and cannot be normalised.")
        return (picked / lengths * norm).reshape(*rows.shape, self.hidden_size)

    # ----- model checks ----------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise EntityTableMismatchError unless `model` has the encoder weights that built this table (and, for a
        masked LM, the LM head transform that made its vectors).

        Accepts the masked LM that built it, its bare encoder, or a K-Adapter model/head on that encoder; the same
        weights in float32, float16 or bfloat16 pass (see hf_kadapter.utils.fingerprint).
        """
        expected = self.metadata.get("model_fingerprint")
        if not expected:
            logger.warning("The entity table records no model fingerprint; it cannot be checked against the model.")
            return
        unwrapped = _unwrap(model)
        stored = getattr(unwrapped.config, "base_fingerprint", None) if _is_kadapter(unwrapped) else None
        if stored:
            same = compare_fingerprints(stored, expected)
        else:
            same = tensors_match_fingerprint(base_tensors(_encoder(model)), expected)
        head_expected, head = self.metadata.get("lm_head_fingerprint"), lm_head_tensors(model)
        if same is not False and head_expected and head is not None:
            head_same = tensors_match_fingerprint(head, head_expected)
            if head_same is False:
                raise EntityTableMismatchError(
                    f"This entity table was built by {self._built_by()} whose masked-LM head transform has other "
                    f"weights (fingerprint {head_expected}) than the one of {_model_name(model)} (fingerprint "
                    f"{lm_head_fingerprint(model)}): the encoder is the same but the vectors were made by another "
                    "head. Use the model that built the table, or build a table for this model with "
                    "build_entity_table(model, tokenizer, corpus)."
                )
            same = same if head_same else None
        if same is None:
            logger.warning(
                "The entity table's fingerprint %s was written by an older hf_kadapter and cannot be verified "
                "against %s; save the table again to record a new one.",
                expected,
                _model_name(model),
            )
            return
        if not same:
            raise EntityTableMismatchError(
                f"This entity table was built by {self._built_by()} (model_type {self.metadata.get('model_type')}, "
                f"hidden size {self.hidden_size}, fingerprint {expected}), but the model given is {_model_name(model)} "
                f"with fingerprint {model_fingerprint(model)}. Entity vectors live in the embedding space of the model "
                "that built them and are meaningless in another one. Use the model that built the table, or build a "
                "table for this model with build_entity_table(model, tokenizer, corpus)."
            )

    def _built_by(self) -> str:
        return self.metadata.get("model_name_or_path") or "a model with random weights built from config"

    # ----- growing the table -----------------------------------------------------------------------------------
    def _check_compatible(self, other: EntityLookupTable) -> None:
        mine, theirs = self.metadata.get("model_fingerprint"), other.metadata.get("model_fingerprint")
        same = compare_fingerprints(mine, theirs) is not False and (
            compare_fingerprints(self.metadata.get("lm_head_fingerprint"), other.metadata.get("lm_head_fingerprint"))
            is not False
        )
        if other.hidden_size != self.hidden_size or not same:
            raise EntityTableMismatchError(
                f"Cannot merge an entity table built by {other.metadata.get('model_name_or_path')} (fingerprint "
                f"{theirs}, hidden size {other.hidden_size}) into one built by {self.metadata.get('model_name_or_path')} "
                f"(fingerprint {mine}, hidden size {self.hidden_size}): tables of different models live in different "
                "spaces. Build the new entities with the same model."
            )

    def add_entities(self, other: EntityLookupTable, on_duplicate: str = "sum") -> list[str]:
        """Add the entities of `other` (built by the same model, checked) in place; return the new ids.

        Existing rows are never recomputed: new ids are appended as rows after the existing ones (existing row
        indices do not move). For ids present in both tables, `on_duplicate` decides: "sum" (default) adds the
        sums and counts, as if both corpora had been one (so counts may then exceed max_occurrences); "keep"
        leaves the existing row bit-identical; "raise" refuses. Names missing here are taken from `other`, and
        aliases are united (existing first).
        """
        if on_duplicate not in ON_DUPLICATE:
            raise ValueError(f"on_duplicate={on_duplicate!r} is not supported; use one of {ON_DUPLICATE}.")
        self._check_compatible(other)
        shared = [e for e in other.entity_ids if e in self._rows]
        if shared and on_duplicate == "raise":
            raise ValueError(f"Entities {shared[:10]} are in both tables (pass on_duplicate='sum' or 'keep').")
        new_rows = [row for row, e in enumerate(other.entity_ids) if e not in self._rows]
        if shared and on_duplicate == "sum":
            mine = torch.tensor([self._rows[e] for e in shared], dtype=torch.long)
            theirs = torch.tensor([other.index(e) for e in shared], dtype=torch.long)
            self.sums[mine] += other.sums[theirs]
            self.counts[mine] += other.counts[theirs]
        for entity_id in shared:
            row, source = self._rows[entity_id], other.index(entity_id)
            if self.names[row] is None:
                self.names[row] = other.names[source]
            self.aliases[row] += [a for a in other.aliases[source] if a not in self.aliases[row]]
        if new_rows:
            picked = torch.tensor(new_rows, dtype=torch.long)
            self.sums = torch.cat([self.sums, other.sums[picked]])
            self.counts = torch.cat([self.counts, other.counts[picked]])
            for row in new_rows:
                self._rows[other.entity_ids[row]] = len(self.entity_ids)
                self.entity_ids.append(other.entity_ids[row])
                self.names.append(other.names[row])
                self.aliases.append(list(other.aliases[row]))
        self.metadata.setdefault("merged", []).append(
            {
                "entities": len(other),
                "new_entities": len(new_rows),
                "shared_entities": len(shared),
                "on_duplicate": on_duplicate,
                "num_occurrences": other.metadata.get("num_occurrences"),
                "max_occurrences": other.metadata.get("max_occurrences"),
                "seed": other.metadata.get("seed"),
            }
        )
        return [other.entity_ids[row] for row in new_rows]

    def merge(self, other: EntityLookupTable, on_duplicate: str = "sum") -> EntityLookupTable:
        """A new table with the entities of both (see add_entities); `self` and `other` are left untouched."""
        merged = self.copy()
        merged.add_entities(other, on_duplicate=on_duplicate)
        return merged

    def copy(self) -> EntityLookupTable:
        return EntityLookupTable(
            list(self.entity_ids),
            self.sums.clone(),
            self.counts.clone(),
            list(self.names),
            [list(a) for a in self.aliases],
            norm=self.norm,
            metadata=json.loads(json.dumps(self.metadata)),
        )

    # ----- saving and sharing ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the table's files into `save_directory` as one commit (hf_kadapter.utils.io.FolderCommit): a reader
        sees the old table or the new one, never a mix. Other files in the folder are left alone, and so is a
        README.md written by someone else (without this library's marker)."""
        with FolderCommit(save_directory) as staging:
            self.write_files(staging, save_directory)

    def write_files(self, folder: str | os.PathLike, final_directory: str | os.PathLike | None = None) -> None:
        """Write the table's files into `folder` directly (a commit's staging folder); the card is written unless
        `final_directory` holds a README.md by someone else."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"sums": self.sums.contiguous(), "counts": self.counts.contiguous()}
        metadata = {"format": "pt", "format_version": str(FORMAT_VERSION)}
        (folder / TENSORS_NAME).write_bytes(safetensors_bytes(tensors, metadata))
        vocab = {
            "format_version": FORMAT_VERSION,
            "entity_ids": self.entity_ids,
            "names": self.names,
            "aliases": self.aliases,
            "counts": self.counts.tolist(),
        }
        (folder / VOCAB_NAME).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        config = {
            "format_version": FORMAT_VERSION,
            "num_entities": len(self),
            "hidden_size": self.hidden_size,
            "norm": self.norm,
            "metadata": self.metadata,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        if card_is_ours(Path(final_directory or folder) / CARD_NAME):
            (folder / CARD_NAME).write_text(self._model_card(), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **download_kwargs: Any) -> EntityLookupTable:
        """Load a table from a folder written by save_pretrained or from a Hub repo (safetensors + JSON only).

        A local folder is read under its lock after any interrupted save in it is finished; a damaged file is
        named (DamagedFileError)."""
        unknown = set(download_kwargs) - set(_DOWNLOAD_KWARGS)
        if unknown:
            raise TypeError(f"Unexpected arguments {sorted(unknown)}; download options are {_DOWNLOAD_KWARGS}.")
        with reading_local(name_or_path):
            files = {}
            for name in _TABLE_FILES:
                path = cached_file(
                    str(name_or_path), name, _raise_exceptions_for_missing_entries=False, **download_kwargs
                )
                if path is None:
                    raise OSError(
                        f"{name_or_path} has no {name}: it is not an entity table saved with "
                        "EntityLookupTable.save_pretrained."
                    )
                files[name] = path
            config, vocab = read_json(files[CONFIG_NAME]), read_json(files[VOCAB_NAME])
            tensors = load_safetensors(files[TENSORS_NAME])
        for what, data in ((CONFIG_NAME, config), (VOCAB_NAME, vocab)):
            if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
                version = data.get("format_version") if isinstance(data, dict) else None
                raise ValueError(
                    f"{name_or_path}/{what} has format version {version}; this code reads version {FORMAT_VERSION}."
                )
        if set(tensors) != {"sums", "counts"}:
            raise ValueError(f"{name_or_path}/{TENSORS_NAME} holds {sorted(tensors)}, expected sums and counts.")
        missing = [key for key in ("entity_ids", "names", "aliases", "counts") if key not in vocab]
        missing += [f"{CONFIG_NAME}:{key}" for key in ("norm", "metadata") if key not in config]
        if missing:
            raise ValueError(f"{name_or_path}: {missing} missing from the table's files; save the table again.")
        if tensors["counts"].tolist() != vocab["counts"]:
            raise ValueError(
                f"{name_or_path}: the counts in {VOCAB_NAME} and {TENSORS_NAME} differ (files from different saves?)."
            )
        return cls(
            vocab["entity_ids"],
            tensors["sums"],
            tensors["counts"],
            vocab["names"],
            vocab["aliases"],
            norm=config["norm"],
            metadata=config["metadata"],
        )

    _hub_name = "This entity table"

    def _hub_base(self) -> str | None:
        return self.metadata.get("model_name_or_path")

    def _set_hub_base(self, name: str | None) -> None:
        self.metadata["model_name_or_path"] = name

    def _model_card(self) -> str:
        meta = self.metadata
        model = meta.get("model_name_or_path") or "(a model with random weights built from config)"
        seen = int((self.counts > 0).sum())
        return model_card(
            title="PELT entity lookup table",
            library_name=LIBRARY_NAME,
            base_model=meta.get("model_name_or_path") if is_hub_id(meta.get("model_name_or_path")) else None,
            tags=["pelt", "entity-embeddings", LIBRARY_NAME],
            body=(
                f"Entity vectors for the masked LM **{model}** (`{meta.get('model_type')}`, fingerprint "
                f"`{meta.get('model_fingerprint')}`): **{len(self):,} entities** ({seen:,} with vectors), "
                f"dimension {self.hidden_size}, normalised to L2 norm {self.norm:g} at use time.\n\n"
                f"Each row sums the model's masked-LM transform output at a mask that replaced the entity's mention, "
                f"over up to {meta.get('max_occurrences')} occurrences per entity (sampling seed {meta.get('seed')}; "
                f"{meta.get('num_occurrences')} occurrences in all). It only works with that model (or a K-Adapter "
                "model on its encoder): the weights fingerprint is checked."
            ),
            usage=(
                "from hf_kadapter import EntityLookupTable, PELTModel\n\n"
                'table = EntityLookupTable.from_pretrained("<this repo>")\n'
                "plugged = PELTModel(model, table)  # model: the masked LM that built it (checked)\n"
                'vector = table.vectors([table.index("<entity id>")])'
            ),
        )


__all__ = ["EntityLookupTable", "EntityTableMismatchError", "lm_head_fingerprint", "model_fingerprint"]

"""Plugging a PELT entity lookup table into a model: the slot tokens' input embeddings become entity vectors.

PELT (Ye et al., 2022) needs no new parameters: an entity vector lives in the model's word-embedding space
(it is the LM head's transform output at a masked mention), so it is fed where a word embedding would be. The
tokenizer hook (`PELTTokenizer`) writes " (" + slot + " )" after each linked mention and says where the slots are;
here the slots' rows of `get_input_embeddings()(input_ids)` are replaced by the table's normalised vectors and the
model runs on `inputs_embeds`. Positions and attention are exactly those the model would use for `input_ids`, so
with no slots the output is the plain model's, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..utils.hub import (
    LIBRARY_NAME,
    HubMixin,
    card_is_ours,
    is_hub_id,
    model_card,
    pop_push_kwargs,
    split_download_kwargs,
)
from ..utils.io import WEIGHTS_PATTERNS, FolderCommit, reading_local
from ..utils.modeling import (
    build_inner_model,
    config_property,
    eval_mode,
    keep_pretrained_weights,
    model_init_kwargs,
    reapply_freezing,
    save_with_companion,
    source_name,
)
from .configuration_pelt import TABLE_SUBFOLDER, PELTConfig
from .table import EntityLookupTable, EntityTableMismatchError

Slots = torch.Tensor | Sequence[Sequence[int]] | Sequence[int] | None

__all__ = ["PELTModel", "PELTPreTrainedModel", "fill_mask", "pelt_inputs_embeds", "pelt_position_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _input_embeddings(model: nn.Module) -> nn.Module:
    """The word-embedding module of a masked LM, a bare encoder or a K-Adapter model/head (via `.kadapter`)."""
    if isinstance(model, PELTModel):
        model = model.model
    if not hasattr(model, "get_input_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DistributedDataParallel and similar wrappers
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        inner = getattr(model, "kadapter", None)
        if inner is not None:
            return inner.get_input_embeddings()
        raise TypeError(
            f"{type(model).__name__} has no get_input_embeddings(): PELT needs a transformers model (or a "
            "K-Adapter model) whose word embeddings can be replaced through inputs_embeds."
        ) from None


def _position_embedder(model: nn.Module) -> nn.Module | None:
    """The embeddings module that derives position ids from input_ids (RoBERTa-style: padding-aware), if any.

    Why: RoBERTa numbers positions from padding_idx + 1 skipping padding when it sees input_ids, but numbers
    them 0..L-1 (+ offset) blindly when it sees inputs_embeds; left padding or padding in the middle of a packed
    batch would then shift every position. We compute the ids as the model would from input_ids instead.
    """
    for module in model.modules():
        if callable(getattr(module, "create_position_ids_from_input_ids", None)) and hasattr(module, "padding_idx"):
            return module
    return None


def pelt_position_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Position ids the model would compute from `input_ids`, or None when it does not look at the ids for that.

    Pass them with `inputs_embeds` so a plugged run uses the same positions as a plain one (BERT: None, its
    positions do not depend on the ids; RoBERTa, XLM-R, CamemBERT ...: padding-aware ids).
    """
    embedder = _position_embedder(model.model if isinstance(model, PELTModel) else model)
    if embedder is None:
        return None
    flat = input_ids.reshape(-1, input_ids.shape[-1])
    return embedder.create_position_ids_from_input_ids(flat, embedder.padding_idx).reshape(input_ids.shape)


def _as_slot_tensor(value: Slots, rows: int, name: str, device: torch.device) -> torch.Tensor:
    """Slots as a LongTensor [rows, max_entities] padded with -1 (accepts tensors and ragged lists)."""
    if value is None:
        return torch.full((rows, 0), -1, dtype=torch.long, device=device)
    if isinstance(value, torch.Tensor):
        tensor = value.to(device=device, dtype=torch.long)
    else:
        lists = list(value)
        if lists and not isinstance(lists[0], (list, tuple, torch.Tensor)):
            lists = [lists]
        width = max((len(row) for row in lists), default=0)
        tensor = torch.full((len(lists), width), -1, dtype=torch.long)
        for i, row in enumerate(lists):
            tensor[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        tensor = tensor.to(device)
    if tensor.numel() == 0:
        return torch.full((rows, 0), -1, dtype=torch.long, device=device)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)  # one example's slots
    tensor = tensor.reshape(-1, tensor.shape[-1])  # [batch, choices, E] -> [batch * choices, E]
    if tensor.shape[0] != rows:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but the inputs have {rows} sequences: give one row of slots per "
            "sequence, padded with -1 (as PELTTokenizer returns them)."
        )
    return tensor


def _slots(
    input_ids: torch.Tensor, entity_positions: Slots, entity_ids: Slots
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, table index) of every used slot, validated against the inputs."""
    length = input_ids.shape[-1]
    rows = input_ids.numel() // max(length, 1)
    positions = _as_slot_tensor(entity_positions, rows, "entity_positions", input_ids.device)
    ids = _as_slot_tensor(entity_ids, rows, "entity_ids", input_ids.device)
    if positions.shape != ids.shape:
        raise ValueError(
            f"entity_positions {tuple(positions.shape)} and entity_ids {tuple(ids.shape)} must have the same "
            "shape: one table row per slot position."
        )
    used = positions >= 0
    if bool((used & (ids < 0)).any()) or bool((~used & (ids >= 0)).any()):
        raise ValueError("entity_positions and entity_ids disagree on which slots are padding (-1).")
    row, column = used.nonzero(as_tuple=True)
    position, index = positions[row, column], ids[row, column]
    if bool((position >= length).any()):
        raise ValueError(
            f"entity_positions {sorted(set(position[position >= length].tolist()))} are outside the sequence "
            f"length {length}: the inputs were truncated after the slots were placed; tokenize with PELTTokenizer, "
            "whose truncation drops whole slots."
        )
    return row, position, index


# ---------------------------------------------------------------------------------------------------------------
# The plug
# ---------------------------------------------------------------------------------------------------------------
def pelt_inputs_embeds(
    model: nn.Module,
    table: EntityLookupTable,
    input_ids: torch.Tensor,
    entity_positions: Slots,
    entity_ids: Slots,
    norm: float | None = None,
) -> torch.Tensor:
    """`model.get_input_embeddings()(input_ids)` with each slot's row replaced by its normalised entity vector.

    `entity_positions` / `entity_ids`: [batch, max_entities] (-1 = no slot), as PELTTokenizer returns them, or
    ragged lists. Any leading shape works ([batch, choices, length] for multiple choice). `norm` overrides the
    table's (7 in the paper). The result keeps the graph to the embeddings, so the model can still be trained.
    """
    embeds = _input_embeddings(model)(input_ids)
    row, position, index = _slots(input_ids, entity_positions, entity_ids)
    if row.numel() == 0:
        return embeds
    size = len(table)
    if bool((index >= size).any()):
        raise ValueError(
            f"entity_ids {sorted(set(index[index >= size].tolist()))[:10]} are outside the table ({size} entities): "
            "they were produced with another table; build the PELTTokenizer from this one."
        )
    if table.hidden_size != embeds.shape[-1]:
        raise EntityTableMismatchError(
            f"The entity table's vectors have {table.hidden_size} dimensions but the word embeddings of "
            f"{type(model).__name__} have {embeds.shape[-1]}: the table was built by another model. Build one for "
            "this model with build_entity_table(model, tokenizer, corpus)."
        )
    vectors = table.vectors(index.cpu(), norm=norm).to(device=embeds.device, dtype=embeds.dtype)
    flat = embeds.reshape(-1, embeds.shape[-2], embeds.shape[-1])
    flat = flat.index_put((row, position), vectors)  # out of place: autograd-safe
    return flat.reshape(embeds.shape)


class PELTPreTrainedModel(HubMixin, PreTrainedModel):
    config_class = PELTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # forward passes extra keywords on to the wrapped model; Trainer must still scale the loss for accumulation.
    accepts_loss_kwargs = False
    _hub_name = "This PELT model"

    def _init_weights(self, module: nn.Module) -> None:
        """PELT adds no parameters: the wrapped model initialises its own (transformers dispatches to it)."""


class PELTModel(PELTPreTrainedModel):
    """A model with an entity lookup table plugged into its input: forward takes PELTTokenizer's outputs.

    Works for masked LMs (AutoModelForMaskedLM: BERT, RoBERTa ...), bare encoders, and K-Adapter models and heads
    (their forward takes inputs_embeds). `check=True` verifies the table was built by this model's weights
    (EntityTableMismatchError otherwise): vectors from another model are meaningless in this one's input space.

    `PELTModel(model, table)` wraps a loaded model; `PELTModel(config)` (what `from_pretrained` calls) builds the
    wrapped model from `config.wrapped_config`, and `from_pretrained` then loads its weights and the table (saved
    beside them in `entity_table/`, or from `config.entity_table`).
    """

    def __init__(
        self,
        model: nn.Module | PELTConfig,
        table: EntityLookupTable | None = None,
        check: bool = True,
        norm: float | None = None,
    ):
        if isinstance(model, PELTConfig):
            config = model
            model = build_inner_model(config.wrapped_class, config.wrapped_config, config.wrapped_init_kwargs)
        else:
            config = PELTConfig(
                wrapped_config=model.config,
                wrapped_class=type(model).__name__,
                wrapped_init_kwargs=model_init_kwargs(model),
                base_model_name_or_path=source_name(model),
                norm=norm,
                check_table=check,
            )
            keep_pretrained_weights(model)
        super().__init__(config)
        self.model = model
        self.table: EntityLookupTable | None = None
        self.post_init()
        if table is not None:
            self.set_table(table, check=check)
        self.train(model.training)  # a fresh module says training=True; keep the wrapped model's mode

    norm = config_property()

    def set_table(self, table: EntityLookupTable, check: bool | None = None) -> None:
        """Plug `table` in; `check` (default `config.check_table`) refuses a table built by other weights."""
        if self.config.check_table if check is None else check:
            table.check_model(self.model)
        self.table = table

    def get_input_embeddings(self) -> nn.Module:
        return _input_embeddings(self.model)

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def inputs_embeds(
        self, input_ids: torch.Tensor, entity_positions: Slots = None, entity_ids: Slots = None
    ) -> torch.Tensor:
        """The plugged input embeddings (see pelt_inputs_embeds)."""
        if self.table is None:
            raise ValueError(
                "This PELTModel has no entity table: pass one (PELTModel(model, table), set_table(table)) or load "
                "a saved PELT model with from_pretrained, which restores its table."
            )
        return pelt_inputs_embeds(self.model, self.table, input_ids, entity_positions, entity_ids, self.norm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        entity_positions: Slots = None,
        entity_ids: Slots = None,
        labels: torch.Tensor | None = None,
        head_entity_positions: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Run the wrapped model with the slots' embeddings replaced.

        Without slots (None, empty, or all -1) the wrapped model gets `input_ids` itself: exactly its own output.
        `head_entity_positions` is passed on as the wrapped model's own `entity_positions` argument (the marker
        position of KAdapterForEntityTyping), since `entity_positions` here means the PELT slots.
        Other keywords (position_ids, output_hidden_states, return_dict ...) go to the wrapped model.
        """
        inputs = dict(model_kwargs)
        for key, value in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("labels", labels),
            ("entity_positions", head_entity_positions),
        ):
            if value is not None:
                inputs[key] = value
        row, _, _ = _slots(input_ids, entity_positions, entity_ids)
        if row.numel() == 0:
            return self.model(input_ids=input_ids, **inputs)
        if inputs.get("position_ids") is None:
            position_ids = pelt_position_ids(self.model, input_ids)
            if position_ids is not None:
                inputs["position_ids"] = position_ids
        embeds = self.inputs_embeds(input_ids, entity_positions, entity_ids)
        return self.model(inputs_embeds=embeds, **inputs)

    def fill_mask(self, pelt_tokenizer: Any, text: str | list[str], **kwargs: Any) -> list:
        """`fill_mask(self, pelt_tokenizer, self.table, text, ...)`: top-k predictions at the real masks."""
        return fill_mask(self, pelt_tokenizer, self.table, text, **kwargs)

    # ----- saving and loading ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, save_table: bool | None = None, **kwargs: Any
    ) -> None:
        """Weights and config (transformers' format) plus the table in `entity_table/` and a model card.

        `save_table=None` saves the table unless `config.entity_table` says where it comes from (a Hub id or the
        folder of a saved table: checkpoints then stay small); `save_table=False` requires that record.
        """
        if self.table is None and (save_table or self.config.entity_table is None):
            raise ValueError("This PELTModel has no entity table to save: plug one in with set_table(table) first.")
        if not kwargs.get("is_main_process", True):
            return
        push = pop_push_kwargs(kwargs)
        folder = Path(save_directory)
        # Weights, table and card as one folder commit (hf_kadapter.utils.io): never new weights beside an old table.
        with FolderCommit(folder, stale=(*WEIGHTS_PATTERNS, f"{TABLE_SUBFOLDER}/**")) as staging:
            with_table = save_with_companion(
                lambda: super(PELTModel, self).save_pretrained(staging, **kwargs),
                self.config,
                "entity_table",
                save_table,
                "entity table",
            )
            if with_table:
                self.table.write_files(staging / TABLE_SUBFOLDER, folder / TABLE_SUBFOLDER)
            if card_is_ours(folder / "README.md"):
                (staging / "README.md").write_text(self._model_card(), encoding="utf-8")
        if push is not None:
            self.push_to_hub(push.pop("repo_id", None) or folder.name, save_table=save_table, **push, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        table: EntityLookupTable | None = None,
        check_table: bool | None = None,
        **kwargs: Any,
    ):
        """Load the wrapped model's weights and its table (saved beside them, or from `config.entity_table`);
        `table=` plugs another one in. A table from elsewhere is checked against the weights (`config.check_table`,
        or `check_table=`); the one saved beside them is not: fine-tuning moves the weights, and they belong together.
        """
        with reading_local(pretrained_model_name_or_path):  # finishes an interrupted save first
            return cls._from_pretrained(pretrained_model_name_or_path, *model_args, table=table,
                                        check_table=check_table, **kwargs)  # fmt: skip

    @classmethod
    def _from_pretrained(cls, pretrained_model_name_or_path, *model_args, table=None, check_table=None, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        reapply_freezing(model)
        if table is None:
            download = split_download_kwargs(kwargs)[0]
            source = model.config.entity_table
            if source is None:
                table = EntityLookupTable.from_pretrained(
                    pretrained_model_name_or_path, subfolder=TABLE_SUBFOLDER, **download
                )
                # Saved together: the pair belongs together even after fine-tuning changed the model's weights.
                check_table = False if check_table is None else check_table
            else:
                table = EntityLookupTable.from_pretrained(source, **download)
        model.set_table(table, check=check_table)
        return loaded

    def _hub_base(self) -> str | None:
        return self.config.base_model_name_or_path

    def _set_hub_base(self, name: str | None) -> None:
        self.config.base_model_name_or_path = name

    def _model_card(self) -> str:
        config = self.config
        entities = "no table" if self.table is None else f"{len(self.table):,} entities"
        source = "saved in `entity_table/`" if config.entity_table is None else f"loaded from `{config.entity_table}`"
        return model_card(
            title=f"PELT: {config.wrapped_class} with an entity lookup table",
            library_name=LIBRARY_NAME,
            base_model=config.base_model_name_or_path if is_hub_id(config.base_model_name_or_path) else None,
            tags=["pelt", "entity-embeddings", LIBRARY_NAME],
            body=(
                f"A `{config.wrapped_class}` (base: {config.base_model_name_or_path or 'random weights'}) with a PELT "
                f"entity lookup table plugged into its input ({entities}, {source}). Inputs come from "
                "`hf_kadapter.PELTTokenizer`, which writes an entity slot after each linked mention."
            ),
            usage=(
                "import hf_kadapter\n\n"
                'model = hf_kadapter.PELTModel.from_pretrained("<this repo>")  # weights + entity table\n'
                "# inputs: hf_kadapter.PELTTokenizer(tokenizer, model.table)(text, entities=..., return_tensors='pt')"
            ),
        )


# ---------------------------------------------------------------------------------------------------------------
# Fill-mask
# ---------------------------------------------------------------------------------------------------------------
def _wrapped_tokenizer(pelt_tokenizer: Any) -> Any:
    return getattr(pelt_tokenizer, "tokenizer", pelt_tokenizer)


@torch.no_grad()
def fill_mask(
    model: nn.Module,
    pelt_tokenizer: Any,
    table: EntityLookupTable,
    text: str | list[str],
    entities: list[dict] | list[list[dict]] | None = None,
    link: bool = False,
    top_k: int = 5,
    use_entities: bool = True,
    norm: float | None = None,
    check: bool = True,
) -> list[list[tuple[str, float]]] | list[list[list[tuple[str, float]]]]:
    """Top-k (token, probability) at each REAL mask token of `text` (slot tokens are not masks to fill).

    `use_entities=False` runs the same text with no slots (the plain model), so both predictions can be compared.
    `model` is a masked LM (or a PELTModel around one). For one text the result is a list with one entry per mask
    (in order); for a list of texts, one such list per text.
    """
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if single and entities is not None:
        entities = [entities]
    plugged = model if isinstance(model, PELTModel) else PELTModel(model, table, check=check, norm=norm)
    tokenizer = _wrapped_tokenizer(pelt_tokenizer)
    if use_entities:
        encoding = pelt_tokenizer(texts, entities=entities, link=link, padding=True, return_tensors="pt")
    else:
        encoding = pelt_tokenizer(texts, padding=True, return_tensors="pt")
    input_ids = encoding["input_ids"]
    positions = encoding.get("entity_positions") if use_entities else None
    ids = encoding.get("entity_ids") if use_entities else None
    device = next(plugged.model.parameters()).device
    kwargs = {
        key: encoding[key].to(device) for key in ("attention_mask", "token_type_ids") if encoding.get(key) is not None
    }
    with eval_mode(plugged):  # no dropout while predicting; the caller's mode comes back afterwards
        output = plugged(
            input_ids.to(device),
            entity_positions=None if positions is None else torch.as_tensor(positions),
            entity_ids=None if ids is None else torch.as_tensor(ids),
            **kwargs,
        )
    logits = output.logits if hasattr(output, "logits") else output[0]
    if logits.dim() != 3:
        raise TypeError(
            f"{type(plugged.model).__name__} does not return per-token vocabulary logits: fill_mask needs a masked "
            "LM (AutoModelForMaskedLM)."
        )
    is_mask = input_ids == tokenizer.mask_token_id
    if positions is not None:
        row, position, _ = _slots(input_ids, positions, ids)
        is_mask[row, position] = False
    results: list[list[list[tuple[str, float]]]] = []
    for i in range(len(texts)):
        per_mask = []
        for position in is_mask[i].nonzero().flatten().tolist():
            probabilities = logits[i, position].float().softmax(-1)
            scores, token_ids = probabilities.topk(top_k)
            per_mask.append(
                [
                    (tokenizer.decode([token_id]).strip(), round(float(score), 6))
                    for token_id, score in zip(token_ids.tolist(), scores.tolist(), strict=True)
                ]
            )
        results.append(per_mask)
    return results[0] if single else results

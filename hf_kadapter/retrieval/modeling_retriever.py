"""REALM-style retriever embedder: a BERT-like encoder, [CLS]/mean pooling and a linear projection.

Saved folders are written as one folder commit (hf_kadapter.utils.io), like every artefact of the package.

`RetrieverEmbedder.embed_queries` / `embed_documents` give `[B, D]` embeddings whose inner product is the
retrieval score f(x, z) of REALM. Documents are tokenised by the caller as `title [SEP] text` (a text pair).
With `shared=True` (default) one encoder + projection serves both; with `shared=False` queries and documents have
their own copies (REALM's Embed_input and Embed_doc).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import init
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..kadapter.modeling_kadapter import _bare_encoder
from ..kadapter.modeling_kadapter import _base_init_kwargs as _encoder_init_kwargs
from ..utils.hub import push_folder_to_hub
from ..utils.io import FolderCommit, check_safetensors, reading_folder
from .configuration_retriever import RetrieverEmbedderConfig


@dataclass
class RetrieverEmbedderOutput(ModelOutput):
    """query_embeddings `[Bq, D]` and/or document_embeddings `[Bd, D]`; scores `[Bq, Bd]` when both are given."""

    query_embeddings: torch.FloatTensor | None = None
    document_embeddings: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None


class RetrieverTower(nn.Module):
    """Encoder + pooling + projection for one side (queries or documents)."""

    def __init__(self, config: RetrieverEmbedderConfig):
        super().__init__()
        self.encoder = AutoModel.from_config(config.encoder_config, **_encoder_init_kwargs(config.encoder_config))
        self.pooling = config.pooling
        self.projection = (
            nn.Linear(config.encoder_config.hidden_size, config.projection_dim)
            if config.projection_dim is not None
            else nn.Identity()
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if inputs_embeds is not None:
            kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if attention_mask is None:
                pooled = hidden.mean(dim=1)
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.projection(pooled)


class RetrieverEmbedderPreTrainedModel(PreTrainedModel):
    config_class = RetrieverEmbedderConfig
    base_model_prefix = "embedder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    accepts_loss_kwargs = False

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' save_pretrained, committed as a whole (a kill never leaves new weights beside an old config);
        other files in the folder are kept."""
        if not kwargs.get("is_main_process", True):
            return
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        with FolderCommit(save_directory, stale=("model*.safetensors*",)) as staging:
            super().save_pretrained(staging, *args, **kwargs)
        if push:
            self.push_to_hub(repo_id or Path(save_directory).name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """transformers' from_pretrained; a local folder is read after any interrupted save in it is finished, and a
        weights file cut short is named (DamagedFileError) rather than reported as "incomplete metadata"."""
        local = pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path)
        with reading_folder(pretrained_model_name_or_path) if local else contextlib.nullcontext():
            for weights in sorted(Path(pretrained_model_name_or_path).glob("*.safetensors")) if local else ():
                check_safetensors(weights)
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The projection: PyTorch's default Linear init. Encoder modules are initialised by the encoder's own
        `_init_weights` (transformers dispatches to sub-models), then overwritten by pretrained weights."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)


class RetrieverEmbedder(RetrieverEmbedderPreTrainedModel):
    """REALM-style dense retriever embedder (query and document towers, shared by default).

    Build it from pretrained encoder weights with `RetrieverEmbedder.from_encoder("bert-base-uncased")`, reload
    it with `from_pretrained` (safetensors) or `AutoModel.from_pretrained` after `import hf_kadapter`.
    """

    def __init__(self, config: RetrieverEmbedderConfig):
        super().__init__(config)
        self.query_tower = RetrieverTower(config)
        if not config.shared:
            self.document_tower = RetrieverTower(config)
        self.post_init()

    @property
    def document_tower(self) -> RetrieverTower:
        """The document side: the query tower itself when `config.shared` (saved once, no duplicate weights)."""
        tower = self._modules.get("document_tower")
        return self.query_tower if tower is None else tower

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    # ----- construction from pretrained encoder weights ------------------------------------------------------
    @classmethod
    def from_encoder(
        cls,
        name_or_model: str | os.PathLike | PreTrainedModel,
        *,
        encoder_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> RetrieverEmbedder:
        """Wrap pretrained BERT-like weights (a Hub name, a folder or a loaded model); `config_kwargs` are
        RetrieverEmbedderConfig fields (projection_dim, pooling, shared). The projection is freshly initialised."""
        if isinstance(name_or_model, (str, os.PathLike)):
            name = str(name_or_model)
            encoder_config = AutoConfig.from_pretrained(name)
            encoder = AutoModel.from_pretrained(name, **_encoder_init_kwargs(encoder_config), **(encoder_kwargs or {}))
        else:
            if encoder_kwargs:
                raise ValueError("encoder_kwargs only apply when the encoder is loaded from a name or folder.")
            encoder = _bare_encoder(name_or_model)
            name = encoder.config.name_or_path or None
        config = RetrieverEmbedderConfig(
            encoder_config=copy.deepcopy(encoder.config), encoder_name_or_path=name, **config_kwargs
        )
        model = cls(config)
        weights = encoder.state_dict()
        towers = [model.query_tower] if config.shared else [model.query_tower, model.document_tower]
        for tower in towers:
            missing, unexpected = tower.encoder.load_state_dict(weights, strict=False)
            missing = [k for k in missing if "pooler" not in k]
            unexpected = [k for k in unexpected if "pooler" not in k]
            if missing or unexpected:
                raise ValueError(
                    f"Encoder weights do not fit the embedder's encoder (missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]})."
                )
        return model.to(next(encoder.parameters()).dtype)

    # ----- embedding -----------------------------------------------------------------------------------------
    def embed_queries(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Query embeddings `[B, D]`."""
        return self.query_tower(input_ids, attention_mask, token_type_ids, inputs_embeds)

    def embed_documents(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Document embeddings `[B, D]` of `title [SEP] text` inputs."""
        return self.document_tower(input_ids, attention_mask, token_type_ids, inputs_embeds)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        document_input_ids: torch.Tensor | None = None,
        document_attention_mask: torch.Tensor | None = None,
        document_token_type_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> RetrieverEmbedderOutput | tuple:
        """Queries from `input_ids`, documents from `document_input_ids`; either or both.
        With both, `scores = query_embeddings @ document_embeddings.T` (in-batch retrieval logits)."""
        if input_ids is None and document_input_ids is None:
            raise ValueError("Give input_ids (queries) and/or document_input_ids (documents).")
        queries = self.embed_queries(input_ids, attention_mask, token_type_ids) if input_ids is not None else None
        documents = (
            self.embed_documents(document_input_ids, document_attention_mask, document_token_type_ids)
            if document_input_ids is not None
            else None
        )
        scores = queries @ documents.T if queries is not None and documents is not None else None
        output = RetrieverEmbedderOutput(query_embeddings=queries, document_embeddings=documents, scores=scores)
        return output if return_dict is not False else output.to_tuple()

    # ----- Hub -----------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload RetrieverEmbedder",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        **kwargs: Any,
    ):
        """Save (safetensors) into a temporary folder and upload it, creating the repo if needed."""
        return push_folder_to_hub(
            lambda folder: self.save_pretrained(folder, **kwargs),
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = ["RetrieverEmbedder", "RetrieverEmbedderOutput", "RetrieverEmbedderPreTrainedModel", "RetrieverTower"]

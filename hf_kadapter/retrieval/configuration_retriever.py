"""Configuration of the REALM-style retriever embedder (Guu et al., 2020): BERT-like encoder(s) + projection."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

POOLINGS = ("cls", "mean", "pooler")


@strict
class RetrieverEmbedderConfig(PreTrainedConfig):
    r"""
    Configuration of a `RetrieverEmbedder`: queries and documents are encoded by a BERT-like encoder, pooled
    ([CLS] or mean over the attention mask) and projected to `projection_dim` (REALM's Embed_input / Embed_doc).

    Args:
        encoder_config (`PreTrainedConfig` or `dict`):
            Configuration of the encoder (any AutoModel architecture with `last_hidden_state`).
        encoder_name_or_path (`str`, *optional*):
            Where the encoder weights came from (informative; the saved checkpoint holds all weights).
        projection_dim (`int`, *optional*, defaults to 128):
            Width of the embeddings; `None` keeps the pooled hidden state without projection.
        pooling (`str`, *optional*, defaults to `"cls"`):
            "cls" (first token), "mean" (masked mean over tokens) or "pooler" (the encoder's own pooler output, e.g.
            BERT's tanh(dense([CLS])), as REALM's embedder; the encoder is then built with its pooling layer).
        projection_layer_norm_eps (`float`, *optional*):
            When set, a LayerNorm with this epsilon follows the projection (REALM's embedder: 1e-12).
        shared (`bool`, *optional*, defaults to `True`):
            One encoder and projection for queries and documents; `False` gives each its own copy
            (both initialised from the same pretrained weights by `from_encoder`).
    """

    model_type = "realm_embedder"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: PreTrainedConfig | dict | None = None
    encoder_name_or_path: str | None = None
    projection_dim: int | None = 128
    pooling: str = "cls"
    shared: bool = True
    projection_layer_norm_eps: float | None = None

    def __post_init__(self, **kwargs):
        encoder_attn = getattr(self.encoder_config, "_attn_implementation_internal", None)
        super().__post_init__(**kwargs)
        if "attn_implementation" not in kwargs and encoder_attn is not None:
            self.encoder_config._attn_implementation_internal = encoder_attn
        self.validate_embedder()

    def validate_embedder(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; use one of {POOLINGS}.")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim} must be positive (or None for no projection).")

    @property
    def hidden_size(self) -> int:
        return self.encoder_config.hidden_size

    @property
    def embedding_dim(self) -> int:
        """Width of the query and document embeddings."""
        return self.projection_dim or self.encoder_config.hidden_size


__all__ = ["RetrieverEmbedderConfig"]

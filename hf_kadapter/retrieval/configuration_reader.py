"""Configuration of the open-domain QA reader (REALM / ORQA span scorer over retrieved documents)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ..utils.modeling import CompositeConfig


@strict
class OpenQAReaderConfig(CompositeConfig):
    r"""
    Configuration of an `OpenQAReader`: an encoder reading "[CLS] question [SEP] document [SEP]" and a span scorer.

    Args:
        encoder_config (`PreTrainedConfig` or `dict`):
            Configuration of the encoder (any BERT-like model, or a K-Adapter model).
        encoder_class (`str`):
            The encoder's class (a transformers or hf_kadapter class name), rebuilt by `from_pretrained`.
        encoder_init_kwargs (`dict`, *optional*):
            Extra constructor arguments of that class (e.g. `add_pooling_layer=False`).
        encoder_name_or_path (`str`, *optional*):
            The checkpoint the encoder came from (informative; the saved reader holds all weights).
        span_hidden_size (`int`, *optional*, defaults to 256):
            Hidden width of the span MLP (REALM: 256).
        max_span_width (`int`, *optional*, defaults to 10):
            Longest answer span, in tokens (REALM: 10).
        use_retrieval_score (`bool`, *optional*, defaults to `True`):
            Add the retrieval score f(x, z) to every span of document z.
        detach_retrieval (`bool`, *optional*, defaults to `False`):
            Do not train the retriever through the reader's loss.
        span_layer_norm_eps (`float`, *optional*):
            When set, a LayerNorm with this epsilon normalises the span MLP's hidden layer before its output, as
            REALM's reader does (1e-3); unset, the MLP has none.
    """

    model_type = "open_qa_reader"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: PreTrainedConfig | dict | None = None
    encoder_class: str = "BertModel"
    encoder_init_kwargs: dict | None = None
    encoder_name_or_path: str | None = None
    span_hidden_size: int = 256
    max_span_width: int = 10
    use_retrieval_score: bool = True
    detach_retrieval: bool = False
    span_layer_norm_eps: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.max_span_width < 1 or self.span_hidden_size < 1:
            raise ValueError(
                f"max_span_width={self.max_span_width} and span_hidden_size={self.span_hidden_size} must be positive."
            )

    @property
    def hidden_size(self) -> int:
        return self.encoder_config.hidden_size


__all__ = ["OpenQAReaderConfig"]

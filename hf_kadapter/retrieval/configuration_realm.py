"""Configuration of REALM's knowledge-augmented masked LM (Guu et al., 2020): a reader MLM + the retriever."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ..utils.modeling import CompositeConfig
from .configuration_retriever import RetrieverEmbedderConfig

RETRIEVER_SUBFOLDER = "retriever"


@strict
class RealmKnowledgeAugmentedMLMConfig(CompositeConfig):
    r"""
    Configuration of a `RealmKnowledgeAugmentedMLM`: the reader masked LM, the retriever's embedder, the top-k.

    Args:
        mlm_config (`PreTrainedConfig` or `dict`):
            Configuration of the masked LM reading [query ; document] (any `*ForMaskedLM`).
        mlm_class (`str`):
            Its class (a transformers or hf_kadapter class name), rebuilt by `from_pretrained`.
        mlm_name_or_path (`str`, *optional*):
            The checkpoint the masked LM came from (informative; the saved model holds all weights).
        embedder_config (`PreTrainedConfig` or `dict`):
            Configuration of the retriever's embedder (its weights are saved with the model).
        embedder_class (`str`):
            The embedder's class (default `RetrieverEmbedder`), rebuilt by `from_pretrained`.
        retriever (`str`, *optional*):
            Where the retriever's tokenizer, index and documents come from: `None` means the `retriever/` folder
            saved beside the weights; otherwise a Hub repo id or the folder of a saved RealmStyleRetriever.
        k (`int`, *optional*, defaults to 8):
            Documents retrieved per query (REALM pretraining: 8).
        add_null (`bool`, *optional*, defaults to `True`):
            Add the null document as candidate k + 1.
        doc_max_length (`int`, *optional*, defaults to 64):
            Tokens per retrieved document in the reader's input.
        marginalization (`str`, *optional*, defaults to `"span"`):
            `"span"`: log sum_z p(z|x) prod_t p(y_t|z,x), the paper's p(y|x) (the masked span is predicted from one
            document). `"token"`: sum_t log sum_z p(z|x) p(y_t|z,x), as REALM's released code and transformers' old
            RealmKnowledgeAugEncoder (each masked token marginalised over the documents on its own; the loss is the
            mean over masked tokens).
    """

    model_type = "realm_knowledge_augmented_mlm"
    sub_configs_defaults = {
        "mlm_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "embedder_config": SubConfigSpec(config_class=AutoConfig, model_type=RetrieverEmbedderConfig.model_type),
    }
    keys_to_ignore_at_inference = ["doc_ids", "num_truncated_documents"]

    mlm_config: PreTrainedConfig | dict | None = None
    mlm_class: str = "BertForMaskedLM"
    mlm_name_or_path: str | None = None
    embedder_config: PreTrainedConfig | dict | None = None
    embedder_class: str = "RetrieverEmbedder"
    retriever: str | None = None
    k: int = 8
    add_null: bool = True
    doc_max_length: int = 64
    marginalization: str = "span"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.k < 1:
            raise ValueError(f"k={self.k}: retrieve at least one document per query.")
        if self.marginalization not in ("span", "token"):
            raise ValueError(
                f"marginalization={self.marginalization!r}: use 'span' (the paper's product over the masked span) or "
                "'token' (REALM's released code: each masked token marginalised on its own)."
            )

    @property
    def hidden_size(self) -> int:
        return self.mlm_config.hidden_size


__all__ = ["RETRIEVER_SUBFOLDER", "RealmKnowledgeAugmentedMLMConfig"]

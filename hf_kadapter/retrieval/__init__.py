"""A REALM-style retriever (Guu et al., 2020): dense embedder, document index, retrieval with fresh scores,
and the training objectives (marginal likelihood, salient span masking, ICT, index refresh during training).

Importing registers `RetrieverEmbedderConfig` / `RetrieverEmbedder` (model_type "realm_embedder") with the Auto
classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration_retriever import RetrieverEmbedderConfig
from .index import DocumentIndex, exact_topk
from .modeling_retriever import RetrieverEmbedder, RetrieverEmbedderOutput
from .reader import OpenQAReader, ask, evaluate_open_qa, marginal_loss, prepare_reader_inputs
from .realm import (
    IndexRefreshCallback,
    RealmKnowledgeAugmentedMLM,
    ict_examples,
    ict_loss,
    realm_marginal_log_likelihood,
    salient_span_mask,
    salient_span_mlm_batch,
    salient_spans,
)
from .retriever import NULL_DOC_ID, RealmStyleRetriever, RetrievalOutput

AutoConfig.register(RetrieverEmbedderConfig.model_type, RetrieverEmbedderConfig, exist_ok=True)
AutoModel.register(RetrieverEmbedderConfig, RetrieverEmbedder, exist_ok=True)

__all__ = [
    "NULL_DOC_ID",
    "DocumentIndex",
    "IndexRefreshCallback",
    "OpenQAReader",
    "RealmKnowledgeAugmentedMLM",
    "RealmStyleRetriever",
    "RetrievalOutput",
    "RetrieverEmbedder",
    "RetrieverEmbedderConfig",
    "RetrieverEmbedderOutput",
    "ask",
    "evaluate_open_qa",
    "exact_topk",
    "ict_examples",
    "ict_loss",
    "marginal_loss",
    "prepare_reader_inputs",
    "realm_marginal_log_likelihood",
    "salient_span_mask",
    "salient_span_mlm_batch",
    "salient_spans",
]

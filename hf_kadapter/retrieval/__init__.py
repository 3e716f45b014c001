"""A REALM-style retriever (Guu et al., 2020): dense embedder, document index, retrieval with fresh scores,
the training objectives (marginal likelihood, salient span masking, ICT, index refresh during training), the
knowledge-augmented masked LM and the open-domain QA reader.

The models (`RetrieverEmbedder`, `RealmKnowledgeAugmentedMLM`, `OpenQAReader`) are registered with the Auto classes
when `hf_kadapter` is imported.
"""

from ..utils import io as _io
from . import modeling_retriever as _modeling
from .collator import RealmSalientSpanCollator, salient_span_features
from .configuration_reader import OpenQAReaderConfig
from .configuration_realm import RealmKnowledgeAugmentedMLMConfig
from .configuration_retriever import RetrieverEmbedderConfig
from .index import DocumentIndex, exact_topk
from .modeling_retriever import RetrieverEmbedder, RetrieverEmbedderOutput
from .reader import (
    OpenQAReader,
    ReaderOutput,
    ask,
    evaluate_open_qa,
    marginal_loss,
    predict,
    prepare_reader_inputs,
)
from .realm import (
    IndexRefreshCallback,
    RealmKnowledgeAugmentedMLM,
    RealmMLMOutput,
    ict_examples,
    ict_loss,
    realm_marginal_log_likelihood,
    realm_token_marginal_log_likelihood,
    salient_span_mask,
    salient_span_mlm_batch,
    salient_spans,
)
from .retriever import NULL_DOC_ID, RealmStyleRetriever, RetrievalOutput

# modeling_retriever.py (remote code) carries its own copies of the shared helpers; inside the package they raise the
# package's exception class, so there is one DamagedFileError to catch.
_modeling.DamagedFileError = _io.DamagedFileError

__all__ = [
    "NULL_DOC_ID",
    "DocumentIndex",
    "IndexRefreshCallback",
    "OpenQAReader",
    "OpenQAReaderConfig",
    "ReaderOutput",
    "RealmKnowledgeAugmentedMLM",
    "RealmKnowledgeAugmentedMLMConfig",
    "RealmMLMOutput",
    "RealmSalientSpanCollator",
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
    "predict",
    "prepare_reader_inputs",
    "realm_marginal_log_likelihood",
    "realm_token_marginal_log_likelihood",
    "salient_span_features",
    "salient_span_mask",
    "salient_span_mlm_batch",
    "salient_spans",
]

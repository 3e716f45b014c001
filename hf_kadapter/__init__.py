"""hf_kadapter: knowledge infusion for Hugging Face transformers models (K-Adapter, PELT, a REALM-style retriever).

The public API of the three methods is importable from here. Importing the package registers its models with the
transformers Auto classes, so `AutoModel.from_pretrained(<a saved folder or repo>)` works like for any built-in
model (K-Adapter checkpoints and retriever embedders also load with `trust_remote_code=True`, without the package).
The K-Adapter data loaders and metrics are imported on first use (they pull in `datasets` / `evaluate`).
"""

from __future__ import annotations

import importlib
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .kadapter import (
    CachedFeatureCollator,
    FeatureCache,
    KAdapterBaseMismatchError,
    KAdapterConfig,
    KAdapterForDependencyPretraining,
    KAdapterForEntityTyping,
    KAdapterForFactualPretraining,
    KAdapterForMultipleChoice,
    KAdapterForQuestionAnswering,
    KAdapterForRelationClassification,
    KAdapterForSequenceClassification,
    KAdapterForTokenClassification,
    KAdapterModel,
    KAdapterModelOutput,
    KAdapterPreTrainedModel,
    KnowledgeAdapterConfig,
    base_fingerprint,
    build_feature_cache,
    default_tap_layers,
)
from .pelt import (
    AliasLinker,
    EntityLookupTable,
    EntityTableMismatchError,
    PELTConfig,
    PELTDataCollator,
    PELTEncoding,
    PELTModel,
    PELTPreTrainedModel,
    PELTTokenizer,
    build_entity_table,
    fill_mask,
    lm_head_fingerprint,
    lm_head_transform,
    load_entity_corpus,
    model_fingerprint,
    pelt_inputs_embeds,
    pelt_position_ids,
)
from .retrieval import (
    NULL_DOC_ID,
    DocumentIndex,
    IndexRefreshCallback,
    OpenQAReader,
    OpenQAReaderConfig,
    ReaderOutput,
    RealmKnowledgeAugmentedMLM,
    RealmKnowledgeAugmentedMLMConfig,
    RealmMLMOutput,
    RealmSalientSpanCollator,
    RealmStyleRetriever,
    RetrievalOutput,
    RetrieverEmbedder,
    RetrieverEmbedderConfig,
    RetrieverEmbedderOutput,
    ask,
    evaluate_open_qa,
    exact_topk,
    ict_examples,
    ict_loss,
    marginal_loss,
    predict,
    prepare_reader_inputs,
    realm_marginal_log_likelihood,
    realm_token_marginal_log_likelihood,
    salient_span_features,
    salient_span_mask,
    salient_span_mlm_batch,
    salient_spans,
)
from .utils.fingerprint import FingerprintDtypeError, compare_fingerprints
from .utils.io import DamagedFileError, FolderCommit, reading_folder, recover_folder

__version__ = "0.1.0"

# (auto class, config class, model class): what `AutoX.from_pretrained(folder)` builds after `import hf_kadapter`.
_AUTO_CLASSES = (
    (AutoModel, KAdapterConfig, KAdapterModel),
    (AutoModelForSequenceClassification, KAdapterConfig, KAdapterForSequenceClassification),
    (AutoModelForTokenClassification, KAdapterConfig, KAdapterForTokenClassification),
    (AutoModelForQuestionAnswering, KAdapterConfig, KAdapterForQuestionAnswering),
    (AutoModelForMultipleChoice, KAdapterConfig, KAdapterForMultipleChoice),
    (AutoModel, PELTConfig, PELTModel),
    (AutoModelForMaskedLM, PELTConfig, PELTModel),  # a masked LM with entity slots (any wrapped model, in fact)
    (AutoModel, RetrieverEmbedderConfig, RetrieverEmbedder),
    (AutoModel, OpenQAReaderConfig, OpenQAReader),
    (AutoModel, RealmKnowledgeAugmentedMLMConfig, RealmKnowledgeAugmentedMLM),
)
# Classes shipped as remote code with their checkpoints (their folders get an auto_map).
_REMOTE_CODE = {KAdapterConfig: KAdapterModel, RetrieverEmbedderConfig: RetrieverEmbedder}


def _register() -> None:
    for config_class in dict.fromkeys(config for _, config, _ in _AUTO_CLASSES):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_class, config_class, model_class in _AUTO_CLASSES:
        auto_class.register(config_class, model_class, exist_ok=True)
    for config_class, model_class in _REMOTE_CODE.items():
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    for auto_class, config_class, model_class in _AUTO_CLASSES:
        if config_class is KAdapterConfig:
            model_class.register_for_auto_class(auto_class.__name__)


_register()

# Imported on first use: the K-Adapter data loaders (datasets, spaCy) and metrics (evaluate).
_LAZY = {
    "hf_kadapter.kadapter.data": (
        "DataFormatError",
        "DataReport",
        "KAdapterDataCollator",
        "build_label_vocab",
        "load_dependency_records",
        "load_entity_typing",
        "load_factual",
        "load_multiple_choice",
        "load_relation",
        "load_squad",
        "parse_dependencies",
        "postprocess_squad_predictions",
        "preprocess_dependency",
        "preprocess_entity_typing",
        "preprocess_factual",
        "preprocess_multiple_choice",
        "preprocess_relation",
        "preprocess_squad_eval",
        "preprocess_squad_train",
        "save_dependency_records",
    ),
    "hf_kadapter.kadapter.metrics": (
        "METRICS",
        "accuracy_compute_metrics",
        "argmax_logits",
        "entity_typing_compute_metrics",
        "load_metric",
        "relation_compute_metrics",
    ),
    # Converters from the original projects' checkpoints: imported on first use, so that their command lines
    # (`python -m hf_kadapter.kadapter.convert_original ...`) do not import their own module twice.
    "hf_kadapter.kadapter.convert_original": ("convert_kadapter_original",),
    # The knowledge benchmark: imported on first use (it loads the packaged suite and plotting only when run).
    "hf_kadapter.bench": ("load_wordnet_suite", "run_benchmark"),
    "hf_kadapter.retrieval.convert_realm_v4": (
        "convert_realm_v4_embedder",
        "convert_realm_v4_encoder",
        "convert_realm_v4_reader",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_kadapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    # K-Adapter
    "CachedFeatureCollator",
    "FeatureCache",
    "KAdapterBaseMismatchError",
    "KAdapterConfig",
    "KAdapterForDependencyPretraining",
    "KAdapterForEntityTyping",
    "KAdapterForFactualPretraining",
    "KAdapterForMultipleChoice",
    "KAdapterForQuestionAnswering",
    "KAdapterForRelationClassification",
    "KAdapterForSequenceClassification",
    "KAdapterForTokenClassification",
    "KAdapterModel",
    "KAdapterModelOutput",
    "KAdapterPreTrainedModel",
    "KnowledgeAdapterConfig",
    "base_fingerprint",
    "build_feature_cache",
    "default_tap_layers",
    *_LAZY_NAMES,
    # PELT
    "AliasLinker",
    "EntityLookupTable",
    "EntityTableMismatchError",
    "PELTConfig",
    "PELTDataCollator",
    "PELTEncoding",
    "PELTModel",
    "PELTPreTrainedModel",
    "PELTTokenizer",
    "build_entity_table",
    "fill_mask",
    "lm_head_fingerprint",
    "lm_head_transform",
    "load_entity_corpus",
    "model_fingerprint",
    "pelt_inputs_embeds",
    "pelt_position_ids",
    # Retrieval
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
    # reliability (hf_kadapter.utils): folder commits, named file errors, the weights fingerprint
    "DamagedFileError",
    "FingerprintDtypeError",
    "FolderCommit",
    "compare_fingerprints",
    "reading_folder",
    "recover_folder",
]

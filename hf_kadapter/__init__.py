"""hf_kadapter: knowledge infusion for Hugging Face transformers models.

Importing the package registers the K-Adapter classes with the transformers Auto classes, so
`AutoModel.from_pretrained(<a K-Adapter folder or repo>)` works like for any built-in model.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .kadapter import (
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
    KnowledgeAdapterConfig,
    base_fingerprint,
)
from .retrieval import RealmStyleRetriever  # noqa: E402  (registers the retriever's Auto classes)

__version__ = "0.1.0"

# Converters from the original projects' checkpoints, imported on first use: importing them here would make
# `python -m hf_kadapter.kadapter.convert_original` (their CLI) import the module twice.
_CONVERTERS = {
    "convert_kadapter_original": ".kadapter.convert_original",
    "convert_realm_v4_embedder": ".retrieval.convert_realm_v4",
    "convert_realm_v4_encoder": ".retrieval.convert_realm_v4",
    "convert_realm_v4_reader": ".retrieval.convert_realm_v4",
}


def __getattr__(name: str):
    if name in _CONVERTERS:
        import importlib

        return getattr(importlib.import_module(_CONVERTERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CONVERTERS])


_AUTO_CLASSES = {
    AutoModel: KAdapterModel,
    AutoModelForSequenceClassification: KAdapterForSequenceClassification,
    AutoModelForTokenClassification: KAdapterForTokenClassification,
    AutoModelForQuestionAnswering: KAdapterForQuestionAnswering,
    AutoModelForMultipleChoice: KAdapterForMultipleChoice,
}


def _register() -> None:
    AutoConfig.register(KAdapterConfig.model_type, KAdapterConfig, exist_ok=True)
    KAdapterConfig.register_for_auto_class()
    for auto_class, model_class in _AUTO_CLASSES.items():
        auto_class.register(KAdapterConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register()

__all__ = [
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
    "KnowledgeAdapterConfig",
    "RealmStyleRetriever",
    "base_fingerprint",
    "convert_kadapter_original",
    "convert_realm_v4_embedder",
    "convert_realm_v4_encoder",
    "convert_realm_v4_reader",
]

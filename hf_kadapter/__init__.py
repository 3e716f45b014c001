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
]

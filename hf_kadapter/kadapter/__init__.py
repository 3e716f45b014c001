"""K-Adapter: knowledge adapters beside a frozen pretrained encoder."""

from .configuration_kadapter import KAdapterConfig, KnowledgeAdapterConfig, default_tap_layers
from .feature_cache import CachedFeatureCollator, FeatureCache, build_feature_cache
from .modeling_kadapter import (
    KAdapterBaseMismatchError,
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
    base_fingerprint,
)

__all__ = [
    "CachedFeatureCollator",
    "FeatureCache",
    "build_feature_cache",
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
    "default_tap_layers",
]

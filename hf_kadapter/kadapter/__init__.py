"""K-Adapter: knowledge adapters beside a frozen pretrained encoder."""

from ..utils import fingerprint as _fingerprint
from ..utils import io as _io
from . import modeling_kadapter as _modeling
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

# modeling_kadapter.py (remote code) carries its own copies of the shared helpers; inside the package they raise the
# package's exception classes, so there is one DamagedFileError and one FingerprintDtypeError to catch.
_modeling.DamagedFileError = _io.DamagedFileError
_modeling.FingerprintDtypeError = _fingerprint.FingerprintDtypeError

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

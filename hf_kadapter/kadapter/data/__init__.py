"""K-Adapter data: record formats (T-REx, TACRED, Open Entity/FIGER, dependency heads, SQuAD, CosmosQA),
preprocessing into model inputs, and one collator for every head."""

from .collator import KAdapterDataCollator
from .dependency import (
    dependency_labels,
    load_dependency_records,
    load_spacy_parser,
    parse_dependencies,
    preprocess_dependency,
    save_dependency_records,
)
from .qa import (
    load_multiple_choice,
    load_squad,
    postprocess_squad_predictions,
    preprocess_multiple_choice,
    preprocess_squad_eval,
    preprocess_squad_train,
)
from .records import DataFormatError, DataReport, RecordError, insert_markers, load_records, prepare_word_tokenizer
from .relation import (
    PreprocessingError,
    build_label_vocab,
    load_entity_typing,
    load_factual,
    load_relation,
    preprocess_entity_typing,
    preprocess_factual,
    preprocess_relation,
)

__all__ = [
    "DataFormatError",
    "DataReport",
    "KAdapterDataCollator",
    "PreprocessingError",
    "RecordError",
    "build_label_vocab",
    "dependency_labels",
    "insert_markers",
    "load_dependency_records",
    "load_entity_typing",
    "load_factual",
    "load_multiple_choice",
    "load_records",
    "load_relation",
    "load_spacy_parser",
    "load_squad",
    "parse_dependencies",
    "postprocess_squad_predictions",
    "prepare_word_tokenizer",
    "preprocess_dependency",
    "preprocess_entity_typing",
    "preprocess_factual",
    "preprocess_multiple_choice",
    "preprocess_relation",
    "preprocess_squad_eval",
    "preprocess_squad_train",
    "save_dependency_records",
]

"""PELT (Ye et al., 2022): pluggable entity lookup tables computed from a masked LM's own output.

Build a table over a corpus (`build_entity_table`), share it (`EntityLookupTable.save_pretrained` /
`push_to_hub`), write entity slots after mentions (`PELTTokenizer`) and plug the vectors in (`PELTModel`).
"""

from .build import build_entity_table, lm_head_transform, load_entity_corpus
from .modeling_pelt import PELTModel, fill_mask, pelt_inputs_embeds, pelt_position_ids
from .table import EntityLookupTable, EntityTableMismatchError, lm_head_fingerprint, model_fingerprint
from .tokenization_pelt import AliasLinker, PELTEncoding, PELTTokenizer

__all__ = [
    "AliasLinker",
    "EntityLookupTable",
    "EntityTableMismatchError",
    "PELTEncoding",
    "PELTModel",
    "PELTTokenizer",
    "build_entity_table",
    "fill_mask",
    "lm_head_fingerprint",
    "lm_head_transform",
    "load_entity_corpus",
    "model_fingerprint",
    "pelt_inputs_embeds",
    "pelt_position_ids",
]

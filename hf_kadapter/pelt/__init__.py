"""PELT (Ye et al., 2022): pluggable entity lookup tables computed from a masked LM's own output.

Build a table over a corpus (`build_entity_table`), share it (`EntityLookupTable.save_pretrained` /
`push_to_hub`), write entity slots after mentions (`PELTTokenizer`), plug the vectors in (`PELTModel`, a
PreTrainedModel) and batch its inputs for Trainer (`PELTDataCollator`).
"""

from .build import build_entity_table, lm_head_transform, load_entity_corpus
from .collator import PELTDataCollator
from .configuration_pelt import PELTConfig
from .modeling_pelt import PELTModel, PELTPreTrainedModel, fill_mask, pelt_inputs_embeds, pelt_position_ids
from .table import EntityLookupTable, EntityTableMismatchError, lm_head_fingerprint, model_fingerprint
from .tokenization_pelt import AliasLinker, PELTEncoding, PELTTokenizer

__all__ = [
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
]

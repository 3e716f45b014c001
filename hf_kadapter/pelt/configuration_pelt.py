"""Configuration of `PELTModel`: a model with a PELT entity lookup table plugged into its input (Ye et al., 2022)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ..utils.modeling import CompositeConfig

TABLE_SUBFOLDER = "entity_table"


@strict
class PELTConfig(CompositeConfig):
    r"""
    Configuration of a `PELTModel`: the wrapped model's own config plus where the entity table comes from.

    Args:
        wrapped_config (`PreTrainedConfig` or `dict`):
            Configuration of the wrapped model (a masked LM, an encoder, a K-Adapter model or head).
        wrapped_class (`str`):
            Class of the wrapped model (a transformers or hf_kadapter class name), rebuilt by `from_pretrained`.
        wrapped_init_kwargs (`dict`, *optional*):
            Extra constructor arguments of that class (e.g. `add_pooling_layer=False`).
        base_model_name_or_path (`str`, *optional*):
            The checkpoint the wrapped model was loaded from (informative; the weights are saved with the model).
        entity_table (`str`, *optional*):
            Where `from_pretrained` loads the table from: `None` means the `entity_table/` folder saved beside the
            weights (the default of `save_pretrained`); otherwise a Hub repo id or a folder of a saved table.
        norm (`float`, *optional*):
            L2 norm of the plugged vectors; `None` uses the table's own (7 in the paper).
        check_table (`bool`):
            Refuse a table built by other weights than the wrapped model's (fingerprint check).
    """

    model_type = "pelt"
    sub_configs_defaults = {"wrapped_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    wrapped_config: PreTrainedConfig | dict | None = None
    wrapped_class: str = "BertForMaskedLM"
    wrapped_init_kwargs: dict | None = None
    base_model_name_or_path: str | None = None
    entity_table: str | None = None
    norm: float | None = None
    check_table: bool = True

    @property
    def hidden_size(self) -> int:
        return self.wrapped_config.hidden_size


__all__ = ["PELTConfig", "TABLE_SUBFOLDER"]

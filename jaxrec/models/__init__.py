"""Flax decoder-only LMs (GPT-2 and Llama families) and checkpoint conversion."""

from jaxrec.models.config import ModelConfig, gpt2_config, llama_config
from jaxrec.models.core import (
    count_params,
    forward,
    forward_cached,
    init_params,
    init_value_params,
    logical_axes,
    logits,
    make_model,
    project_logits,
    project_values,
    values,
)
from jaxrec.models.io import load_pretrained, save_pretrained
from jaxrec.models.llama2c import load_llama2c, save_llama2c
from jaxrec.models.transformer import (
    KVCache,
    LayerCache,
    LMOutput,
    causal_mask,
    init_cache,
    positions_from_valid,
)

__all__ = [
    "KVCache",
    "LMOutput",
    "LayerCache",
    "ModelConfig",
    "causal_mask",
    "count_params",
    "forward",
    "forward_cached",
    "gpt2_config",
    "init_cache",
    "init_params",
    "init_value_params",
    "llama_config",
    "load_llama2c",
    "load_pretrained",
    "logical_axes",
    "logits",
    "make_model",
    "positions_from_valid",
    "project_logits",
    "project_values",
    "save_llama2c",
    "save_pretrained",
    "values",
]

"""The model configuration lives in `jaxrec.config` (rank 0); re-exported here for models."""

from jaxrec.config import (
    ACTIVATIONS,
    ARCHITECTURES,
    DTYPES,
    FAMILIES,
    ROPE_STYLES,
    ModelConfig,
    gpt2_config,
    llama_config,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "DTYPES",
    "FAMILIES",
    "ROPE_STYLES",
    "ModelConfig",
    "gpt2_config",
    "llama_config",
]

"""jaxrec: fine-tune causal language models into recommender policies with RLHF-PPO, in JAX.

Public names are resolved lazily, so `import jaxrec.data` (numpy only) never imports jax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "models": "jaxrec.models",
    "generation": "jaxrec.generation",
    "data": "jaxrec.data",
    "ppo": "jaxrec.ppo",
    "sim": "jaxrec.sim",
    "codec": "jaxrec.codec",
    "train": "jaxrec.train",
    "ppo_step": "jaxrec.train",
    "make_iteration": "jaxrec.train",
    "PPOBatch": "jaxrec.train",
    "TrainState": "jaxrec.train",
    "create_train_state": "jaxrec.train",
    "PPOConfig": "jaxrec.config",
    "ModelConfig": "jaxrec.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxrec' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if _LAZY[name].endswith(name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

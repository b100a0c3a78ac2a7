"""Vectorised user simulators, gymnax style: `env, params = make_env(preset)`.

Presets register themselves when `make_env` or `presets` first runs, so importing this package
stays light. See `jaxrec.sim.core` for the interface and `jaxrec.sim.choice` for choice models.
"""

from jaxrec.sim.choice import (
    choice_from_uniform,
    logit_probs,
    proportional_probs,
    sample_choice,
)
from jaxrec.sim.core import Catalogue, Environment, Response, make_env, presets

__all__ = [
    "Catalogue",
    "Environment",
    "Response",
    "choice_from_uniform",
    "logit_probs",
    "make_env",
    "presets",
    "proportional_probs",
    "sample_choice",
]

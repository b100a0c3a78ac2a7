"""On-device sampling with a KV cache, allowed-token masks, and teacher-forced scoring."""

from jaxrec.generation.decode import (
    DecodeState,
    GenerationOutput,
    TokenConstraint,
    generate,
    generate_jit,
    left_pad,
)
from jaxrec.generation.sampling import (
    Greedy,
    Sampler,
    Temperature,
    TopK,
    TopKTopP,
    TopP,
    make_sampler,
)
from jaxrec.generation.scoring import Scores, score, token_logps

__all__ = [
    "DecodeState",
    "GenerationOutput",
    "Greedy",
    "Sampler",
    "Scores",
    "Temperature",
    "TokenConstraint",
    "TopK",
    "TopKTopP",
    "TopP",
    "generate",
    "generate_jit",
    "left_pad",
    "make_sampler",
    "score",
    "token_logps",
]

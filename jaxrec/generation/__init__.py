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
from jaxrec.generation.scoring import (
    Scores,
    SequenceScores,
    score,
    sequence_scores,
    token_logps,
)

__all__ = [
    "DecodeState",
    "GenerationOutput",
    "Greedy",
    "Sampler",
    "Scores",
    "SequenceScores",
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
    "sequence_scores",
    "token_logps",
]

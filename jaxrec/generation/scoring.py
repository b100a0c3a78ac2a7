"""Teacher-forced scoring of (prompt, completion) pairs: log-probs, entropy, values.

Shapes: B batch, P prompt length (left padded), R completion length, V vocab.
The completion token at column j is predicted from the hidden state at sequence position
P - 1 + j; its value V(s_j) is read at the same position (the state before the action).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.models import ModelConfig, forward, project_logits, project_values


@struct.dataclass
class Scores:
    logps: jax.Array  # [B, R] float32 log pi(token | prefix) at the given temperature, 0 on masked
    entropy: jax.Array  # [B, R] float32 entropy of that distribution, 0 on masked
    values: jax.Array | None  # [B, R] float32 V(state before the token), 0 on masked; or None


def _completion_hidden(cfg, params, prompt, prompt_valid, completion, completion_mask):
    """Hidden states [B, R, D] that predict each completion token."""
    p = prompt.shape[1]
    r = completion.shape[1]
    tokens = jnp.concatenate([prompt, completion], axis=1)  # [B, P + R]
    valid = jnp.concatenate([prompt_valid, completion_mask], axis=1)
    hidden = forward(cfg, params, tokens, valid, head="none").hidden  # [B, P + R, D]
    return hidden[:, p - 1 : p - 1 + r]


def token_logps(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0,
                allowed: jax.Array | None = None):
    """logits [B, R, V], tokens [B, R] -> (log-probs [B, R], entropy [B, R]) at a temperature.

    With `allowed` [B, R, V] bool, the distribution is renormalised over the allowed tokens:
    the one constrained decoding actually sampled from.
    """
    scaled = logits.astype(jnp.float32) / temperature
    if allowed is not None:
        scaled = jnp.where(allowed, scaled, -1e30)
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.where(logprobs > -1e29, jnp.exp(logprobs) * logprobs, 0.0), axis=-1)
    return picked, entropy


def score(
    cfg: ModelConfig,
    params: dict,
    prompt: jax.Array,  # [B, P] int32, left padded
    prompt_valid: jax.Array,  # [B, P] bool
    completion: jax.Array,  # [B, R] int32
    completion_mask: jax.Array,  # [B, R] bool
    *,
    temperature: float = 1.0,
    value_params: dict | None = None,
    shared_value: bool = False,
) -> Scores:
    """Per-token log-probs and entropy of `completion` under `params`, and optionally values.

    Values come from a separate value network (`value_params`, same config) or, with
    `shared_value`, from the value head stored in `params` on the policy's own trunk.
    """
    hidden = _completion_hidden(cfg, params, prompt, prompt_valid, completion, completion_mask)
    logps, entropy = token_logps(project_logits(cfg, params, hidden), completion, temperature)
    values = None
    if shared_value:
        values = project_values(params, hidden)
    elif value_params is not None:
        v_hidden = _completion_hidden(
            cfg, value_params, prompt, prompt_valid, completion, completion_mask
        )
        values = project_values(value_params, v_hidden)
    m = completion_mask
    return Scores(
        logps=jnp.where(m, logps, 0.0),
        entropy=jnp.where(m, entropy, 0.0),
        values=None if values is None else jnp.where(m, values, 0.0),
    )


@struct.dataclass
class SequenceScores:
    logps: jax.Array  # [B, T] float32 log pi(token_t | tokens_<t); 0 at t = 0 and on padding
    entropy: jax.Array  # [B, T] float32 entropy of the distribution that produced token t
    values: jax.Array | None  # [B, T] float32 V(state before token t), or None


def sequence_scores(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,  # [B, T] int32 (prompt and completion in one row, left padded)
    valid: jax.Array,  # [B, T] bool, False on padding
    *,
    temperature: float = 1.0,
    value_params: dict | None = None,
    shared_value: bool = False,
    window: int | None = None,
    allowed: jax.Array | None = None,
) -> SequenceScores:
    """Teacher-forced per-token scores aligned with token positions (what PPO trains on):
    entry t is about token t, predicted from the hidden state at t - 1.

    With `window` W, only the last W tokens are scored (the LM head, its [.., V] softmax and the
    value head run there only; earlier entries are 0): for single-turn rollouts, whose actions
    are the completion at the end of each row, this skips the vocabulary work on the prompt.
    `allowed` [B, W, V] bool (needs `window`) renormalises each scored distribution over the
    tokens constrained decoding allowed at that step.
    """
    if allowed is not None and window is None:
        raise ValueError("sequence_scores: `allowed` masks need `window` (the scored tokens)")
    t = tokens.shape[1]
    w = t - 1 if window is None else min(int(window), t - 1)
    # positions t-1-w .. t-2 predict the window: the last block runs its queries, MLP and
    # the heads on the last w + 1 positions only
    hidden = forward(cfg, params, tokens, valid, head="none", keep_last=w + 1).hidden[:, :w]
    logps, entropy = token_logps(project_logits(cfg, params, hidden), tokens[:, t - w :],
                                 temperature, allowed)  # [B, W]
    values = None
    if shared_value:
        values = project_values(params, hidden)
    elif value_params is not None:
        v_hidden = forward(cfg, value_params, tokens, valid, head="none", keep_last=w + 1).hidden
        values = project_values(value_params, v_hidden[:, :w])

    def align(x):  # [B, W] -> [B, T], zero before the window and on padding
        x = jnp.pad(x, ((0, 0), (t - w, 0)))
        return jnp.where(valid, x, 0.0)

    return SequenceScores(
        logps=align(logps),
        entropy=align(entropy),
        values=None if values is None else align(values),
    )

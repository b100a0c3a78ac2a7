"""On-device generation: one prefill pass, then a `lax.while_loop` of cached decode steps.

Shapes: B batch, P prompt length (left padded), R max new tokens, S = P + R cache slots, V vocab.

The prompt fills cache slots [0, P); the token sampled at step i is written at slot P + i when
it is fed back at step i + 1. Rows share the write slot (left padding aligns the prompts' ends),
and each row's positions skip its padding, so a padded row computes what it would alone.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.generation.sampling import Greedy, Sampler
from jaxrec.models import (
    KVCache,
    ModelConfig,
    forward_cached,
    init_cache,
    positions_from_valid,
    project_logits,
)


class TokenConstraint(Protocol):
    """An allowed-token mask that may change at every step (e.g. valid catalogue items).

    Implementations are pytrees (e.g. `flax.struct.dataclass`) so their tables can be traced.
    """

    def init(self, batch: int) -> Any:
        """The per-row constraint state before the first generated token."""

    def allowed(self, state: Any) -> jax.Array:
        """[B, V] bool: tokens allowed at this step."""

    def update(self, state: Any, tokens: jax.Array) -> Any:
        """The state after each row emitted `tokens` [B] int32."""


@struct.dataclass
class GenerationOutput:
    tokens: jax.Array  # [B, R] int32, pad_id after a row's EOS
    logps: jax.Array  # [B, R] float32 log-prob of each token under the sampling distribution
    mask: jax.Array  # [B, R] bool, True for generated tokens (the EOS included)
    lengths: jax.Array  # [B] int32 generated tokens per row


@struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32, tokens sampled so far (== the next column to fill)
    cache: KVCache  # S slots per row
    key_valid: jax.Array  # [B, S] bool, slots holding real tokens
    position: jax.Array  # [B] int32, position of the last sampled token
    tokens: jax.Array  # [B, R] int32
    logps: jax.Array  # [B, R] float32
    mask: jax.Array  # [B, R] bool
    done: jax.Array  # [B] bool, the row emitted EOS
    key: jax.Array  # PRNG key
    constraint_state: Any  # the constraint's pytree, or None


def _sample_into(state: DecodeState, logits, sampler, constraint, eos_id, pad_id) -> DecodeState:
    """Sample column `state.step` from logits [B, V] and record it."""
    key, k_sample = jax.random.split(state.key)
    allowed = None if constraint is None else constraint.allowed(state.constraint_state)
    token, logp = sampler.sample(k_sample, logits, allowed)  # [B], [B]
    live = ~state.done
    token = jnp.where(live, token, pad_id)
    col = state.step
    cstate = state.constraint_state
    if constraint is not None:
        cstate = constraint.update(cstate, token)
    return state.replace(
        tokens=state.tokens.at[:, col].set(token),
        logps=state.logps.at[:, col].set(jnp.where(live, logp, 0.0)),
        mask=state.mask.at[:, col].set(live),
        done=state.done | (live & (token == eos_id)),
        step=col + 1,
        key=key,
        constraint_state=cstate,
    )


def generate(
    cfg: ModelConfig,
    params: dict,
    prompt: jax.Array,  # [B, P] int32, left padded
    prompt_valid: jax.Array,  # [B, P] bool, False on padding (each row needs one real token)
    key: jax.Array,
    *,
    sampler: Sampler | None = None,  # None: Greedy()
    max_new_tokens: int,
    constraint: TokenConstraint | None = None,
    eos_id: int | None = None,  # None: cfg.eos_id; -1: never stop early
) -> GenerationOutput:
    """Sample up to `max_new_tokens` per row; rows stop at EOS, the loop when all have.

    Pure and traceable: jit it with `cfg`, `sampler`, `max_new_tokens` and `eos_id` static
    (`generate_jit` does), and it compiles once per (B, P, R).
    """
    sampler = sampler or Greedy()
    b, p = prompt.shape
    r = max_new_tokens
    eos = cfg.eos_id if eos_id is None else eos_id
    pad = max(cfg.pad_id, 0)
    s = p + r

    # Prefill: the whole prompt in one pass; only the last position's logits are needed.
    key_valid = jnp.concatenate([prompt_valid, jnp.zeros((b, r), jnp.bool_)], axis=1)  # [B, S]
    positions = positions_from_valid(prompt_valid)  # [B, P]
    slot = jnp.arange(s)
    causal = slot[None, :] <= jnp.arange(p)[:, None]  # [P, S]
    attn_mask = causal[None] & key_valid[:, None, :]  # [B, P, S]
    out = forward_cached(
        cfg, params, prompt, positions, attn_mask, init_cache(cfg, b, s), head="none",
        prefill=True, last_only=True,
    )
    logits = project_logits(cfg, params, out.hidden)[:, 0]  # [B, V]

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=out.cache,
        key_valid=key_valid,
        position=positions[:, -1],
        tokens=jnp.full((b, r), pad, jnp.int32),
        logps=jnp.zeros((b, r), jnp.float32),
        mask=jnp.zeros((b, r), jnp.bool_),
        done=jnp.zeros((b,), jnp.bool_),
        key=key,
        constraint_state=None if constraint is None else constraint.init(b),
    )
    state = _sample_into(state, logits, sampler, constraint, eos, pad)

    def cond(state: DecodeState):
        return (state.step < r) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        last = state.tokens[:, state.step - 1]  # [B] the token to feed back
        write = p + state.step - 1  # its cache slot
        key_valid = state.key_valid.at[:, write].set(True)
        position = state.position + 1
        out = forward_cached(
            cfg, params, last[:, None], position[:, None], key_valid[:, None, :], state.cache,
            head="none",
        )
        logits = project_logits(cfg, params, out.hidden)[:, 0]  # [B, V]
        state = state.replace(cache=out.cache, key_valid=key_valid, position=position)
        return _sample_into(state, logits, sampler, constraint, eos, pad)

    state = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(
        tokens=state.tokens,
        logps=state.logps,
        mask=state.mask,
        lengths=state.mask.sum(axis=-1).astype(jnp.int32),
    )


generate_jit = jax.jit(
    generate, static_argnums=0, static_argnames=("sampler", "max_new_tokens", "eos_id")
)
generate_jit.__doc__ = "`generate`, jitted with the config, sampler and lengths static."


def left_pad(sequences: list[list[int]], length: int | None = None, pad_id: int = 0):
    """Host-side helper: token lists -> (tokens [B, P] int32, valid [B, P] bool), left padded.

    Sequences longer than `length` keep their last `length` tokens.
    """
    import numpy as np

    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    length = length or max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        tokens[i, length - len(seq) :] = seq
        valid[i, length - len(seq) :] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


__all__ = [
    "DecodeState",
    "GenerationOutput",
    "TokenConstraint",
    "generate",
    "generate_jit",
    "left_pad",
]

"""Reward shaping: sequence scores on each turn's last action token minus beta * KL per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrec.ppo.kl import kl_estimate
from jaxrec.ppo.stats import masked_mean, masked_var, masked_whiten


def last_token_positions(mask: jax.Array) -> jax.Array:
    """[B, T] bool -> [B] int32 index of each row's last True (0 for an empty row)."""
    t = mask.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(mask, idx, 0), axis=-1)


def place_scores(scores: jax.Array, positions: jax.Array, length: int) -> jax.Array:
    """Scatter per-turn scores [B, N] onto tokens at positions [B, N] -> [B, T] float32.

    Positions < 0 are dropped (turns that did not happen)."""
    b = scores.shape[0]
    ok = positions >= 0
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], positions.shape)
    out = jnp.zeros((b, length), jnp.float32)
    return out.at[rows, jnp.where(ok, positions, 0)].add(jnp.where(ok, scores, 0.0))


def apply_penalties(
    scores: jax.Array,  # [B] or [B, N]
    *,
    has_eos: jax.Array | None = None,  # same shape, bool
    valid: jax.Array | None = None,  # same shape, bool (the completion named a real item)
    missing_eos_penalty: float = 0.0,  # added (usually negative) where has_eos is False
    invalid_penalty: float = 0.0,  # added where valid is False
) -> jax.Array:
    if has_eos is not None:
        scores = scores + jnp.where(has_eos, 0.0, missing_eos_penalty)
    if valid is not None:
        scores = scores + jnp.where(valid, 0.0, invalid_penalty)
    return scores


def normalize_scores(scores, mask=None, clip: float | None = None, eps: float = 1e-8):
    """Batch-normalise scores to mean 0, std 1 (over `mask`), then clip to [-clip, clip]."""
    mask = jnp.ones(scores.shape, jnp.bool_) if mask is None else mask
    mean, var = masked_mean(scores, mask), masked_var(scores, mask)
    out = (scores - mean) * jax.lax.rsqrt(var + eps)
    return clip_scores(out, clip)


def clip_scores(scores: jax.Array, clip: float | None) -> jax.Array:
    return scores if clip is None else jnp.clip(scores, -clip, clip)


def shape_rewards(
    token_scores: jax.Array,  # [B, T] float32, each turn's score on its last action token
    logp: jax.Array,  # [B, T] behaviour log-probs of the action tokens
    ref_logp: jax.Array,  # [B, T] reference log-probs of the same tokens
    mask: jax.Array,  # [B, T] bool, action tokens
    kl_coef: jax.Array | float,
    *,
    kl_kind: str = "k1",
    whiten: bool = False,
) -> tuple[jax.Array, dict]:
    """r_t = score_t - beta * KL_t on action tokens (0 elsewhere); optionally whitened with the
    mean kept (so the reward scale, not its sign, is normalised).

    Returns (rewards [B, T], metrics) with the mean KL per sequence (sum over tokens, mean over
    rows), which the adaptive controller consumes.
    """
    kl = jnp.where(mask, kl_estimate(logp, ref_logp, kl_kind), 0.0)  # [B, T]
    rewards = jnp.where(mask, token_scores - kl_coef * kl, 0.0)
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    rows = jnp.any(mask, axis=-1)
    metrics = {
        "kl/ref": masked_mean(kl.sum(-1), rows),  # per sequence
        "kl/ref_per_token": masked_mean(kl, mask),
        "kl/coef": jnp.asarray(kl_coef, jnp.float32),
        "reward/score_mean": masked_mean(token_scores.sum(-1), rows),
        "reward/shaped_mean": masked_mean(rewards.sum(-1), rows),
    }
    return rewards, metrics

"""Generalised advantage estimation over token sequences with masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array,  # [B, T] float32 per-token rewards
    values: jax.Array,  # [B, T] float32 V(s_t), the value before emitting token t
    mask: jax.Array,  # [B, T] bool, True on action tokens (the policy's own tokens)
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns, [B, T] each (0 where masked).

    Over the action tokens t_1 < t_2 < ... of a row (masked tokens are skipped, so prompt and
    observation tokens of a multi-turn session do not count as steps):

        delta_k = r_{t_k} + gamma * V(t_{k+1}) - V(t_k)        with V(t_{n+1}) = 0
        A_k     = delta_k + gamma * lam * A_{k+1}                with A_{n+1}    = 0
        R_k     = A_k + V(t_k)

    Computed by a reverse `lax.scan` whose carry (next value, next advantage) passes through
    masked steps unchanged.
    """
    mask = mask.astype(jnp.bool_)
    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)

    def step(carry, inputs):
        next_value, next_adv = carry  # [B], [B]
        r, v, m = inputs  # [B] each
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    b = rewards.shape[0]
    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
    xs = (rewards.T, values.T, mask.T)  # time-major [T, B]
    _, adv_t = jax.lax.scan(step, init, xs, reverse=True)
    advantages = adv_t.T  # [B, T]
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns

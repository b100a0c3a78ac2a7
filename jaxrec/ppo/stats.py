"""Masked statistics with explicit numerators and denominators.

Every reduction returns sums and counts (or takes them), so a mean over minibatches or devices
is sum(numerators) / sum(denominators), never a mean of means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_count(mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(mask.astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1): 0 where nothing is unmasked."""
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over the unmasked entries (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(x, mask)
    count = masked_count(mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over unmasked entries; with shift_mean=False the mean is kept.

    Masked entries come out 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask, white, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over unmasked tokens (1 is perfect, <0 worse
    than predicting the mean)."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)

"""PPO losses, each returning (loss, metrics).

Shapes: [B, T] per-token arrays; `mask` marks the tokens that count. Every mean is
sum(x * mask) / den, where `den` defaults to the local mask count; a data-parallel caller
passes the global count (a psum over devices) so the per-device losses add up to the exact
global token mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrec.ppo.stats import explained_variance, masked_count, masked_mean, masked_sum


def _mean(x, mask, den):
    den = jnp.maximum(masked_count(mask), 1.0) if den is None else den
    return masked_sum(x, mask) / den


def policy_loss(
    logp: jax.Array,  # [B, T] log pi_theta(a_t | s_t)
    old_logp: jax.Array,  # [B, T] behaviour log-probs (from the rollout)
    advantages: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T] bool
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    den: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Clipped surrogate (Schulman et al. 2017), with an asymmetric range and dual clip:

        rho_t = exp(logp_t - old_logp_t)
        l_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high))
        dual clip (Ye et al. 2020), for A_t < 0 only: l_t = min(l_t, -A_t * dual_clip)
        loss  = sum_t l_t * m_t / den
    """
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = jnp.where(
            advantages < 0, jnp.minimum(per_token, -advantages * dual_clip), per_token
        )
    loss = _mean(per_token, mask, den)
    ratio_mean = masked_mean(ratio, mask)
    metrics = {
        "ppo/policy_loss": loss,
        "ppo/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        # k3 estimate of KL(old || new) under the old policy's samples: (rho - 1) - log rho
        "ppo/approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ppo/ratio_mean": ratio_mean,
        "ppo/ratio_var": masked_mean(jnp.square(ratio - ratio_mean), mask),
    }
    return loss, metrics


def value_loss(
    values: jax.Array,  # [B, T] V_theta
    old_values: jax.Array,  # [B, T] values at rollout time
    returns: jax.Array,  # [B, T] GAE returns
    mask: jax.Array,
    *,
    clip: float | None = 0.2,
    den: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Clipped value loss:

        V_clip = old_V + clip(V - old_V, -c, c)
        loss   = 1/2 * sum_t max((V_t - R_t)^2, (V_clip_t - R_t)^2) * m_t / den
    (no clip: 1/2 * mean (V - R)^2)
    """
    err = jnp.square(values - returns)
    if clip is None:
        per_token, clipfrac = err, jnp.zeros((), jnp.float32)
    else:
        step = values - old_values
        v_clip = old_values + jnp.clip(step, -clip, clip)
        err_clip = jnp.square(v_clip - returns)
        per_token = jnp.maximum(err, err_clip)
        # tokens whose clipped error is the larger one; inside the range V_clip = V up to
        # rounding, which must not count
        clipped = (jnp.abs(step) > clip) & (err_clip > err)
        clipfrac = masked_mean(clipped.astype(jnp.float32), mask)
    loss = 0.5 * _mean(per_token, mask, den)
    metrics = {
        "ppo/value_loss": loss,
        "ppo/value_clipfrac": clipfrac,
        "ppo/explained_variance": explained_variance(old_values, returns, mask),
        "ppo/value_mean": masked_mean(values, mask),
    }
    return loss, metrics


def entropy_bonus(entropy: jax.Array, mask: jax.Array, den=None) -> tuple[jax.Array, dict]:
    """Mean per-token entropy (the step subtracts coef * this from the loss)."""
    ent = _mean(entropy, mask, den)
    return ent, {"ppo/entropy": masked_mean(entropy, mask)}


def ptx_loss(sft_logp: jax.Array, sft_mask: jax.Array, den=None) -> tuple[jax.Array, dict]:
    """PPO-ptx (Ouyang et al. 2022): the supervised NLL L(theta) = -mean log pi(y | x) on SFT
    tokens; the objective is max E[R] - alpha * L(theta)."""
    nll = -_mean(sft_logp, sft_mask, den)
    return nll, {"ppo/ptx_nll": -masked_mean(sft_logp, sft_mask)}

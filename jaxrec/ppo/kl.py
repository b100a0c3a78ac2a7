"""KL estimators per token and KL-coefficient controllers (state in, state out)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, same shape as the inputs.

    With log r = ref_logp - logp (Schulman, "Approximating KL divergence", 2020):
      k1 = -log r = logp - ref_logp                (unbiased, can be negative)
      k2 = (log r)^2 / 2                           (biased, low variance, >= 0)
      k3 = (r - 1) - log r                         (unbiased, >= 0)
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    if kind == "k3":
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"kl kind {kind!r} is not allowed; choose one of {KL_KINDS}")


@struct.dataclass
class KLState:
    coef: jax.Array  # [] float32, the current beta
    last_kl: jax.Array  # [] float32, the KL the last update saw


def init_kl(coef: float) -> KLState:
    return KLState(coef=jnp.asarray(coef, jnp.float32), last_kl=jnp.zeros((), jnp.float32))


def fixed_kl_update(state: KLState, kl: jax.Array, n_steps: int | jax.Array = 1) -> KLState:
    """The fixed controller: beta never changes (the KL is recorded for logging)."""
    del n_steps
    return state.replace(last_kl=jnp.asarray(kl, jnp.float32))


def adaptive_kl_update(
    state: KLState, kl: jax.Array, n_steps: int | jax.Array, target: float, horizon: float
) -> KLState:
    """Ziegler et al. (2019), a proportional controller on log beta:

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `kl` is the measured mean KL per sequence of the batch just collected, `n_steps` the
    number of samples (sequences) in it.
    """
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    coef = state.coef * (1.0 + error * n_steps / horizon)
    return KLState(coef=coef.astype(jnp.float32), last_kl=jnp.asarray(kl, jnp.float32))

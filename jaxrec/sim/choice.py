"""Choice models: which item of a slate (if any) a user picks.

All functions act on ONE user's slate of K scored items; callers vmap. Probabilities come back
as [K + 1], the last entry being the no-click option, so `choice == K` means no click.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_probs(
    scores: jax.Array,  # [K] float32 utilities of the slate's items
    no_click_logit: float | jax.Array,  # utility of not clicking (-inf: always click)
    position_bias: jax.Array | None = None,  # [K] float32 added to each slot's utility
) -> jax.Array:
    """Multinomial logit: p(i) = exp(s_i + b_i) / (exp(s_nc) + sum_j exp(s_j + b_j)). [K + 1]."""
    if position_bias is not None:
        scores = scores + position_bias
    logits = jnp.append(scores, jnp.asarray(no_click_logit, scores.dtype))
    return jax.nn.softmax(logits)


def proportional_probs(
    scores: jax.Array,  # [K] float32
    no_click_mass: float | jax.Array,
    min_normalizer: float | jax.Array,  # <= min possible score, so every mass is >= 0
    position_bias: jax.Array | None = None,  # [K] multiplicative attention per slot
) -> jax.Array:
    """Multinomial proportional (RecSim): p(i) = (s_i - m) / sum_j (s_j - m), no-click included.

    RecSim subtracts `min_normalizer` from every score and from the no-click mass alike, then
    normalises; a position bias scales each slot's mass (1 everywhere leaves RecSim's model).
    """
    masses = jnp.append(scores, jnp.asarray(no_click_mass, scores.dtype)) - min_normalizer
    if position_bias is not None:
        masses = masses.at[:-1].multiply(position_bias)
    masses = jnp.maximum(masses, 0.0)
    return masses / jnp.sum(masses)


def choose_from_slate(
    u: jax.Array,  # [] uniform in [0, 1)
    utility: jax.Array,  # [K] float32, -inf-like (or very negative) where invalid
    no_click_logit: float | jax.Array,
    position_bias: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Multinomial-logit choice over a slate: (position [] in [0, K], clicked, slot).

    `slot` is the clicked position, or K - 1 when nothing was clicked (a safe index)."""
    k = utility.shape[0]
    probs = logit_probs(utility, no_click_logit, position_bias)  # [K + 1]
    position = choice_from_uniform(u, probs)
    return position, position < k, jnp.minimum(position, k - 1)


def sample_choice(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw from probs [K + 1] -> int32 in [0, K] (K = no click), by inverse CDF."""
    u = jax.random.uniform(key, (), jnp.float32)
    return choice_from_uniform(u, probs)


def choice_from_uniform(u: jax.Array, probs: jax.Array) -> jax.Array:
    """Inverse CDF with a given uniform u in [0, 1): lets a batched step draw all u at once.

    Counts the cdf entries <= u (numpy's `searchsorted(side="right")`, as `np.random.choice`
    does), so an option with zero probability is never chosen, even at u = 0.
    """
    cdf = jnp.cumsum(probs)
    idx = jnp.sum(cdf <= u * cdf[-1])
    return jnp.minimum(idx, probs.shape[-1] - 1).astype(jnp.int32)

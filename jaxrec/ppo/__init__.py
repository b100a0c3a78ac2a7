"""PPO math as pure functions of arrays and floats (imports jax and flax.struct only)."""

from jaxrec.ppo.gae import gae
from jaxrec.ppo.kl import (
    KL_KINDS,
    KLState,
    adaptive_kl_update,
    fixed_kl_update,
    init_kl,
    kl_estimate,
)
from jaxrec.ppo.losses import entropy_bonus, policy_loss, ptx_loss, value_loss
from jaxrec.ppo.shaping import (
    apply_penalties,
    clip_scores,
    last_token_positions,
    normalize_scores,
    place_scores,
    shape_rewards,
)
from jaxrec.ppo.stats import (
    explained_variance,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "KLState",
    "KL_KINDS",
    "adaptive_kl_update",
    "apply_penalties",
    "clip_scores",
    "entropy_bonus",
    "explained_variance",
    "fixed_kl_update",
    "gae",
    "init_kl",
    "kl_estimate",
    "last_token_positions",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "place_scores",
    "policy_loss",
    "ptx_loss",
    "shape_rewards",
    "value_loss",
]

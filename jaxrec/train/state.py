"""The PPO train state and its optimizers."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrec.config import ModelConfig, PPOConfig
from jaxrec.models import init_value_params
from jaxrec.ppo import KLState, init_kl


@struct.dataclass
class TrainState:
    """Everything the PPO update reads and writes. Trainable and frozen params are kept apart:
    the optimizers see only `policy` and `value`, so LoRA can later make `policy` the adapters
    and `frozen["base"]` the base weights without reshaping anything else."""

    step: jax.Array  # [] int32, optimizer steps taken (policy)
    policy: Any  # trainable policy params (with the value head when shared_value)
    value: Any  # trainable value-network params ({} with a shared trunk)
    frozen: Any  # {"ref": frozen reference policy params}
    policy_opt: Any  # optax state of policy_tx
    value_opt: Any  # optax state of value_tx
    kl: KLState  # the KL controller's state (beta)
    model: ModelConfig = struct.field(pytree_node=False)
    policy_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    value_tx: optax.GradientTransformation = struct.field(pytree_node=False)


def learning_rate(peak: float, cfg: PPOConfig) -> optax.Schedule:
    """Linear warm-up to `peak`, then constant, linear or cosine decay over total_steps."""
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.lr_schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.lr_schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


@functools.lru_cache(maxsize=64)
def make_optimizer(peak_lr: float, cfg: PPOConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; accumulated over `grad_accum` minibatches.

    Cached: the same settings give the same (stateless) transformation object, so two states
    built from one config have equal tree structures (jit caches and shardings match them)."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate(peak_lr, cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    )
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def create_train_state(
    model: ModelConfig,
    cfg: PPOConfig,
    policy_params: Any,
    value_params: Any | None = None,
    ref_params: Any | None = None,
) -> TrainState:
    """A fresh state. The reference defaults to a copy of the policy; the value network to one
    initialised from the policy's backbone (or, with shared_value, a head on the policy)."""
    policy_params = jax.tree.map(jnp.asarray, policy_params)
    if cfg.shared_value:
        if "value_head" not in policy_params:
            d = policy_params["embed"].shape[1]
            policy_params = {
                **policy_params,
                "value_head": jnp.zeros((d,), jnp.float32),
                "value_bias": jnp.zeros((), jnp.float32),
            }
        value_params = {}
    elif value_params is None:
        value_params = init_value_params(policy_params)
    if ref_params is None:
        ref_params = {k: v for k, v in policy_params.items() if not k.startswith("value_")}
        ref_params = jax.tree.map(jnp.copy, ref_params)
    policy_tx = make_optimizer(cfg.policy_lr, cfg)
    value_tx = make_optimizer(cfg.value_lr, cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        policy=policy_params,
        value=value_params,
        frozen={"ref": ref_params},
        policy_opt=policy_tx.init(policy_params),
        value_opt=value_tx.init(value_params),
        kl=init_kl(cfg.kl_coef),
        model=model,
        policy_tx=policy_tx,
        value_tx=value_tx,
    )

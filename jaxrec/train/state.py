"""The PPO train state and its optimizers."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrec.config import LoRAConfig, ModelConfig, PPOConfig
from jaxrec.models import init_value_params, lora
from jaxrec.ppo import KLState, init_kl


@struct.dataclass
class TrainState:
    """Everything the PPO update reads and writes. Trainable and frozen params are kept apart:
    the optimizers see only `policy` and `value`.

    Full fine-tuning: `policy` and `value` are whole networks, `frozen["ref"]` the reference.
    LoRA (`lora` set): `policy` and `value` are adapter trees (the value's with its head) on
    the one frozen `frozen["base"]`, which is also the reference. Read the params a forward
    pass needs through `policy_params`, `value_params` and `ref_params`, never the fields."""

    step: jax.Array  # [] int32, minibatch updates applied (optimizer steps x grad_accum)
    policy: Any  # trainable policy params or adapters (with the value head when shared_value)
    value: Any  # trainable value-network params or adapters + head ({} with a shared trunk)
    frozen: Any  # {"ref": reference params} or, with LoRA, {"base": base params}; + "reward"
    policy_opt: Any  # optax state of policy_tx
    value_opt: Any  # optax state of value_tx
    kl: KLState  # the KL controller's state (beta)
    model: ModelConfig = struct.field(pytree_node=False)
    policy_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    value_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lora: LoRAConfig | None = struct.field(pytree_node=False, default=None)

    def _on_base(self, trainable):
        return trainable if self.lora is None else lora.attach(
            self.frozen["base"], trainable, self.lora.scale)

    def policy_params(self, policy: Any = None) -> Any:
        """The policy's forward-pass params: `policy` (default self.policy), with LoRA
        grafted onto the frozen base (differentiable in the adapters)."""
        return self._on_base(self.policy if policy is None else policy)

    def value_params(self, value: Any = None) -> Any:
        """The separate value network's forward-pass params (see `policy_params`)."""
        return self._on_base(self.value if value is None else value)

    @property
    def ref_params(self) -> Any:
        """The frozen reference policy: its own copy, or the LoRA base."""
        return self.frozen["base"] if self.lora is not None else self.frozen["ref"]

    def merged_policy(self) -> Any:
        """Plain policy params (adapters folded into the base weights, float32): for export."""
        if self.lora is None:
            return self.policy
        base = jax.tree.map(lambda x: x.astype(jnp.float32), self.frozen["base"])
        return lora.merge(base, self.policy, self.lora.scale)


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
    *,
    adapters: LoRAConfig | None = None,
    key: jax.Array | None = None,
    frozen_dtype: str = "float32",
) -> TrainState:
    """A fresh state. The reference defaults to a copy of the policy; the value network to one
    initialised from the policy's backbone (or, with shared_value, a head on the policy).

    `adapters` (a LoRAConfig with rank > 0): train LoRA adapters instead (random A from `key`,
    B = 0, so the adapted policy starts equal to the base); the base is frozen and is the
    reference, and the value network is adapters on the same base plus a zero head.
    `frozen_dtype` 'bfloat16' stores the frozen params (reference or base) in bfloat16.
    """
    policy_params = jax.tree.map(jnp.asarray, policy_params)
    store = jnp.bfloat16 if frozen_dtype == "bfloat16" else None
    as_frozen = lambda tree: tree if store is None else jax.tree.map(
        lambda x: x.astype(store) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    if adapters is not None and adapters.rank > 0:
        return _lora_train_state(model, cfg, policy_params, value_params, ref_params, adapters,
                                 key, as_frozen)
    if cfg.shared_value:
        policy_params = {**policy_params, **_value_head(policy_params)}
        value_params = {}
    elif value_params is None:
        value_params = init_value_params(policy_params)
    if ref_params is None:
        ref_params = {k: v for k, v in policy_params.items() if not k.startswith("value_")}
        ref_params = jax.tree.map(jnp.copy, ref_params)
    return _assemble(model, cfg, policy_params, value_params, {"ref": as_frozen(ref_params)})


def _value_head(params: dict) -> dict:
    """The params' value head, or a zero one (values start at 0)."""
    if "value_head" in params:
        return {"value_head": params["value_head"], "value_bias": params["value_bias"]}
    d = params["embed"].shape[1]
    return {"value_head": jnp.zeros((d,), jnp.float32), "value_bias": jnp.zeros((), jnp.float32)}


def _lora_train_state(model, cfg, policy_params, value_params, ref_params, adapters, key,
                      as_frozen) -> TrainState:
    if value_params is not None or ref_params is not None:
        raise ValueError("with LoRA the value network and the reference are built on the "
                         "policy's base weights: pass neither value_params nor ref_params")
    if key is None:
        raise ValueError("LoRA adapters need a key for their random init")
    base = as_frozen({k: v for k, v in policy_params.items() if not k.startswith("value_")})
    init = lambda i: lora.init_adapters(base, adapters.rank, adapters.targets,
                                        jax.random.fold_in(key, i))
    policy, value = init(0), {}
    if cfg.shared_value:
        policy = {**policy, **_value_head(policy_params)}
    else:
        value = {**init(1), **_value_head({"embed": base["embed"]})}
    return _assemble(model, cfg, policy, value, {"base": base}, adapters)


def _assemble(model, cfg, policy, value, frozen, adapters=None) -> TrainState:
    policy_tx = make_optimizer(cfg.policy_lr, cfg)
    value_tx = make_optimizer(cfg.value_lr, cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        policy=policy,
        value=value,
        frozen=frozen,
        policy_opt=policy_tx.init(policy),
        value_opt=value_tx.init(value),
        kl=init_kl(cfg.kl_coef),
        model=model,
        policy_tx=policy_tx,
        value_tx=value_tx,
        lora=adapters,
    )

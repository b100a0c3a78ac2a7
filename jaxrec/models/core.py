"""Functional entry points over plain param pytrees: init, forward, logits, values."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.models.config import ModelConfig
from jaxrec.models.transformer import (
    HEADS,
    CausalLM,
    KVCache,
    LMOutput,
    _dense,
    _dtype,
    _tied_logits,
    causal_mask,
    positions_from_valid,
)


def make_model(cfg: ModelConfig, head: str = "lm") -> CausalLM:
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not allowed; choose one of {HEADS}")
    return CausalLM(cfg, head=head)


def _dummy_inputs(cfg: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), jnp.bool_)


def init_params(cfg: ModelConfig, key: jax.Array, head: str = "lm") -> dict:
    """Random params as a plain pytree (no logical-axis boxes)."""
    boxed = make_model(cfg, head).init(key, *_dummy_inputs(cfg))["params"]
    return nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=32)
def logical_axes(cfg: ModelConfig, head: str = "lm") -> dict:
    """The logical axis names of every param, as a pytree of PartitionSpecs (no compute; one
    trace per (config, head), cached: treat the result as read-only)."""
    boxed = jax.eval_shape(
        lambda k: make_model(cfg, head).init(k, *_dummy_inputs(cfg))["params"],
        jax.random.key(0),
    )
    return nn.get_partition_spec(boxed)


def forward(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,  # [B, T] int32
    valid: jax.Array | None = None,  # [B, T] bool, False on padding; None: all real
    *,
    head: str = "lm",
    keep_last: int = 0,
) -> LMOutput:
    """A full causal pass without a cache; left or right padding is masked out of attention.

    `keep_last` N > 0: outputs (hidden, logits, values) for the last N positions only; the
    last block computes queries, its MLP and the heads there alone (the earlier blocks and all
    keys are unchanged), so the result equals the full pass's last N positions."""
    if valid is None:
        valid = jnp.ones(tokens.shape, jnp.bool_)
    positions = positions_from_valid(valid)
    mask = causal_mask(valid)
    return make_model(cfg, head).apply({"params": params}, tokens, positions, mask,
                                       keep_last=keep_last)


def forward_cached(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,  # [B, T] int32, written at cache slots [index, index + T)
    positions: jax.Array,  # [B, T] int32
    attn_mask: jax.Array,  # [B, T, S] bool over the cache's S slots
    cache: KVCache,
    *,
    head: str = "lm",
    prefill: bool = False,
    last_only: bool = False,
) -> LMOutput:
    """One cached step; returns the updated cache in `LMOutput.cache`.

    `prefill=True` promises the cache is empty (index 0), so attention covers only the T new
    keys; `last_only=True` computes the last block's MLP, the norm and the heads for the last
    position only (all a sampler needs after a prefill).
    """
    return make_model(cfg, head).apply(
        {"params": params}, tokens, positions, attn_mask, cache, prefill, last_only
    )


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(cfg, params, tokens):
    return forward(cfg, params, tokens).logits


def logits(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """int32 [B, T] -> float32 [B, T, V]: causal logits, no cache, no padding."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] int32, got shape {tokens.shape}")
    return _jit_logits(cfg, params, tokens)


def project_logits(cfg: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """The LM head alone: hidden [B, T, D] (after the final norm) -> logits [B, T, V] float32.

    Lets callers run the trunk with head='none' and project only the positions they need.
    """
    dt = _dtype(cfg.dtype)
    if cfg.tie_embeddings:
        return _tied_logits(hidden, params["embed"], dt)
    return _dense(hidden, params["lm_head"]["kernel"], 1, dt)


def project_values(params: dict, hidden: jax.Array) -> jax.Array:
    """The value head alone: hidden [B, T, D] -> values [B, T] float32."""
    return jnp.einsum("btd,d->bt", hidden, params["value_head"]) + params["value_bias"]


def init_value_params(policy_params: dict) -> dict:
    """A separate value network initialised from the policy's backbone, head at zero.

    The LM head (if untied) is dropped; the scalar head starts at 0, so initial values are 0.
    """
    backbone = {k: v for k, v in policy_params.items() if k not in ("lm_head",)}
    d_model = policy_params["embed"].shape[1]
    return {
        **jax.tree.map(jnp.array, backbone),
        "value_head": jnp.zeros((d_model,), jnp.float32),
        "value_bias": jnp.zeros((), jnp.float32),
    }


def values(cfg: ModelConfig, value_params: dict, tokens: jax.Array, valid=None) -> jax.Array:
    """[B, T] -> [B, T] float32 values of a separate value network."""
    return forward(cfg, value_params, tokens, valid, head="value").values


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))

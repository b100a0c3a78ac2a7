"""Rollouts on device: users -> prompts -> constrained generation -> items -> simulator step.

Shapes: B users, H history length, P prompt tokens, R completion tokens, K slate size,
N catalogue items. One turn per call; everything static, so it compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.codec import ItemCodec, decode_slate, history_mask, render_prompts, slate_constraint
from jaxrec.config import ModelConfig
from jaxrec.generation import Greedy, Temperature, generate
from jaxrec.sim import Environment


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Static shapes and switches of a rollout (hashable: part of the jit key)."""

    slate_size: int = 3  # K items per recommendation
    prompt_len: int = 64  # P prompt tokens (histories are cut to the most recent that fit)
    max_new_tokens: int = 32  # R completion tokens
    temperature: float = 1.0  # sampling temperature (0: greedy)
    constrained: bool = True  # decode only real, distinct catalogue items
    ban_history: bool = True  # never recommend an item already in the user's history

    def __post_init__(self):
        for name in ("slate_size", "prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be >= 0")


@struct.dataclass
class Rollout:
    prompt: jax.Array  # [B, P] int32, left padded
    prompt_valid: jax.Array  # [B, P] bool
    completion: jax.Array  # [B, R] int32
    completion_mask: jax.Array  # [B, R] bool, generated tokens (EOS included)
    behaviour_logp: jax.Array  # [B, R] float32, log-probs under the sampling distribution
    items: jax.Array  # [B, K] int32 catalogue ids, -1 where the completion named none
    item_valid: jax.Array  # [B, K] bool
    has_eos: jax.Array  # [B] bool, the completion ended with EOS
    allowed: jax.Array | None  # [B, R, V] bool, the tokens the constraint allowed at each step
    reward: jax.Array  # [B] float32 simulator reward for the slate
    done: jax.Array  # [B] bool, the session ended (the user was replaced: auto-reset)
    clicked: jax.Array  # [B] bool


def replay_allowed(constraint, tokens: jax.Array) -> jax.Array:
    """The constraint's allowed-token masks along generated tokens [B, R] -> [B, R, V] bool.

    Teacher-forced scoring needs the distribution that was sampled: the policy's, renormalised
    over these tokens (unconstrained log-probs would let the KL penalty reward moving mass onto
    tokens the constraint never lets out).
    """

    def step(cstate, token):
        return constraint.update(cstate, token), constraint.allowed(cstate)

    _, allowed = jax.lax.scan(step, constraint.init(tokens.shape[0]), tokens.T)  # [R, B, V]
    return jnp.swapaxes(allowed, 0, 1)


def rollout(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    env: Environment,
    env_params: Any,
    sim_state: Any,  # B users' states (a batched pytree)
    key: jax.Array,
    spec: RolloutSpec,
) -> tuple[Rollout, Any]:
    """One recommendation turn for every user; returns the rollout and the next user states."""
    key_gen, key_sim = jax.random.split(key)
    histories = jax.vmap(env.observation, in_axes=(0, None))(sim_state, env_params)  # [B, H]
    prompt, prompt_valid = render_prompts(codec, histories, spec.prompt_len)
    banned = history_mask(codec, histories) if spec.ban_history else None
    constraint = None
    if spec.constrained:
        constraint = slate_constraint(codec, spec.slate_size, banned, cfg.vocab_size)
    sampler = Greedy() if spec.temperature == 0 else Temperature(spec.temperature)
    out = generate(cfg, params, prompt, prompt_valid, key_gen, sampler=sampler,
                   max_new_tokens=spec.max_new_tokens, constraint=constraint,
                   eos_id=int(codec.eos_id))
    items, item_valid = decode_slate(codec, out.tokens, out.mask, spec.slate_size, banned)
    _, next_state, reward, done, info = env.step_batch(key_sim, sim_state, items, env_params)
    allowed = None if constraint is None else replay_allowed(constraint, out.tokens)
    rows = jnp.arange(out.tokens.shape[0])
    last = jnp.maximum(out.lengths - 1, 0)
    has_eos = (out.lengths > 0) & (out.tokens[rows, last] == codec.eos_id)
    result = Rollout(
        prompt=prompt,
        prompt_valid=prompt_valid,
        completion=out.tokens,
        completion_mask=out.mask,
        behaviour_logp=out.logps,
        items=items,
        item_valid=item_valid,
        has_eos=has_eos,
        allowed=allowed,
        reward=reward.astype(jnp.float32),
        done=done,
        clicked=info["response"].clicked,
    )
    return result, next_state

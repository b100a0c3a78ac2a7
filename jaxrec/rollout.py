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
    turns: int = 1  # T recommendation turns per session (one token sequence; see Session)

    @property
    def session_len(self) -> int:
        """L tokens of a session: T x (prompt + completion)."""
        return self.turns * (self.prompt_len + self.max_new_tokens)

    def __post_init__(self):
        for name in ("slate_size", "prompt_len", "max_new_tokens", "turns"):
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


@struct.dataclass
class Session:
    """T turns for each of B users as one token sequence of L = T (P + R) tokens:
    [prompt_1 | completion_1 | prompt_2 | completion_2 | ...]. Each prompt is rendered afresh
    from the history as the simulator has updated it (the consumed item joins it), so the
    policy sees the whole session so far when it recommends. Left padding inside each prompt
    slot and padding after each EOS are holes (valid False): positions skip them.

    A turn after the one that ended a user's session belongs to a new (auto-reset) user: it is
    generated (static shapes) but not counted (`active` False; its tokens are invalid)."""

    tokens: jax.Array  # [B, L] int32
    valid: jax.Array  # [B, L] bool
    action: jax.Array  # [B, L] bool, the policy's own tokens (counted turns only)
    behaviour_logp: jax.Array  # [B, L] float32 sampling log-probs on the actions (0 elsewhere)
    allowed: jax.Array | None  # [B, L - P, V] bool on the window after the first prompt
    last_action: jax.Array  # [B, T] int32 position of each turn's last action token, -1 if none
    reward: jax.Array  # [B, T] float32
    items: jax.Array  # [B, T, K] int32
    item_valid: jax.Array  # [B, T, K] bool
    has_eos: jax.Array  # [B, T] bool
    done: jax.Array  # [B, T] bool
    clicked: jax.Array  # [B, T] bool
    active: jax.Array  # [B, T] bool, the turn belongs to the session's user


def rollout_session(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    env: Environment,
    env_params: Any,
    sim_state: Any,
    key: jax.Array,
    spec: RolloutSpec,
) -> tuple[Session, Any]:
    """`spec.turns` recommendation turns per user in one sequence (see Session); returns the
    session and the user states after the last turn. Turns unroll in the trace (T is small)."""
    b, p, r, t_max = sim_state_rows(sim_state), spec.prompt_len, spec.max_new_tokens, spec.turns
    seg, length = p + r, spec.session_len
    pad = int(codec.pad_id)
    tokens = jnp.full((b, length), pad, jnp.int32)
    valid = jnp.zeros((b, length), jnp.bool_)
    logp = jnp.zeros((b, length), jnp.float32)
    allowed = None
    if spec.constrained:
        allowed = jnp.ones((b, length - p, cfg.vocab_size), jnp.bool_)
    active = jnp.ones((b,), jnp.bool_)
    turn_active, turns = [], []
    for t in range(t_max):
        key_gen, key_sim = jax.random.split(jax.random.fold_in(key, t))
        start = t * seg
        histories = jax.vmap(env.observation, in_axes=(0, None))(sim_state, env_params)
        prompt, prompt_valid = render_prompts(codec, histories, p)
        tokens = tokens.at[:, start:start + p].set(prompt)
        valid = valid.at[:, start:start + p].set(prompt_valid)
        banned = history_mask(codec, histories) if spec.ban_history else None
        constraint = None
        if spec.constrained:
            constraint = slate_constraint(codec, spec.slate_size, banned, cfg.vocab_size)
        sampler = Greedy() if spec.temperature == 0 else Temperature(spec.temperature)
        out = generate(cfg, params, tokens[:, :start + p], valid[:, :start + p], key_gen,
                       sampler=sampler, max_new_tokens=r, constraint=constraint,
                       eos_id=int(codec.eos_id))
        tokens = tokens.at[:, start + p:start + seg].set(out.tokens)
        valid = valid.at[:, start + p:start + seg].set(out.mask)
        logp = logp.at[:, start + p:start + seg].set(jnp.where(out.mask, out.logps, 0.0))
        if constraint is not None:
            at = start  # the completion's offset in the window (which starts after prompt 1)
            allowed = allowed.at[:, at:at + r].set(replay_allowed(constraint, out.tokens))
        items, item_valid = decode_slate(codec, out.tokens, out.mask, spec.slate_size, banned)
        _, sim_state, reward, done, info = env.step_batch(key_sim, sim_state, items, env_params)
        rows = jnp.arange(b)
        last = jnp.maximum(out.lengths - 1, 0)
        has_eos = (out.lengths > 0) & (out.tokens[rows, last] == codec.eos_id)
        last_action = jnp.where(active & (out.lengths > 0), start + p + last, -1)
        turns.append((last_action, reward.astype(jnp.float32), items, item_valid, has_eos, done,
                      info["response"].clicked))
        turn_active.append(active)
        active = active & ~done
    turn_active = jnp.stack(turn_active, axis=1)  # [B, T]
    seg_active = jnp.repeat(turn_active, seg, axis=1)  # [B, L]
    valid = valid & seg_active
    completion = jnp.tile(jnp.arange(seg) >= p, t_max)[None, :]  # [1, L]
    stack = lambda i: jnp.stack([x[i] for x in turns], axis=1)
    session = Session(
        tokens=jnp.where(valid, tokens, pad), valid=valid, action=valid & completion,
        behaviour_logp=jnp.where(valid & completion, logp, 0.0), allowed=allowed,
        last_action=stack(0), reward=stack(1), items=stack(2), item_valid=stack(3),
        has_eos=stack(4), done=stack(5), clicked=stack(6), active=turn_active,
    )
    return session, sim_state


def sim_state_rows(sim_state: Any) -> int:
    """B: the leading size of a batched user-state pytree."""
    return jax.tree.leaves(sim_state)[0].shape[0]

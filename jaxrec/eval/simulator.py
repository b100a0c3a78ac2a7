"""Simulator evaluation of an LM recommender policy: returns, clicks and slate metrics.

    row = simulate_policy(cfg, params, codec, env, env_params, key, episodes=1000,
                          slate_size=3, prompt_len=64, max_new_tokens=32, temperature=0.0)
    rows = simulate_greedy_and_sampled(cfg, params, codec, env, env_params, key, ...)

Like `jaxrec.sim.evaluate.run_episodes`, `episodes` fresh users are stepped together (one
`step_batch` per step, inside one `lax.while_loop` under one jit) until every user's FIRST
episode has ended; steps of a finished (auto-reset) user are masked out. The loop carry also
accumulates, on device, what the slate metrics need:

- counts [N] int32: how often each item was recommended (coverage: counts > 0; novelty: the
  count-weighted mean self-information, exact since the counts are integers);
- the sum of per-slate intra-list diversities and the number of slates with >= 2 items.

The metrics are those of `jaxrec.eval.metrics` (coverage, intra_list_diversity, novelty) applied
to every counted slate; `run_policy(..., record_steps=T)` also returns the slates [T, B, K] (-1
where not counted) so they can be checked against the host-side functions.

The LM policy renders each user's history observation into a prompt, decodes a slate under
the catalogue constraint (real, distinct items; the history's items banned) and maps the tokens
to items: the rollout's turn, without the simulator step. It needs an environment whose
observation is the history [H] int32 (-1 padded) and whose slates index the catalogue (the
synthetic and MovieLens presets).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.codec import ItemCodec, decode_slate
from jaxrec.config import ModelConfig
from jaxrec.eval.offline import generate_for_histories
from jaxrec.generation import Greedy, Temperature
from jaxrec.sim.core import Environment
from jaxrec.sim.evaluate import Episodes, episode_stats

Policy = Callable[[jax.Array, Any], jax.Array]  # (key, obs [B, ...]) -> slates [B, K] int32


def lm_slate_policy(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    *,
    slate_size: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    ban_history: bool = True,
) -> Policy:
    """A batched policy `(key, histories [B, H]) -> items [B, K] int32` (-1 where the completion
    named no valid item): the rollout's constrained generation. Greedy when temperature == 0
    (then the key is unused). Traceable; build it inside the jit that runs it so `params` stay
    arguments, not constants."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    sampler = Greedy() if temperature == 0 else Temperature(float(temperature))

    def policy(key: jax.Array, histories: jax.Array) -> jax.Array:
        out, banned = generate_for_histories(
            cfg, params, codec, jnp.asarray(histories, jnp.int32), key, slate_size=slate_size,
            prompt_len=prompt_len, max_new_tokens=max_new_tokens, sampler=sampler,
            ban_history=ban_history)
        items, _ = decode_slate(codec, out.tokens, out.mask, slate_size, banned)
        return items

    return policy


@struct.dataclass
class PolicyRun:
    """What one evaluation gathered (device arrays)."""

    episodes: Episodes  # per-user totals of the first episode
    counts: jax.Array  # [N] int32 times each item was recommended in counted steps
    slots: jax.Array  # [] int32 slate slots in counted steps (valid or not)
    diversity_sum: jax.Array  # [] float32 sum of per-slate intra-list diversities
    diversity_slates: jax.Array  # [] int32 counted slates with >= 2 valid items
    popularity: jax.Array  # [N] float32 the counts novelty uses (before the 0.5 floor)
    novelty: jax.Array  # [] float32 mean -log2 p(item) over recommended items (nan if none)
    steps: jax.Array  # [] int32 loop iterations run
    slates: jax.Array  # [T, B, K] int32 the first T steps' slates, -1 where not counted


def slate_diversity(slates: jax.Array, valid: jax.Array,
                    unit_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-slate intra-list diversity: (mean pairwise cosine distance [B], has >= 2 items [B]).

    slates, valid: [B, K]; unit_features [N, F] rows of norm 1 (or 0). As
    `metrics.intra_list_diversity`: ordered pairs i != j of valid slots."""
    k = slates.shape[-1]
    f = unit_features[jnp.maximum(slates, 0)]  # [B, K, F]
    sim = jnp.einsum("bif,bjf->bij", f, f)  # [B, K, K]
    pair = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(k, dtype=jnp.bool_)
    n = valid.sum(axis=1)  # [B]
    pairs = jnp.maximum(n * (n - 1), 1).astype(jnp.float32)
    div = jnp.sum(jnp.where(pair, 1.0 - sim, 0.0), axis=(1, 2)) / pairs
    return div, n >= 2


def run_policy(
    env: Environment,
    env_params: Any,
    key: jax.Array,
    policy: Policy,
    *,
    episodes: int,
    popularity: jax.Array | None = None,
    max_steps: int = 10_000,
    record_steps: int = 0,
) -> PolicyRun:
    """The first episode of `episodes` fresh users under `policy(key, obs) -> [B, K]`, with the
    slate metrics accumulated in the loop (traceable; `evaluate_policy` is its jit).

    popularity: [N] counts for novelty; None takes the item frequencies in the users' initial
    observations (which must then be histories [B, H] of item ids, -1 padded).
    record_steps: keep the first T steps' slates (for checks; 0 keeps none).
    """
    catalogue = env_params.catalogue
    n_items = catalogue.size
    feats = catalogue.features.astype(jnp.float32)
    unit = feats / jnp.maximum(jnp.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    k_reset, key = jax.random.split(key)
    obs, state = env.reset_batch(k_reset, episodes, env_params)
    if popularity is None:
        hist = jnp.asarray(obs, jnp.int32).reshape(-1)
        popularity = jnp.zeros((n_items,), jnp.float32).at[
            jnp.where(hist >= 0, hist, n_items)].add(1.0, mode="drop")
    popularity = jnp.asarray(popularity, jnp.float32)

    # The slate size, from a trace of the policy (no compute).
    k = jax.eval_shape(policy, key, obs).shape[-1]
    zeros_i = jnp.zeros((episodes,), jnp.int32)
    acc = dict(
        counts=jnp.zeros((n_items,), jnp.int32), slots=jnp.zeros((), jnp.int32),
        div_sum=jnp.zeros((), jnp.float32), div_n=jnp.zeros((), jnp.int32),
        slates=jnp.full((record_steps, episodes, k), -1, jnp.int32),
    )
    carry = (key, obs, state, jnp.ones((episodes,), bool), jnp.zeros((episodes,), jnp.float32),
             zeros_i, zeros_i, jnp.zeros((), jnp.int32), acc)

    def cond(carry):
        active, t = carry[3], carry[7]
        return jnp.any(active) & (t < max_steps)

    def body(carry):
        key, obs, state, active, ret, clicks, length, t, acc = carry
        key, k_policy, k_step = jax.random.split(key, 3)
        slates = policy(k_policy, obs).astype(jnp.int32)
        obs, state, reward, done, info = env.step_batch(k_step, state, slates, env_params)
        ret = ret + jnp.where(active, reward, 0.0)
        clicks = clicks + (active & info["response"].clicked).astype(jnp.int32)
        length = length + active.astype(jnp.int32)

        valid = active[:, None] & (slates >= 0) & (slates < n_items)  # [B, K]
        counted = jnp.where(valid, slates, -1)
        div, has_pairs = slate_diversity(counted, valid, unit)
        has_pairs = has_pairs & active
        recorded = acc["slates"]
        if record_steps:
            recorded = recorded.at[t].set(counted, mode="drop")
        acc = dict(
            counts=acc["counts"].at[jnp.where(valid, slates, n_items)].add(1, mode="drop"),
            slots=acc["slots"] + k * active.sum(dtype=jnp.int32),
            div_sum=acc["div_sum"] + jnp.sum(jnp.where(has_pairs, div, 0.0)),
            div_n=acc["div_n"] + has_pairs.sum(dtype=jnp.int32),
            slates=recorded,
        )
        return key, obs, state, active & ~done, ret, clicks, length, t + 1, acc

    _, _, _, active, ret, clicks, length, t, acc = jax.lax.while_loop(cond, body, carry)
    # Novelty from the counts: sum_i c_i (-log2 p_i) / sum_i c_i, p = max(pop, 1/2) / sum.
    pop = jnp.maximum(popularity, 0.5)
    info = -jnp.log2(pop / pop.sum())
    total = acc["counts"].sum()
    novelty = jnp.where(total > 0, jnp.sum(acc["counts"] * info) / jnp.maximum(total, 1),
                        jnp.nan)
    return PolicyRun(
        episodes=Episodes(returns=ret, clicks=clicks, lengths=length, finished=~active),
        counts=acc["counts"], slots=acc["slots"], diversity_sum=acc["div_sum"],
        diversity_slates=acc["div_n"], popularity=popularity, novelty=novelty, steps=t,
        slates=acc["slates"],
    )


evaluate_policy = jax.jit(run_policy, static_argnames=("env", "policy", "episodes", "max_steps",
                                                       "record_steps"))  # env, policy hashable


@functools.partial(jax.jit, static_argnames=(
    "cfg", "env", "episodes", "slate_size", "prompt_len", "max_new_tokens", "temperature",
    "ban_history", "max_steps", "record_steps"))
def lm_policy_run(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    env: Environment,
    env_params: Any,
    key: jax.Array,
    popularity: jax.Array | None = None,
    *,
    episodes: int,
    slate_size: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    ban_history: bool = True,
    max_steps: int = 10_000,
    record_steps: int = 0,
) -> PolicyRun:
    """`run_policy` under the LM policy (`lm_slate_policy`), all in one jit; params, codec and
    popularity are arguments (no recompilation for new weights)."""
    policy = lm_slate_policy(cfg, params, codec, slate_size=slate_size, prompt_len=prompt_len,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             ban_history=ban_history)
    return run_policy(env, env_params, key, policy, episodes=episodes, popularity=popularity,
                      max_steps=max_steps, record_steps=record_steps)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def summarize(run: PolicyRun) -> dict[str, Any]:
    """Host-side JSON-ready figures of a run: `episode_stats` plus coverage, diversity (None
    when no slate had two items), novelty (None when nothing was recommended), the share of
    slate slots that named no valid item, and the loop's steps."""
    run = jax.device_get(run)
    counts = np.asarray(run.counts)
    slots = int(run.slots)
    div_n = int(run.diversity_slates)
    out = episode_stats(run.episodes)
    out.update({
        "coverage": float(np.count_nonzero(counts) / counts.size),
        "diversity": float(run.diversity_sum) / div_n if div_n else None,
        "novelty": _finite(run.novelty),
        "recommended": int(counts.sum()),
        "invalid_item_frac": float(1.0 - counts.sum() / slots) if slots else 0.0,
        "steps": int(run.steps),
    })
    return out


def simulate_policy(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    env: Environment,
    env_params: Any,
    key: jax.Array,
    *,
    episodes: int,
    slate_size: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float,
    popularity: np.ndarray | None = None,
    max_steps: int = 10_000,
    ban_history: bool = True,
) -> dict[str, Any]:
    """Mean return, clicks, click rate, coverage, diversity and novelty of the LM policy over
    the first episodes of `episodes` simulated users (a JSON-ready dict; see `summarize`).

    temperature 0 decodes greedily ('decoding': 'greedy'), otherwise samples ('sampled').
    popularity: [N] item counts for novelty (e.g. training interactions); None uses the item
    frequencies in the evaluated users' initial histories.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    n_items = env_params.catalogue.size
    if popularity is not None:
        popularity = np.asarray(popularity, np.float32)
        if popularity.shape != (n_items,):
            raise ValueError(f"popularity has shape {popularity.shape}, expected ({n_items},)")
        popularity = jnp.asarray(popularity)
    run = lm_policy_run(cfg, params, codec, env, env_params, key, popularity,
                        episodes=episodes, slate_size=slate_size, prompt_len=prompt_len,
                        max_new_tokens=max_new_tokens, temperature=float(temperature),
                        ban_history=ban_history, max_steps=max_steps)
    out = summarize(run)
    out["decoding"] = "greedy" if temperature == 0 else "sampled"
    out["temperature"] = float(temperature)
    return out


def simulate_greedy_and_sampled(
    cfg: ModelConfig,
    params: Any,
    codec: ItemCodec,
    env: Environment,
    env_params: Any,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """[greedy row, sampled row at `temperature`] of `simulate_policy`, on the same users
    (same key: common random numbers for the comparison)."""
    if temperature <= 0:
        raise ValueError(f"the sampled row needs temperature > 0, got {temperature}")
    return [simulate_policy(cfg, params, codec, env, env_params, key, temperature=t, **kwargs)
            for t in (0.0, temperature)]


__all__ = [
    "PolicyRun",
    "evaluate_policy",
    "lm_policy_run",
    "lm_slate_policy",
    "run_policy",
    "simulate_greedy_and_sampled",
    "simulate_policy",
    "slate_diversity",
    "summarize",
]

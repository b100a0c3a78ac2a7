"""Running a simulator under a policy: random slates, whole episodes, and their statistics.

    stats = simulate("recsim-ie", episodes=10_000, policy="random", seed=0)

`run_episodes` starts `episodes` fresh users at once and steps them all (one `step_batch` per
step, inside one `lax.while_loop`) until every user's FIRST episode has ended; later steps of a
finished user are masked out. Counting first episodes only keeps the sample unbiased (counting
whatever finishes within a fixed horizon would favour short episodes).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.sim.core import Environment, batch_bits, below, make_env

POLICIES = ("random",)


def random_slates(key: jax.Array, batch: int, num_candidates: int, slate_size: int,
                  method: str = "threefry") -> jax.Array:
    """[B, S] int32: for each user S distinct candidates, uniform over ordered slates.

    No sort: draw v_k uniform on [0, C - k) (one word each, core.below) and map it to the
    v_k-th index not yet taken, i <- v_k + #{taken <= i}, which reaches its fixed point in k
    rounds. For S = 2 this is a = v_0, b = v_1 + [v_1 >= a].
    """
    if not 1 <= slate_size <= num_candidates:
        raise ValueError(f"need 1 <= slate_size ({slate_size}) <= candidates ({num_candidates})")
    words = batch_bits(key, (slate_size + slate_size % 2, batch), method)  # [S+, B] uint32
    taken: list[jax.Array] = []
    for k in range(slate_size):
        v, _ = below(words[k], num_candidates - k)  # [B] int32 in [0, C - k)
        i = v
        for _ in range(k):
            i = v + sum((p <= i).astype(jnp.int32) for p in taken)
        taken.append(i)
    return jnp.stack(taken, axis=-1).astype(jnp.int32)


def make_policy(name: str, env: Environment, params: Any = None):
    """A batched policy `(key, obs) -> slates [B, S]` by name.

    "random": S distinct slots drawn uniformly among the env's candidates (`num_candidates`,
    or the catalogue's items for presets that recommend straight from a catalogue).
    """
    if name not in POLICIES:
        raise ValueError(f"policy {name!r} is unknown; choose one of {POLICIES}")
    c = getattr(env, "num_candidates", None)
    if c is None and params is not None and hasattr(params, "catalogue"):
        c = params.catalogue.size
    s = getattr(env, "slate_size", None)
    if c is None or s is None:
        raise ValueError(f"{type(env).__name__} names no candidate count and slate size")
    method = getattr(env, "batch_rng", "threefry")

    def policy(key, obs):
        batch = jax.tree.leaves(obs)[0].shape[0]
        return random_slates(key, batch, c, s, method)

    return policy


@struct.dataclass
class Episodes:
    """Per-episode totals of each user's first episode."""

    returns: jax.Array  # [N] float32 sum of rewards
    clicks: jax.Array  # [N] int32
    lengths: jax.Array  # [N] int32 steps
    finished: jax.Array  # [N] bool False where max_steps cut the episode short


@functools.partial(jax.jit, static_argnames=("env", "episodes", "policy", "batched",
                                             "max_steps"))
def run_episodes(env: Environment, params: Any, key: jax.Array, episodes: int, policy,
                 batched: bool = True, max_steps: int = 100_000) -> Episodes:
    """The first episode of `episodes` fresh users under `policy(key, obs) -> [B, S]`.

    batched=True uses the env's `step_batch` (one draw per step); False uses the base class's
    vmapped per-user `step` with a key per user, for checking the two agree.
    """
    step_batch = env.step_batch if batched else functools.partial(Environment.step_batch, env)
    k_reset, key = jax.random.split(key)
    obs, state = env.reset_batch(k_reset, episodes, params)
    zeros_i = jnp.zeros((episodes,), jnp.int32)
    carry = (key, obs, state, jnp.ones((episodes,), bool), jnp.zeros((episodes,), jnp.float32),
             zeros_i, zeros_i, jnp.zeros((), jnp.int32))

    def cond(carry):
        active, t = carry[3], carry[7]
        return jnp.any(active) & (t < max_steps)

    def body(carry):
        key, obs, state, active, ret, clicks, length, t = carry
        key, k_policy, k_step = jax.random.split(key, 3)
        slates = policy(k_policy, obs)
        obs, state, reward, done, info = step_batch(k_step, state, slates, params)
        ret = ret + jnp.where(active, reward, 0.0)
        clicks = clicks + (active & info["response"].clicked).astype(jnp.int32)
        length = length + active.astype(jnp.int32)
        return key, obs, state, active & ~done, ret, clicks, length, t + 1

    _, _, _, active, ret, clicks, length, _ = jax.lax.while_loop(cond, body, carry)
    return Episodes(returns=ret, clicks=clicks, lengths=length, finished=~active)


def episode_stats(ep: Episodes) -> dict[str, float]:
    """Means, standard deviations and standard errors of per-episode figures (host side).

    click_rate = total clicks / total steps; its standard error by the delta method.
    """
    ret = np.asarray(ep.returns, np.float64)
    clicks = np.asarray(ep.clicks, np.float64)
    length = np.asarray(ep.lengths, np.float64)
    n = len(ret)
    ddof = 1 if n > 1 else 0
    se = lambda x: float(np.std(x, ddof=ddof) / math.sqrt(n))
    rate = clicks.sum() / max(length.sum(), 1.0)
    return {
        "episodes": n,
        "return_mean": float(ret.mean()), "return_mean_se": se(ret),
        "return_std": float(ret.std(ddof=ddof)),
        "clicks_mean": float(clicks.mean()), "clicks_mean_se": se(clicks),
        "length_mean": float(length.mean()), "length_mean_se": se(length),
        "click_rate": float(rate),
        "click_rate_se": se(clicks - rate * length) / max(float(length.mean()), 1e-12),
        "unfinished": int(n - np.asarray(ep.finished).sum()),
    }


def simulate(preset: str, episodes: int, policy: str = "random", seed: int = 0,
             batched: bool = True, **overrides: Any) -> dict[str, Any]:
    """`jaxrec simulate`: statistics of `episodes` first episodes of a preset under a policy."""
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    env, params = make_env(preset, **overrides)
    ep = run_episodes(env, params, jax.random.key(seed), episodes,
                      make_policy(policy, env, params), batched=batched)
    return {"preset": preset, "policy": policy, "seed": seed, **episode_stats(ep)}

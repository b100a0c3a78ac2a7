"""`jaxrec bench sim`: simulator throughput in user-steps per second.

A batch of `users` steps `steps` times under a uniformly random slate policy, the whole rollout
one jitted `lax.scan` (policy draw, `step_batch` with auto-reset, reward summed so nothing is
dead code). Compilation is timed apart; the figure is the median of `repeats` timed runs.
The policy ignores the observation, so XLA never builds the [B, C, T] one-hot candidates.

Random numbers: `step_batch` and the policy each make one draw per step for the whole batch
(core.batch_bits, Threefry-2x32 as vectorised uint32 arithmetic, keyed from the step's key).
`--batch-rng key --key-impl unsafe_rbg` (or `rbg`) routes those draws through
`jax.random.bits` with that key impl instead; on a 2-core CPU that is slower (XLA's CPU
RngBitGenerator), on accelerators it may not be. recsim-ie on a 2-core CPU, Nov 2026, 10,000
users x 50 steps: ~0.8-1.5e7 user-steps/s depending on machine load (RecSim: ~1e4).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxrec.hardware import describe
from jaxrec.sim.core import make_env
from jaxrec.sim.evaluate import make_policy


def make_rollout(env, params, users: int, steps: int):
    """A jitted `key -> (total reward, episodes ended)` over `steps` steps of `users` users."""
    policy = make_policy("random", env, params)

    @jax.jit
    def rollout(key):
        k_reset, k_run = jax.random.split(key)
        obs, state = env.reset_batch(k_reset, users, params)

        def body(carry, k):
            state, total, ended = carry
            k_policy, k_step = jax.random.split(k)
            slates = policy(k_policy, obs)  # [B, S]; obs only gives the batch size here
            _, state, reward, done, _ = env.step_batch(k_step, state, slates, params)
            return (state, total + jnp.sum(reward), ended + jnp.sum(done)), None

        init = (state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (_, total, ended), _ = jax.lax.scan(body, init, jax.random.split(k_run, steps))
        return total, ended

    return rollout


def run(preset: str = "recsim-ie", users: int = 10_000, steps: int = 50, repeats: int = 5,
        seed: int = 0, key_impl: str = "threefry2x32", **overrides: Any) -> dict[str, Any]:
    """Time the rollout and print (and return) one JSON line."""
    env, params = make_env(preset, **overrides)
    rollout = make_rollout(env, params, users, steps)
    key = jax.random.key(seed, impl=key_impl)
    start = time.perf_counter()
    compiled = rollout.lower(key).compile()
    compile_s = time.perf_counter() - start
    total, ended = jax.block_until_ready(compiled(key))  # warm-up; its figures are reported
    times = []
    for r in range(repeats):
        k = jax.random.fold_in(key, r + 1)
        start = time.perf_counter()
        jax.block_until_ready(compiled(k))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    row = {
        "preset": preset,
        "users": users,
        "steps": steps,
        "user_steps_per_sec": users * steps / seconds,
        "seconds": seconds,
        "compile_s": compile_s,
        **describe(),
        "key_impl": key_impl,
        "batch_rng": getattr(env, "batch_rng", None),
        "reward_per_step": float(total) / (users * steps),
        "episodes_ended": int(ended),
    }
    print(json.dumps(row), flush=True)
    return row

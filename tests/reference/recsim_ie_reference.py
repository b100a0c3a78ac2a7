"""RecSim's own interest-evolution figures under a uniformly random slate policy.

Runs ONLY in a separate virtualenv with RecSim installed (jaxrec never depends on recsim):

    python3 -m venv /tmp/recsim-venv
    /tmp/recsim-venv/bin/pip install recsim==0.2.4 tensorflow==2.15.1 'numpy<2' \
        dopamine-rl==4.0.9 jax==0.4.34 jaxlib==0.4.34
    /tmp/recsim-venv/bin/python tests/reference/recsim_ie_reference.py \
        --episodes 10000 --seed 0 --out tests/reference/recsim_ie_stats.json

The environment is `recsim.environments.interest_evolution.create_environment` with the
settings RecSim's own examples use (10 candidates resampled every step, slate of 2, seed 0).
RecSim draws the user's choice and the interest-update coin from numpy's global generator, so
`env.seed(seed)` (which calls `np.random.seed`) is what makes a run repeatable; the policy draws
its slates from its own `RandomState(seed)` so it does not disturb that stream.

Per episode: return = sum of clicked watch time (RecSim's `clicked_watchtime_reward`), clicks,
length (steps until the time budget is spent). The JSON holds means, standard deviations and
standard errors; click rate is total clicks / total steps, its standard error by the delta method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from importlib import metadata

import numpy as np


def run(episodes: int, seed: int) -> dict:
    from recsim.environments import interest_evolution

    env_config = {"num_candidates": 10, "slate_size": 2, "resample_documents": True, "seed": seed}
    env = interest_evolution.create_environment(env_config)
    env.seed(seed)  # np.random.seed: the choice model's and the interest update's generator
    policy_rng = np.random.RandomState(seed + 1)
    num_candidates, slate_size = env_config["num_candidates"], env_config["slate_size"]

    returns = np.zeros(episodes)
    clicks = np.zeros(episodes)
    lengths = np.zeros(episodes)
    start = time.perf_counter()
    for episode in range(episodes):
        env.reset()
        done, total, n_clicks, steps = False, 0.0, 0, 0
        while not done:
            slate = policy_rng.choice(num_candidates, slate_size, replace=False)
            obs, reward, done, _ = env.step(slate)
            total += reward
            n_clicks += sum(r["click"] for r in obs["response"])
            steps += 1
        returns[episode], clicks[episode], lengths[episode] = total, n_clicks, steps
    seconds = time.perf_counter() - start
    return summarize(returns, clicks, lengths) | {
        "seconds": seconds,
        "user_steps_per_sec": float(lengths.sum() / seconds),
    }


def summarize(returns: np.ndarray, clicks: np.ndarray, lengths: np.ndarray) -> dict:
    n = len(returns)

    def mean_se(x):
        return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))

    rate = clicks.sum() / lengths.sum()
    # Delta method for a ratio of means: Var(C/L) ~ Var(C - rate * L) / (n * mean(L)^2).
    rate_se = float(np.std(clicks - rate * lengths, ddof=1) / (math.sqrt(n) * lengths.mean()))
    ret_std = float(returns.std(ddof=1))
    centered = returns - returns.mean()
    # Standard error of the standard deviation from the fourth moment: Var(s^2) ~ (m4 - s^4)/n.
    m4 = float(np.mean(centered**4))
    ret_std_se = math.sqrt(max(m4 - ret_std**4, 0.0) / n) / (2 * ret_std)
    return {
        "episodes": n,
        "return_mean": mean_se(returns)[0], "return_mean_se": mean_se(returns)[1],
        "return_std": ret_std, "return_std_se": ret_std_se,
        "clicks_mean": mean_se(clicks)[0], "clicks_mean_se": mean_se(clicks)[1],
        "length_mean": mean_se(lengths)[0], "length_mean_se": mean_se(lengths)[1],
        "length_std": float(lengths.std(ddof=1)),
        "click_rate": float(rate), "click_rate_se": rate_se,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON here (default: print it)")
    args = parser.parse_args()
    stats = run(args.episodes, args.seed)
    record = {
        "environment": "recsim.environments.interest_evolution.create_environment",
        "env_config": {"num_candidates": 10, "slate_size": 2, "resample_documents": True,
                       "seed": args.seed},
        "policy": "uniformly random slate: 2 distinct of the 10 candidates per step",
        "stats": stats,
        "command": " ".join([sys.executable] + sys.argv),
        "versions": {
            "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("recsim", "numpy", "gym", "tensorflow")},
        },
        "date": datetime.date.today().isoformat(),
    }
    text = json.dumps(record, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

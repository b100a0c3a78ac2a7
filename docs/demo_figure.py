"""Redraw docs/demo_reward.png from a demo run: `python docs/demo_figure.py demo-run`."""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(workdir: str, out: str = "docs/demo_reward.png") -> None:
    lines = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    sft = [x for x in lines if x["stage"] == "sft" and "sft/eval_loss" in x]
    ppo = [x for x in lines if x["stage"] == "ppo"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot([x["step"] for x in sft], [x["sft/eval_loss"] for x in sft], "o-")
    axes[0].set(title="SFT: held-out loss per token", xlabel="SFT step")
    steps = np.array([x["step"] for x in ppo])
    reward = np.array([x["reward/mean"] for x in ppo])
    mean5 = np.convolve(reward, np.ones(5) / 5, mode="valid")
    axes[1].plot(steps, reward, label="reward / slate")
    axes[1].plot(steps[4:], mean5, label="5-iteration mean")
    held = [(x["step"], x["eval/reward_mean"]) for x in ppo if "eval/reward_mean" in x]
    if held:
        axes[1].plot(*zip(*held, strict=True), "s", label="held-out users (greedy)")
    axes[1].set(title="PPO: reward (synthetic world)", xlabel="PPO iteration")
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [x["kl/ref"] for x in ppo], color="tab:green")
    axes[2].set(title="KL to the reference (per sequence)", xlabel="PPO iteration")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(*sys.argv[1:])

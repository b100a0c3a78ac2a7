"""Run outputs beyond metrics.jsonl: TensorBoard event files and PNG plots.

Host-side only (matplotlib with the Agg backend, tensorboardX); the loop calls these, and
`jaxrec plot --workdir DIR` redraws the plots from DIR/metrics.jsonl.
"""

from __future__ import annotations

import json
import pathlib


def read_metrics(workdir: str | pathlib.Path, stage: str | None = None) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run a stage in this work dir first")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if stage is None or x.get("stage") == stage]


class TensorBoard:
    """Scalars per iteration under DIR/tb (tensorboardX's event writer)."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        """`enabled=False`: write nothing (the other processes of a multi-host run)."""
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

    def write(self, line: dict) -> None:
        if self._writer is None:
            return
        step, stage = int(line["step"]), line.get("stage", "run")
        for name, value in line.items():
            if name not in ("stage", "step") and isinstance(value, int | float):
                tag = name if name.startswith(stage) else f"{stage}/{name}"  # no 'sft/sft/'
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def write_plots(workdir: str | pathlib.Path, stage: str = "ppo") -> list[pathlib.Path]:
    """DIR/plots/{reward,kl,return,reward_vs_kl}.png from the stage's metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(workdir, stage)
    if not lines:
        raise ValueError(f"{workdir}/metrics.jsonl has no '{stage}' lines to plot")
    out_dir = pathlib.Path(workdir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [x["step"] for x in lines]
    series = {
        "reward": ("reward/mean", "mean simulator reward per slate"),
        "kl": ("kl/ref", "KL to the reference (per sequence)"),
        "return": ("reward/shaped_mean", "shaped return (score - beta * KL)"),
    }
    written = []
    for name, (key, title) in series.items():
        values = [x.get(key, float("nan")) for x in lines]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, values, alpha=0.5, label=key)
        ax.plot(steps, _smooth(values), label="5-iteration mean")
        ax.set_xlabel(f"{stage} iteration")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.scatter([x["kl/ref"] for x in lines], [x["reward/mean"] for x in lines], c=steps, s=12)
    ax.set_xlabel("KL to the reference")
    ax.set_ylabel("mean reward")
    ax.set_title("reward against KL (colour: iteration)")
    fig.tight_layout()
    path = out_dir / "reward_vs_kl.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written

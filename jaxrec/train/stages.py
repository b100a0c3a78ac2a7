"""`jaxrec train`: run the stages a config lists (sft, reward, ppo), in order, in one work dir.

Each stage resumes from its own latest checkpoint and returns at once when it has finished, so
rerunning the same command continues with the first unfinished stage. A stage starts from what
the earlier ones left in the work dir: the reward model and PPO start from the SFT policy when
DIR/checkpoints/sft holds one (else from model.init or fresh weights), and PPO scores with the
reward model when reward.ppo_source is 'model' or 'mix'.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import threading
from typing import Any

import jax

from jaxrec.config import Config, dump_config
from jaxrec.hardware import bf16_matrix_units, cpu_info, resolve_cache_dtype, resolve_dtype
from jaxrec.train.distributed import is_primary, primary_log


def _finished(workdir: pathlib.Path, stage: str) -> bool:
    return (workdir / "checkpoints" / stage).is_dir() and any(
        p.name.isdigit() for p in (workdir / "checkpoints" / stage).iterdir())


def sft_policy(config: Config, workdir: pathlib.Path):
    """The SFT stage's final params when the work dir has them, else None."""
    if not _finished(workdir, "sft"):
        return None
    from jaxrec.train.sft import load_sft_params

    return load_sft_params(config, workdir)


def reward_model_for_ppo(config: Config, workdir: pathlib.Path):
    """The trained reward model when PPO's reward uses it, else None."""
    if config.reward.ppo_source == "simulator":
        return None
    if not _finished(workdir, "reward"):
        raise ValueError(
            f"reward.ppo_source={config.reward.ppo_source!r} needs a trained reward model in "
            f"{workdir}/checkpoints/reward: list 'reward' in stages or run `jaxrec reward` first"
        )
    from jaxrec.train.reward_model import load_reward_model

    return load_reward_model(config, workdir)


def write_config(config: Config, workdir: pathlib.Path, log) -> None:
    """DIR/config.yaml: the resolved config every stage's run leaves (process 0 writes it).

    Each stage calls it once its checkpoint (if any) has restored into this config's shapes,
    so a run that fails on a mismatched config leaves the work dir's config as it was; the
    file is replaced whole (written beside it, then renamed)."""
    if not is_primary():
        return
    resolved = dump_config(config)
    config_path = workdir / "config.yaml"
    if config_path.exists() and config_path.read_text() != resolved:
        log(f"note: {config_path} differs from this run's config; it is replaced")
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(resolved)
    os.replace(tmp, config_path)


@contextlib.contextmanager
def stop_requests():
    """Turns SIGTERM / SIGINT into a flag the loop checks after each iteration (so the run
    saves a checkpoint and stops cleanly); handlers are restored afterwards."""
    requested: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def metrics_writer(path: pathlib.Path, primary: bool):
    """DIR/metrics.jsonl opened for writing on process 0; a sink on the others."""
    return path.open("w") if primary else open(os.devnull, "w")  # noqa: SIM115


def metrics_before(path: pathlib.Path, stage: str, step: int) -> list[dict]:
    """DIR/metrics.jsonl's lines of other stages, and `stage`'s lines of steps <= `step`: what
    a resumed run keeps (it writes the later steps again)."""
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("stage") != stage or x["step"] <= step]


def run_stage(config: Config, workdir, stage: str, log=print, profile: bool = False) -> dict:
    """Run (or resume) one stage; returns its summary."""
    workdir = pathlib.Path(workdir)
    if stage == "sft":
        from jaxrec.train.sft import run_sft

        return run_sft(config, workdir, log)
    if stage == "reward":
        from jaxrec.train.reward_model import run_reward

        return run_reward(config, workdir, log, policy_params=sft_policy(config, workdir))
    if stage == "ppo":
        from jaxrec.train.loop import run_ppo

        return run_ppo(config, workdir, log, params=sft_policy(config, workdir),
                       reward_model=reward_model_for_ppo(config, workdir), profile=profile)
    raise ValueError(f"unknown stage {stage!r}; choose from sft, reward, ppo")


def numerics_line(config: Config) -> str:
    """One line saying what compute and cache dtypes this machine runs the config's in."""
    m, cpu = config.model, cpu_info()
    dtype, cache = resolve_dtype(m.dtype), resolve_cache_dtype(m.cache_dtype)
    why = "bf16 matrix units" if bf16_matrix_units() else "no bf16 matrix units"
    return (f"compute dtype {dtype} (model.dtype={m.dtype}), KV cache {cache} "
            f"(model.cache_dtype={m.cache_dtype}); CPU {cpu.model} ({cpu.matrix_isa}), "
            f"{jax.devices()[0].device_kind}: {why}")


def run_stages(config: Config, workdir, stages=None, log=print,
               profile: bool = False) -> dict[str, Any]:
    """Run `stages` (default: config.stages) in order. Writes DIR/summary.json: the last PPO
    summary's fields at the top level and every stage's summary under "stages"."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = primary_log(log)
    log(numerics_line(config))
    summaries: dict[str, Any] = {}
    for stage in stages or config.stages:
        summaries[stage] = run_stage(config, workdir, stage, log, profile)
        if summaries[stage].get("interrupted"):
            break
    if not is_primary():
        return {"stages": summaries}
    path = workdir / "summary.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = {**previous.get("stages", {}), **summaries}
    summary = {**(merged.get("ppo") or {}), "stages": merged}
    path.write_text(json.dumps(summary, indent=2))
    return summary

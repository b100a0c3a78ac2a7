"""`jaxrec train`: run the stages a config lists (sft, reward, ppo), in order, in one work dir.

Each stage resumes from its own latest checkpoint and returns at once when it has finished, so
rerunning the same command continues with the first unfinished stage. A stage starts from what
the earlier ones left in the work dir: the reward model and PPO start from the SFT policy when
DIR/checkpoints/sft holds one (else from model.init or fresh weights), and PPO scores with the
reward model when reward.ppo_source is 'model' or 'mix'.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jaxrec.config import Config, dump_config
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
    """DIR/config.yaml: the resolved config every stage's run leaves (process 0 writes it)."""
    if not is_primary():
        return
    resolved = dump_config(config)
    config_path = workdir / "config.yaml"
    if config_path.exists() and config_path.read_text() != resolved:
        log(f"note: {config_path} differs from this run's config; it is replaced")
    config_path.write_text(resolved)


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


def run_stages(config: Config, workdir, stages=None, log=print,
               profile: bool = False) -> dict[str, Any]:
    """Run `stages` (default: config.stages) in order. Writes DIR/summary.json: the last PPO
    summary's fields at the top level and every stage's summary under "stages"."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = primary_log(log)
    write_config(config, workdir, log)
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

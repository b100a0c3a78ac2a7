"""`jaxrec train` through all three stages in one work dir: each starts from the previous."""

import json

import jax
import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import load_config
from jaxrec.train.export import load_export
from jaxrec.train.sft import load_sft_params

TINY = ["rollout.users=8", "ppo.minibatches=2", "ppo.epochs=1", "sim.n_items=30",
        "sim.n_topics=3", "rollout.history_items=2", "model.d_model=32", "model.n_layers=1",
        "ppo.iterations=2", "monitor.eval_every=1", "sft.steps=20", "sft.eval_every=10",
        "sft.batch_size=16", "sft.eval_users=16", "reward.steps=20", "reward.eval_every=10",
        "reward.batch_size=16", "reward.eval_pairs=32", "reward.normalize_samples=16",
        "reward.ppo_source=mix", "stages=[sft, reward, ppo]"]


def _argv(command, workdir):
    argv = [command, "--workdir", str(workdir)]
    for item in TINY:
        argv += ["--set", item]
    return argv


def test_sft_reward_ppo_in_one_work_dir_then_export(tmp_path, capsys):
    assert main(_argv("train", tmp_path)) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stages = [x["stage"] for x in lines]
    assert stages == sorted(stages, key=["sft", "reward", "ppo"].index)  # in order, none lost
    assert {"sft", "reward", "ppo"} == set(stages)
    ppo = [x for x in lines if x["stage"] == "ppo"]
    assert [x["step"] for x in ppo] == [1, 2] and all("reward/model_mean" in x for x in ppo)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["stages"]) == {"sft", "reward", "ppo"}
    assert summary["reward_last"] == ppo[-1]["reward/mean"]

    # PPO started from the SFT policy: its reference is exactly the SFT params
    config = load_config(tmp_path / "config.yaml")
    from jaxrec.train.loop import PPORun
    from jaxrec.train.stages import reward_model_for_ppo, sft_policy

    sft = load_sft_params(config, tmp_path)
    run = PPORun(config, sft_policy(config, tmp_path), reward_model_for_ppo(config, tmp_path))
    state = run.initial()[0]
    for a, b in zip(jax.tree.leaves(state.frozen["ref"]), jax.tree.leaves(sft), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a rerun finds every stage finished and changes nothing
    before = (tmp_path / "metrics.jsonl").read_text()
    assert main(_argv("train", tmp_path)) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before

    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "hf")]) == 0
    assert load_export(tmp_path / "hf")[0]["stage"] == "ppo"
    assert main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "hf-sft"),
                 "--stage", "sft"]) == 0
    assert load_export(tmp_path / "hf-sft")[0]["stage"] == "sft"


def test_ppo_on_the_reward_model_needs_the_reward_stage(tmp_path, capsys):
    argv = _argv("ppo", tmp_path) + ["--set", "reward.ppo_source=model"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a trained reward model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sigterm_saves_the_stage_and_the_rerun_resumes(tmp_path, stage):
    import signal
    import subprocess
    import sys
    import time

    from jaxrec.checkpoint import Checkpointer

    argv = [sys.executable, "-m", "jaxrec", stage, "--workdir", str(tmp_path)]
    for item in [*TINY, f"{stage}.steps=100000", f"{stage}.eval_every=100000"]:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= 3:  # step 0 and two steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    ckpt = Checkpointer(tmp_path / "checkpoints" / stage)
    assert ckpt.latest_step() == lines[-1]["step"] >= 2  # the last finished step was saved
    ckpt.close()

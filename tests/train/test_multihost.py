"""Several processes (JAX's multi-process runtime with CPU gloo collectives on localhost):
two processes of two devices each run the SFT, reward and PPO stages on one 4-device mesh, end with
identical params, equal to one process of four devices with the same global batch, and only
process 0 writes the run's files."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import Checkpointer
from jaxrec.cli import main
from jaxrec.config import load_config
from jaxrec.train.loop import PPORun

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[2]
TINY = ["rollout.users=8", "ppo.minibatches=2", "ppo.epochs=1", "sim.n_items=30",
        "sim.n_topics=3", "rollout.history_items=2", "model.d_model=32", "model.n_layers=1",
        "ppo.iterations=2", "monitor.eval_every=1", "monitor.sample_every=1", "mesh.shard=true",
        "stages=[sft, reward, ppo]", "sft.steps=4", "sft.eval_every=2", "sft.batch_size=8",
        "sft.eval_users=16", "reward.steps=4", "reward.eval_every=2", "reward.batch_size=8",
        "reward.eval_pairs=32", "reward.normalize_samples=16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(workdir, out, devices, *multi):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    cmd = [sys.executable, str(WORKER), str(workdir), str(out), str(devices), *map(str, multi),
           "--", *TINY]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_train_as_one_four_device_run(tmp_path):
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [_spawn(multi, tmp_path / f"p{i}.npz", 2, f"localhost:{port}", 2, i)
             for i in range(2)]
    procs.append(_spawn(single, tmp_path / "single.npz", 4))
    logs = [_finish(p) for p in procs]

    p0, p1, one = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "single"))
    assert int(p0["process_count"]) == 2 and int(one["process_count"]) == 1
    names = [k for k in p0.files if k != "process_count"]
    assert len(names) > 10
    for name in names:
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)  # one replica
        np.testing.assert_allclose(p0[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.allclose(p0[n], 0) for n in names)

    # process 0 alone logs and writes the run's files; both wrote the checkpoint together
    assert "held-out reward" in logs[0] and "held-out reward" not in logs[1]
    steps = lambda d: [json.loads(x)["step"]
                       for x in (d / "metrics.jsonl").read_text().splitlines()]
    # SFT, the reward model, then PPO
    assert steps(multi) == steps(single) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 1, 2]
    for name in ("summary.json", "config.yaml", "plots/reward.png"):
        assert (multi / name).is_file(), name
    assert sorted(p.name for p in (multi / "checkpoints" / "ppo").iterdir()) == ["2"]
    # the two processes' checkpoint restores into this one process's 8-device mesh
    config = load_config(multi / "config.yaml")
    run = PPORun(config)
    assert run.mesh.size == 8
    state, users, key = run.initial()
    ckpt = Checkpointer(multi / "checkpoints" / "ppo")
    state = ckpt.restore(None, state, users, key)[0]
    ckpt.close()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.policy):
        np.testing.assert_array_equal(np.asarray(leaf), p0[jax.tree_util.keystr(path)])

    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (multi, single)]
    for a, b in zip(*lines, strict=True):  # the same run, up to the summation order of the
        a, b = json.loads(a), json.loads(b)  # collectives (gloo vs in-process): last bits
        for key in a:
            if not key.startswith("perf/") and isinstance(a[key], float):
                # 1 - Var ratio: near 0 its rounding error is absolute, not relative
                tol = 1e-4 if key.endswith("explained_variance") else 1e-4 * abs(b[key])
                assert abs(a[key] - b[key]) <= 1e-6 + tol, key


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost:1234"], "together"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "must be in"),
])
def test_process_arguments_are_checked(tmp_path, capsys, argv, message):
    assert main(["ppo", "--workdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_url_work_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["ppo", "--workdir", "gs://bucket/run"]) == 2
    assert "gcsfuse" in capsys.readouterr().err

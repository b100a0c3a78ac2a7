"""The PPO stage through the CLI: outputs, and a stopped run resumed gives the same run."""

import dataclasses
import json

import jax
import numpy as np

from jaxrec.checkpoint import Checkpointer
from jaxrec.cli import main
from jaxrec.config import load_config
from jaxrec.train.loop import PPORun

TINY = ["rollout.users=8", "ppo.minibatches=2", "ppo.epochs=1", "sim.n_items=30",
        "sim.n_topics=3", "rollout.history_items=2", "model.d_model=32", "model.n_layers=1",
        "checkpoint.every=1", "checkpoint.keep=5"]


def _run(workdir, iterations, capsys=None):
    argv = ["ppo", "--workdir", str(workdir), "--set", f"ppo.iterations={iterations}"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0


def _lines(workdir, drop=("perf/",)):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if not k.startswith(drop)} for x in lines]


def _final_state(workdir):
    config = load_config(workdir / "config.yaml")
    run = PPORun(config)
    state, users, key = run.initial()
    ckpt = Checkpointer(workdir / "checkpoints" / "ppo", keep=5)
    state, users, key, record = ckpt.restore(None, state, users, key)
    ckpt.close()
    return state, record


def test_ppo_stage_writes_its_outputs(tmp_path, capsys):
    _run(tmp_path, 2)
    lines = _lines(tmp_path)
    assert [x["step"] for x in lines] == [1, 2] and {x["stage"] for x in lines} == {"ppo"}
    full = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/mean", "kl/ref", "kl/coef", "ppo/clipfrac", "gen/invalid_item_frac",
                "perf/tokens_per_s"):
        assert key in full
    assert all(x["gen/invalid_item_frac"] == 0.0 for x in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["reward_last"] == lines[-1]["reward/mean"]
    assert summary["reward_window"] == 1  # min(10, iterations // 4), at least 1
    assert summary["reward_first_window"] == lines[0]["reward/mean"]
    assert summary["reward_last_window"] == lines[-1]["reward/mean"]
    assert len(summary["samples"]) == 3
    for sample in summary["samples"]:
        assert len(sample["recommended_before"]) == len(sample["recommended_after"]) == 3
        assert "(invalid)" not in sample["recommended_after"] and sample["history"]
    assert load_config(tmp_path / "config.yaml").ppo.iterations == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "ppo").iterdir()) == ["1", "2"]
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["kl.png", "return.png", "reward.png", "reward_vs_kl.png"]
    assert any((tmp_path / "tb").iterdir())  # TensorBoard event file
    (tmp_path / "plots" / "reward.png").unlink()
    assert main(["plot", "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "reward.png").stat().st_size > 1000
    # a rerun whose model does not fit the checkpoint fails in one line and leaves the work
    # dir's config as it was (export and resume still read the run's own config)
    written = (tmp_path / "config.yaml").read_text()
    argv = ["ppo", "--workdir", str(tmp_path), "--set", "ppo.iterations=3"]
    for item in [*TINY, "model.d_model=16"]:
        argv += ["--set", item]
    assert main(argv) == 2
    assert "has shape" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == written


def test_a_stopped_run_resumes_to_the_same_result(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(straight, 4)
    _run(stopped, 2)  # stops after iteration 2 (as a kill after its checkpoint would)
    _run(stopped, 4)  # the same command again, to the end
    # every metric of every iteration, bit for bit (the 2-iteration run also evaluated its
    # final iteration, which the 4-iteration run does not: held-out figures are compared in
    # the SIGKILL test, where both runs have the same config)
    drop = ("perf/", "eval/")
    assert _lines(stopped, drop) == _lines(straight, drop)
    a, record_a = _final_state(straight)
    b, record_b = _final_state(stopped)
    assert record_a["iteration"] == record_b["iteration"] == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_stage_is_a_clear_error(tmp_path, capsys):
    status = main(["train", "--workdir", str(tmp_path), "--set", "stages=[sft, polish]"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "stages='polish' is not allowed" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_held_out_evaluation_keeps_the_best_policy_and_profile_traces(tmp_path, capsys):
    argv = ["ppo", "--workdir", str(tmp_path), "--profile", "--set", "ppo.iterations=4",
            "--set", "monitor.eval_every=2", "--set", "monitor.sample_every=1"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("greedy slates") == 3 and "held-out reward" in out  # iterations 1-3
    lines = _lines(tmp_path)
    evals = {x["step"]: x["eval/reward_mean"] for x in lines if "eval/reward_mean" in x}
    assert sorted(evals) == [2, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    best_step = max(evals, key=lambda s: (evals[s], -s))
    assert summary["best"] == {"iteration": best_step, "eval_reward": evals[best_step]}
    assert [p.name for p in (tmp_path / "checkpoints" / "ppo_best").iterdir()] == [str(best_step)]
    # the best checkpoint holds the policy that scored evals[best_step]
    config = load_config(tmp_path / "config.yaml")
    run = PPORun(config)
    state, users, key = run.initial()
    ckpt = Checkpointer(tmp_path / "checkpoints" / "ppo_best")
    state = ckpt.restore(None, state, users, key)[0]
    ckpt.close()
    assert run.evaluate(state.policy)["eval/reward_mean"] == evals[best_step]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_demo_config_improves_its_metrics(tmp_path):
    """configs/demo.yaml as shipped (SFT then 40 PPO iterations, about 75 s on 2 cores): SFT
    lowers the held-out loss, then PPO raises the mean reward."""
    import pathlib

    demo = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert main(["train", "--config", str(demo), "--workdir", str(tmp_path)]) == 0
    lines = _lines(tmp_path)
    sft = [x["sft/eval_loss"] for x in lines if x["stage"] == "sft" and "sft/eval_loss" in x]
    assert sft[-1] < 0.5 * sft[0], sft
    ppo = [x for x in lines if x["stage"] == "ppo"]
    rewards = [x["reward/mean"] for x in ppo]
    assert len(rewards) == 40
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    assert last > first + 0.1, (first, last)
    assert all(x["gen/invalid_item_frac"] == 0.0 for x in ppo)


def test_make_iteration_from_a_config():
    import jaxrec

    config = load_config(None, [x for x in TINY if not x.startswith("checkpoint")])
    iteration = jaxrec.make_iteration(config)
    state, users, key = iteration.initial()
    state, users, metrics = iteration(state, users, jax.random.fold_in(key, 0))
    assert float(metrics["gen/invalid_item_frac"]) == 0.0
    assert int(state.step) == config.ppo.epochs * config.ppo.minibatches


def test_iterations_from_restored_params_compile_once():
    """A policy restored from a checkpoint sits committed on a device while the rest of the
    initial state does not; the iteration must still compile once, not again on its second
    call (as the iteration's committed outputs come back in)."""
    config = load_config(None, [x for x in TINY if not x.startswith("checkpoint")])
    fresh = PPORun(config).params
    run = PPORun(config, params=jax.device_put(fresh, jax.local_devices()[0]))
    state, users, key = run.initial()
    for i in range(2):
        state, users, _ = run.iteration(state, users, jax.random.fold_in(key, i))
    assert run.iteration._cache_size() == 1


def _spawn(workdir, iterations):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "jaxrec", "ppo", "--workdir", str(workdir), "--set",
            f"ppo.iterations={iterations}"]
    for item in TINY:
        argv += ["--set", item]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_lines(workdir, n, proc, timeout=300):
    import time

    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {n} iterations (exit {proc.poll()})")


def test_sigkill_then_the_same_command_gives_the_uninterrupted_run(tmp_path):
    import signal

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight, 5)
    proc = _spawn(killed, 5)
    _wait_for_lines(killed, 2, proc)
    proc.send_signal(signal.SIGKILL)  # at whatever point it has reached
    proc.wait()
    _run(killed, 5)  # the same command again
    assert _lines(killed) == _lines(straight)
    a, _ = _final_state(straight)
    b, _ = _final_state(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_stops(tmp_path):
    import signal

    proc = _spawn(tmp_path, 200)
    _wait_for_lines(tmp_path, 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    lines = _lines(tmp_path)
    assert len(lines) < 200
    ckpt = Checkpointer(tmp_path / "checkpoints" / "ppo", keep=5)
    assert ckpt.latest_step() == lines[-1]["step"]  # the last finished iteration was saved
    ckpt.close()
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] == "SIGTERM"


def test_every_shipped_config_is_valid():
    import pathlib

    configs = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"demo.yaml", "movielens-100k.yaml", "ml1m-gpu.yaml",
                                          "ml1m-tpu-v5e-8.yaml"}
    for path in configs:
        load_config(path)


def test_ppo_on_real_movielens_100k(tmp_path, shared_dir):
    import pathlib

    config = pathlib.Path(__file__).resolve().parents[2] / "configs" / "movielens-100k.yaml"
    argv = ["ppo", "--config", str(config), "--workdir", str(tmp_path),
            "--set", f"data.dir={shared_dir / 'data' / 'movielens'}", "--set", "ppo.iterations=2",
            "--set", "rollout.users=8", "--set", "ppo.minibatches=2", "--set", "model.d_model=32",
            "--set", "model.d_ff=64"]
    assert main(argv) == 0
    lines = _lines(tmp_path)
    assert len(lines) == 2 and all(x["gen/invalid_item_frac"] == 0.0 for x in lines)


def test_ppo_from_the_real_pretrained_stories260k(tmp_path, shared_dir):
    """A llama2.c checkpoint with its SentencePiece-style tokenizer as the initial policy."""
    model = shared_dir / "models" / "stories260K" / "stories260K.bin"
    argv = ["ppo", "--workdir", str(tmp_path), "--set", f"model.init={model}", "--set",
            "ppo.iterations=2", "--set", "checkpoint.every=1"]
    for item in TINY:
        if not item.startswith(("model.", "checkpoint.")):
            argv += ["--set", item]
    assert main(argv) == 0
    lines = _lines(tmp_path)
    assert len(lines) == 2 and all(x["gen/invalid_item_frac"] == 0.0 for x in lines)


def test_ppo_iteration_on_an_8_device_mesh_matches_one_device(tmp_path):
    """mesh.shard: the same run with state and users sharded at the jit boundary."""
    config = load_config(None, [*TINY, "ppo.iterations=1", "monitor.eval_every=0"])
    runs = {}
    for shard in (False, True):
        mesh = dataclasses.replace(config.mesh, shard=shard, data=8)
        run = PPORun(dataclasses.replace(config, mesh=mesh))
        state, users, key = run.initial()
        state, users, metrics = run.iteration(state, users, jax.random.fold_in(key, 0))
        state, users, _ = run.iteration(state, users, jax.random.fold_in(key, 1))
        runs[shard] = (state, metrics)
    (single, m1), (sharded, m8) = runs[False], runs[True]
    assert len({d.id for x in jax.tree.leaves(sharded.policy) for d in x.devices()}) == 8
    # the same first rollout (the mean may differ in the last bit: another summation order)
    assert abs(float(m8["reward/mean"]) - float(m1["reward/mean"])) < 1e-6
    for name in ("ppo/policy_loss", "ppo/value_loss", "kl/ref"):
        assert abs(float(m8[name]) - float(m1[name])) < 1e-4, name
    for a, b in zip(jax.tree.leaves(single.policy), jax.tree.leaves(sharded.policy),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_non_finite_updates_stop_the_run_without_a_checkpoint(tmp_path):
    """A policy with an inf weight: every minibatch's gradient is non-finite, the guard skips
    it, and after ppo.max_bad_iterations such iterations the run stops with a clear error."""
    import pytest

    from jaxrec.train.loop import run_ppo
    from jaxrec.train.setup import build_setup

    config = load_config(None, [*TINY, "ppo.iterations=5", "ppo.max_bad_iterations=2",
                                "checkpoint.every=3", "monitor.eval_every=0"])
    params = jax.tree.map(np.array, build_setup(config).params)
    params["final_norm"]["scale"][0] = np.inf
    with pytest.raises(FloatingPointError, match="2 consecutive iterations"):
        run_ppo(config, tmp_path, params=params)
    lines = _lines(tmp_path)
    assert [x["ppo/skipped"] for x in lines] == [1.0, 1.0]
    ckpts = tmp_path / "checkpoints" / "ppo"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_multi_turn_sessions_through_the_cli(tmp_path):
    argv = ["ppo", "--workdir", str(tmp_path)]
    for item in [*TINY, "ppo.iterations=2", "rollout.turns=3", "monitor.eval_every=2"]:
        argv += ["--set", item]
    assert main(argv) == 0
    lines = _lines(tmp_path)
    assert [x["step"] for x in lines] == [1, 2]
    assert all(1.0 <= x["sim/turns_mean"] <= 3.0 for x in lines)
    assert all(x["gen/invalid_item_frac"] == 0.0 for x in lines)
    assert "eval/reward_mean" in lines[-1]


def test_score_shaping_and_reward_weights_come_from_the_config():
    from jaxrec.config import config_from_dict
    from jaxrec.train.iteration import ScoreSpec, score_spec
    from jaxrec.train.setup import build_world

    config = config_from_dict({}, ["ppo.invalid_penalty=-3", "ppo.missing_eos_penalty=-2",
                                   "ppo.normalize_scores=true", "ppo.score_clip=4",
                                   "ppo.whiten_rewards=true", "sim.diversity=0.25",
                                   "sim.novelty=0.5", "sim.n_items=30"])
    assert score_spec(config.ppo) == ScoreSpec(invalid_penalty=-3.0, missing_eos_penalty=-2.0,
                                               normalize=True, clip=4.0, whiten_rewards=True)
    assert score_spec(config_from_dict({}, []).ppo) == ScoreSpec()  # the defaults agree
    _, params, _, _ = build_world(config)
    assert float(params.weights.diversity) == 0.25 and float(params.weights.novelty) == 0.5
    _, default, _, _ = build_world(config_from_dict({}, ["sim.n_items=30"]))
    assert float(default.weights.novelty) != 0.5

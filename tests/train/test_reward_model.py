"""The reward-model stage: Bradley-Terry pairs, held-out accuracy, normalisation, resume, and
PPO scoring rollouts with the model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import PPOConfig, config_from_dict
from jaxrec.train.iteration import _sequence_rewards, build_iteration, session_of
from jaxrec.train.reward_model import (
    RewardRun,
    bradley_terry,
    load_reward_model,
    policy_rollout,
    policy_samples,
    raw_scores,
    reward_scores,
    run_reward,
    with_reward_model,
)
from jaxrec.train.setup import build_setup
from jaxrec.train.state import create_train_state

# Two topics: a 1-layer d_model 32 policy learns the interest-vs-history signal in ~100 steps
# (with 4 topics it takes several hundred, too slow for a unit test).
TINY = {
    "seed": 0,
    "sim": {"n_items": 40, "n_topics": 2, "history_len": 6},
    "rollout": {"users": 64, "slate_size": 2, "history_items": 3},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
    "reward": {"steps": 200, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10,
               "eval_every": 50, "eval_pairs": 256, "normalize_samples": 256},
}


def _config(**reward):
    tree = json.loads(json.dumps(TINY))
    tree["reward"].update(reward)
    return config_from_dict(tree)


def _lines(workdir, stage="reward"):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if stage is None or x["stage"] == stage]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward")
    other = {"stage": "sft", "step": 3, "sft/loss": 1.5}  # an earlier stage's line
    (workdir / "metrics.jsonl").write_text(json.dumps(other) + "\n")
    config = _config()
    logs = []
    summary = run_reward(config, workdir, log=logs.append)
    return config, workdir, summary, logs


def test_bradley_terry_by_hand():
    # margins 2, 0, -1 with weights 1, 1, 0: loss = (log(1 + e^-2) + log 2) / 2, acc (1 + .5) / 2
    loss, acc = bradley_terry(jnp.array([3.0, 1.0, 0.0]), jnp.array([1.0, 1.0, 1.0]),
                              jnp.array([1.0, 1.0, 0.0]))
    assert float(loss) == pytest.approx((np.log1p(np.exp(-2.0)) + np.log(2.0)) / 2, rel=1e-6)
    assert float(acc) == pytest.approx(0.75)


def test_simulator_pairs_teach_a_held_out_preference(trained):
    config, workdir, summary, logs = trained
    assert summary["pairs"] == "simulator" and summary["steps"] == 200
    assert summary["eval_acc_first"] == 0.5  # a zero head ties every pair
    assert summary["eval_acc_last"] > 0.62, summary
    assert summary["eval_acc_last"] > summary["eval_acc_first"] + 0.1
    assert summary["eval_loss_last"] < summary["eval_loss_first"]
    lines = _lines(workdir)
    assert [x["step"] for x in lines] == list(range(201))
    evals = [x["step"] for x in lines if "reward_model/eval_acc" in x]
    assert evals == [0, 50, 100, 150, 200]
    assert all(np.isfinite(x["reward_model/loss"]) for x in lines[1:])
    assert _lines(workdir, "sft") == [{"stage": "sft", "step": 3, "sft/loss": 1.5}]  # kept
    steps = sorted(int(p.name) for p in (workdir / "checkpoints" / "reward").iterdir())
    assert steps[-1] == 200 and len(steps) <= config.checkpoint.keep
    assert any((workdir / "tb").iterdir())
    assert any("accuracy 0.500 ->" in line for line in logs)


def test_normalised_scores_of_the_starting_policy(trained):
    config, workdir, summary, _ = trained
    setup = build_setup(config)
    rm = load_reward_model(config, workdir, setup=setup)
    assert float(rm.mean) == pytest.approx(summary["norm_mean"], rel=1e-5)
    assert float(rm.std) == pytest.approx(summary["norm_std"], rel=1e-5)
    # The normalisation's own samples: exactly mean 0, std 1.
    mean, std = RewardRun(config, setup=setup).normalisation(rm.params)
    assert (mean, std) == pytest.approx((float(rm.mean), float(rm.std)), rel=1e-5)
    # Fresh samples of the starting policy: about mean 0, std 1.
    chunks = policy_samples(setup, setup.params, jax.random.key(99), 256, 64)
    scores = np.concatenate([np.asarray(jax.jit(reward_scores)(rm, t, v)) for t, v in chunks])
    assert abs(scores.mean()) < 0.2 and 0.8 < scores.std() < 1.25, (scores.mean(), scores.std())
    # A second call returns the finished stage's summary at once.
    logs = []
    assert run_reward(config, workdir, log=logs.append) == summary
    assert any("finished" in line for line in logs)


PPO = PPOConfig(epochs=1, minibatches=2, policy_lr=1e-3, value_lr=1e-3, kl_coef=0.1,
                temperature=1.0)


def test_ppo_iteration_scores_rollouts_with_the_reward_model(trained):
    """One compiled iteration ('mix', the model passed in state.frozen); the 'model' source and
    the closed-over model through the same scoring function."""
    config, workdir, _, _ = trained
    setup = build_setup(config)
    rm = load_reward_model(config, workdir, setup=setup)
    env, params, codec, spec = setup.env, setup.env_params, setup.codec, setup.spec
    _, users = env.reset_batch(jax.random.key(7), 64, params)
    key = jax.random.key(11)
    # What the iteration's rollout samples (same params, users and key), scored directly.
    ro = policy_rollout(setup, setup.params, users, jax.random.split(key)[0])
    tokens = jnp.concatenate([ro.prompt, ro.completion], axis=1)
    valid = jnp.concatenate([ro.prompt_valid, ro.completion_mask], axis=1)
    direct = reward_scores(rm, tokens, valid)  # [B]
    sim = float(ro.reward.mean())
    assert bool(ro.item_valid.all()) and bool(ro.has_eos.all())  # no penalties below
    assert abs(float(direct.mean()) - sim) > 0.05  # the two sources are distinguishable

    state = create_train_state(setup.model, PPO, jax.tree.map(jnp.copy, setup.params))
    state = with_reward_model(state, rm)  # a copy: the iteration donates its state
    iteration = build_iteration(PPO, spec, env, params, codec, reward_model=rm,
                                reward_source="mix", reward_mix=0.25)
    state, _, metrics = iteration(state, users, key)
    assert "reward" in state.frozen
    m = {k: float(v) for k, v in metrics.items()}
    assert m["reward/model_mean"] == pytest.approx(float(direct.mean()), abs=1e-4)
    assert m["reward/score_mean"] == pytest.approx(0.75 * sim + 0.25 * float(direct.mean()),
                                                   abs=1e-4)
    assert m["reward/mean"] == pytest.approx(sim, abs=1e-5)  # the simulator's, still logged

    bare = create_train_state(setup.model, PPO, setup.params)  # no frozen["reward"]
    score = jax.jit(_sequence_rewards, static_argnums=(5, 6))
    for source, expected in (("model", direct), ("simulator", ro.reward)):
        for st in (bare, with_reward_model(bare, rm)):
            got, logged = score(st, session_of(ro), tokens, valid, rm, source, 0.5)
            np.testing.assert_allclose(got, np.asarray(expected)[:, None], atol=1e-5)  # [B, 1]
            assert ("reward/model_mean" in logged) == (source == "model")
    with pytest.raises(ValueError, match="needs a reward_model"):
        build_iteration(PPO, spec, env, params, codec, reward_source="model")
    with pytest.raises(ValueError, match="reward_source="):
        build_iteration(PPO, spec, env, params, codec, reward_model=rm, reward_source="both")


def test_the_score_is_the_head_at_the_last_real_token(trained):
    config, workdir, _, _ = trained
    rm = load_reward_model(config, workdir)
    tokens = jnp.array([[0, 5, 6, 7, 0], [0, 0, 5, 6, 7]], jnp.int32)
    valid = jnp.array([[False, True, True, True, False], [False, False, True, True, True]])
    a, b = np.asarray(raw_scores(rm.model, rm.params, tokens, valid))
    assert a == pytest.approx(b, abs=1e-5)  # padding on either side changes nothing
    doubled = rm.replace(params={**rm.params, "value_head": 2 * rm.params["value_head"],
                                 "value_bias": 2 * rm.params["value_bias"]})
    np.testing.assert_allclose(raw_scores(rm.model, doubled.params, tokens, valid),
                               2 * raw_scores(rm.model, rm.params, tokens, valid), rtol=1e-5)


def test_a_stopped_stage_resumes_to_the_same_model(tmp_path):
    small = dict(eval_every=2, normalize_samples=64)  # the fixture's shapes: its compiles
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    quiet = lambda _: None
    run_reward(_config(steps=6, **small), straight, log=quiet)
    run_reward(_config(steps=4, **small), stopped, log=quiet)  # stops after step 4
    logs = []
    run_reward(_config(steps=6, **small), stopped, log=logs.append)  # the same run, to 6
    assert any("resuming the reward stage at step 4" in line for line in logs)
    assert _lines(stopped) == _lines(straight)  # every metric of every step, bit for bit
    config = _config(steps=6, **small)
    a, b = load_reward_model(config, straight), load_reward_model(config, stopped)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="needs a MovieLens data.source") as err:
        run_reward(_config(pairs="ratings"), tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="run the 'reward' stage first"):
        load_reward_model(_config(), tmp_path / "empty")


def test_ratings_pairs_on_movielens_100k(shared_dir):
    config = config_from_dict({
        "seed": 0, "data": {"source": "movielens-100k",
                            "dir": str(shared_dir / "data/movielens")},
        "sim": {"preset": "movielens", "history_len": 8},
        "rollout": {"users": 8, "slate_size": 2, "history_items": 2},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
        "reward": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_pairs": 128},
    })
    run = RewardRun(config).prepare()
    assert run.kind == "ratings"  # 'auto' with a MovieLens source
    train, held = run.train_data, run.eval_batch
    assert held.weight.shape == (128,) and float(held.weight.sum()) == 128
    train_users = set(np.asarray(train["user"]).tolist())
    assert run.counts["train_pairs"] > 10_000 and len(train_users) > 800
    # Held-out pairs come from users never trained on.
    assert not set(np.asarray(run.eval_data["user"]).tolist()) & train_users
    # No pair names an item of the user's own history (what PPO's prompt shows and bans).
    table = np.asarray(train["histories"])[np.asarray(train["user"])]
    assert not (table == np.asarray(train["hi"])[:, None]).any()
    assert not (table == np.asarray(train["lo"])[:, None]).any()
    state = run.initial()[0]
    first = run.evaluate(state.params)
    for i in range(40):
        state, metrics = run.step(state, i)
    last = run.evaluate(state.params)
    assert first["reward_model/eval_acc"] == 0.5
    assert np.isfinite(last["reward_model/eval_loss"]) and np.isfinite(float(metrics[
        "reward_model/loss"]))


def test_reward_stage_on_an_8_device_mesh_matches_one_device(tmp_path):
    """mesh.shard: the model and its optimizer state split by the logical-axis rules, each
    batch of pairs split over the devices; the same losses, accuracy, normalisation, params."""
    runs = {}
    for shard in (False, True):
        tree = json.loads(json.dumps(TINY))
        tree["reward"].update(steps=6, eval_every=3, eval_pairs=64, normalize_samples=64)
        tree["mesh"] = {"shard": shard, "data": 2, "fsdp": 4}
        config = config_from_dict(tree)
        workdir = tmp_path / str(shard)
        summary = run_reward(config, workdir, log=lambda *a: None)
        runs[shard] = (_lines(workdir), summary, load_reward_model(config, workdir))
    (lines1, sum1, rm1), (lines8, sum8, rm8) = runs[False], runs[True]
    for a, b in zip(lines1, lines8, strict=True):
        for key, value in a.items():
            if key.startswith("reward_model/"):
                assert abs(value - b[key]) < 1e-5, (a["step"], key)
    # The scalar head bias cancels in chosen - rejected: its gradient is float noise, which
    # Adam turns into +-lr steps, differently for another summation order. It shifts every
    # score alike, so the mean of the scores moves with it and nothing else does.
    bias1, bias8 = float(rm1.params["value_bias"]), float(rm8.params["value_bias"])
    assert abs((sum1["norm_mean"] - bias1) - (sum8["norm_mean"] - bias8)) < 1e-5
    assert abs(sum1["norm_std"] - sum8["norm_std"]) < 1e-5
    drop_bias = lambda p: {k: v for k, v in p.items() if k != "value_bias"}
    for x, y in zip(jax.tree.leaves(drop_bias(rm1.params)), jax.tree.leaves(drop_bias(rm8.params)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)

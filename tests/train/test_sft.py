"""The SFT stage: examples are the rollout's prompts and slates, it learns, it resumes exactly."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.codec import decode_slate
from jaxrec.config import SFTConfig, config_from_dict
from jaxrec.rollout import rollout
from jaxrec.train import sft
from jaxrec.train.placement import Placement
from jaxrec.train.setup import build_setup

# One small world and model for every test, so the jitted pieces compile once per process.
BASE = {
    "sim": {"n_items": 24, "n_topics": 4, "history_len": 6},
    "model": {"d_model": 32, "n_layers": 1, "d_ff": 64},
    "rollout": {"history_items": 2, "slate_size": 2},
    "sft": {"steps": 150, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "eval_every": 50,
            "eval_users": 64, "examples_per_user": 2},
    "checkpoint": {"every": 50, "keep": 2},
}


def _config(*overrides):
    return config_from_dict(copy.deepcopy(BASE), list(overrides))  # overrides write into it


def _quiet(*args):
    pass


def _lines(workdir, stage="sft"):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("stage") == stage]


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _norm(params):
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in _leaves(params))))


def test_cut_examples_by_hand():
    # user u's history is 100 u, 100 u + 1, ...: an example's slate names its user and cut
    lengths = [3, 5, 9, 2]
    hist = sft.histories_from_lists([100 * u + np.arange(n) for u, n in enumerate(lengths)])
    users = sft.users_with_examples(hist, slate_size=2)
    assert users.tolist() == [0, 1, 2]  # user 3 has no room for context and a slate of 2
    windows, slates = sft.cut_examples(hist, users, 3, 2, 3, np.random.default_rng(0))
    assert windows.shape == (1 + 3 + 3, 3) and slates.shape == (7, 2)
    cuts = {}
    for window, slate in zip(windows, slates, strict=True):
        u, j = divmod(int(slate[0]), 100)
        assert j >= 1 and j <= lengths[u] - 2 and slate[1] == slate[0] + 1
        before = [100 * u + i if i >= 0 else -1 for i in range(j - 3, j)]
        assert window.tolist() == before  # the 3 items before the cut, -1 padded at the front
        cuts.setdefault(u, []).append(j)
    assert {u: len(set(j)) for u, j in cuts.items()} == {0: 1, 1: 3, 2: 3}  # distinct cuts


def test_split_users_is_disjoint_and_bad_sizes_are_one_line_errors(tmp_path):
    hist = sft.histories_from_lists([np.arange(n) for n in (4, 4, 4, 1, 4)])
    train, held = sft.split_users(hist, 2, 2, np.random.default_rng(0))
    assert len(held) == 2 and len(train) == 2 and not set(train) & set(held)
    assert 3 not in set(train) | set(held)
    with pytest.raises(ValueError) as err:
        sft.split_users(hist, 2, 4, np.random.default_rng(0))
    message = str(err.value)
    assert "4 of 5 users" in message and "sft.eval_users=4" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(ValueError, match=r"sim.history_len=5 cannot hold the 6 items an"):
        sft.run_sft(_config("rollout.slate_size=5", "sim.history_len=5"), tmp_path, log=_quiet)


def test_examples_are_the_rollout_prompts_and_slates():
    config = _config()
    setup = build_setup(config)
    data = sft.build_sft_data(config, setup)
    ex = jax.tree.map(lambda x: x[:8], data.eval)
    k = setup.spec.slate_size
    # the completion spells the next K items, then EOS: what PPO's decoding reads back
    items, valid = decode_slate(setup.codec, ex.completion, ex.completion_mask, k)
    assert bool(valid.all()) and np.array_equal(items[:, 0], ex.next_item)
    ends = ex.completion_mask.sum(axis=1) - 1
    assert np.all(np.asarray(ex.completion)[np.arange(8), ends] == setup.codec.eos_id)
    # a rollout for users whose observed history is the window renders the same prompt
    _, users = setup.env.reset_batch(jax.random.key(0), 8, setup.env_params)
    users = users.replace(history=ex.history)
    spec = dataclasses.replace(setup.spec, temperature=0.0)
    turn = jax.jit(rollout, static_argnums=(0, 3, 7))
    out, _ = turn(setup.model, setup.params, setup.codec, setup.env, setup.env_params, users,
                  jax.random.key(1), spec)
    np.testing.assert_array_equal(out.prompt, ex.prompt)
    np.testing.assert_array_equal(out.prompt_valid, ex.prompt_valid)
    text = setup.tokenizer.decode(np.asarray(ex.prompt[0])[np.asarray(ex.prompt_valid[0])])
    assert text.endswith(". Next:") and setup.titles[int(ex.history[0, -1])] in text


def test_loss_equation_and_l2_modes_of_the_optimizer():
    config = _config()
    setup = build_setup(config)
    data = sft.build_sft_data(config, setup)
    batch = jax.tree.map(lambda x: x[:4], data.train)
    plain, aux = sft.sft_loss(setup.params, setup.model, batch, 0.0)
    nll, count = sft.completion_nll(setup.model, setup.params, batch)
    np.testing.assert_allclose(plain, nll.sum() / count.sum(), rtol=1e-6)
    with_l2, _ = sft.sft_loss(setup.params, setup.model, batch, 0.5)
    np.testing.assert_allclose(with_l2 - plain, 0.5 * aux["param_sq"], rtol=1e-5)
    # 'decoupled': with zero gradients AdamW's step is -lr(0) * l2 * theta
    params = {"w": jnp.arange(1.0, 4.0)}
    tx = sft.make_sft_optimizer(SFTConfig(l2=0.1, l2_mode="decoupled", lr=1e-2, warmup_steps=4))
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -(1e-2 / 4) * 0.1 * params["w"], rtol=1e-6)
    tx = sft.make_sft_optimizer(SFTConfig(l2=0.1, l2_mode="loss"))
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], np.zeros(3))  # 'loss': the optimizer never decays


def _successor_histories(setup, n_users, key):
    """A world whose next item is determined: user histories walk the catalogue i, i + 1, ..."""
    n, h = setup.env.n_items, setup.config.sim.history_len
    start = np.asarray(jax.random.randint(key, (n_users,), 0, n))
    return sft.histories_from_rows((start[:, None] + np.arange(h)) % n)


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_learns_next_items_where_they_are_predictable(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(sft, "synthetic_histories", _successor_histories)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "ppo", "step": 1}) + "\n")
    config = _config(f"seed={seed}")
    summary = sft.run_sft(config, tmp_path, log=_quiet)
    assert summary["eval_loss_last"] < 0.2 * summary["eval_loss_first"]
    assert summary["next_item_acc_first"] < 0.15 < 0.45 < summary["next_item_acc_last"]
    lines = _lines(tmp_path)
    assert [x["step"] for x in lines] == list(range(151))
    assert [x["step"] for x in lines if "sft/eval_loss" in x] == [0, 50, 100, 150]
    assert _lines(tmp_path, "ppo") == [{"stage": "ppo", "step": 1}]  # other stages' lines kept
    assert json.loads((tmp_path / "sft_summary.json").read_text()) == summary
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "sft").iterdir()) == ["100", "150"]
    assert any((tmp_path / "tb").iterdir())
    assert sft.run_sft(config, tmp_path, log=_quiet) == summary  # finished: returns at once
    params = sft.load_sft_params(config, tmp_path)
    like = build_setup(config).params
    assert jax.tree.structure(params) == jax.tree.structure(like)
    assert all(a.shape == b.shape for a, b in zip(_leaves(params), _leaves(like), strict=True))


def test_a_continued_run_ends_with_the_uninterrupted_params(tmp_path):
    """The real synthetic world: held-out loss falls; stopping at 60 and continuing to 150
    gives the straight run's params and train metrics bit for bit."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    config = _config()
    summary = sft.run_sft(config, straight, log=_quiet)
    assert summary["eval_loss_last"] < 0.3 * summary["eval_loss_first"]
    assert 0.0 <= summary["next_item_acc_last"] <= 1.0
    sft.run_sft(_config("sft.steps=60"), stopped, log=_quiet)
    sft.run_sft(config, stopped, log=_quiet)
    a, b = _lines(straight), _lines(stopped)
    assert [x["sft/loss"] for x in a[1:]] == [x["sft/loss"] for x in b[1:]]
    assert [x["step"] for x in b if "sft/eval_loss" in x] == [0, 50, 60, 100, 150]
    for x, y in zip(_leaves(sft.load_sft_params(config, straight)),
                    _leaves(sft.load_sft_params(config, stopped)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_l2_in_the_loss_and_decoupled_both_shrink_the_params(tmp_path):
    norms = {}
    for name, mode, l2 in [("none", "loss", 0.0), ("loss", "loss", 1.0),
                           ("decoupled", "decoupled", 10.0)]:
        config = _config("sft.steps=40", "sft.eval_every=40", f"sft.l2={l2}",
                         f"sft.l2_mode={mode}")
        sft.run_sft(config, tmp_path / name, log=_quiet)
        norms[name] = _norm(sft.load_sft_params(config, tmp_path / name))
    # Adam moves a param by about lr per step whatever the penalty's size: 40 steps at 3e-3
    # take 0.12 off weights of rms ~0.15 ('none' ends at 21.2, 'loss' 12.8, 'decoupled' 8.8)
    assert norms["loss"] < 0.75 * norms["none"]
    assert norms["decoupled"] < 0.6 * norms["none"]


def test_sft_on_real_movielens_100k(tmp_path, shared_dir):
    """Real chronological histories (the training split), 943 users of whom 64 held out."""
    config = _config("data.source=movielens-100k", f"data.dir={shared_dir / 'data/movielens'}",
                     "sim.preset=movielens", "sim.history_len=20", "sft.steps=60",
                     "sft.eval_every=60", "sft.examples_per_user=1", "sft.lr=0.02",
                     "sft.warmup_steps=5")
    summary = sft.run_sft(config, tmp_path, log=_quiet)
    assert summary["train_examples"] == 943 - 64 and summary["eval_examples"] == 64
    assert summary["eval_loss_last"] < 0.8 * summary["eval_loss_first"]  # 7.58 -> 5.35


def test_sft_on_an_8_device_mesh_matches_one_device(tmp_path):
    """mesh.shard: params and optimizer state split by the logical-axis rules, each batch's
    rows over the devices; the same draws, losses and params as on one device."""
    runs = {}
    for shard in (False, True):
        config = _config("sft.steps=6", "sft.eval_every=3", f"mesh.shard={str(shard).lower()}",
                         "mesh.data=2", "mesh.fsdp=4")
        workdir = tmp_path / str(shard)
        sft.run_sft(config, workdir, log=_quiet)
        runs[shard] = (_lines(workdir), sft.load_sft_params(config, workdir))
    (lines1, params1), (lines8, params8) = runs[False], runs[True]
    for a, b in zip(lines1, lines8, strict=True):
        for key in ("sft/loss", "sft/eval_loss", "sft/next_item_acc"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key)
    for x, y in zip(_leaves(params1), _leaves(params8), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)

    setup = build_setup(config)
    tx = sft.make_sft_optimizer(config.sft)
    placed = Placement(config, setup.model, config.sft.batch_size, "sft.batch_size")
    state = placed.train_state(lambda p: sft.init_sft_state(p, tx), setup.params, tx)
    embed = state.params["embed"]
    assert len(embed.devices()) == 8
    assert embed.addressable_shards[0].data.shape[1] == embed.shape[1] // 4  # fsdp=4

"""PPO-ptx (ppo.ptx_coef > 0): every iteration draws fresh rows of the SFT stage's training
examples into the PPO batch, and their NLL falls with the term while plain PPO lets it rise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import config_from_dict
from jaxrec.generation import sequence_scores
from jaxrec.train import sft
from jaxrec.train.loop import PPORun
from jaxrec.train.setup import build_setup

TINY = ["rollout.users=16", "ppo.minibatches=2", "ppo.epochs=2", "sim.n_items=30",
        "sim.n_topics=3", "sim.history_len=6", "rollout.history_items=3", "model.d_model=32",
        "model.n_layers=1", "model.d_ff=64", "ppo.policy_lr=3e-3", "ppo.kl_coef=0.0",
        "ppo.kl_adaptive=false", "sft.steps=50", "sft.batch_size=32", "sft.lr=3e-3",
        "sft.eval_every=50", "sft.eval_users=32", "sft.examples_per_user=2"]


def _config(*extra):
    return config_from_dict({}, [*TINY, *extra])


def _nll(model, params, rows: sft.PtxRows) -> float:
    logps = sequence_scores(model, params, rows.tokens, rows.valid).logps
    return float(-jnp.sum(jnp.where(rows.mask, logps, 0.0)) / jnp.sum(rows.mask))


@pytest.mark.parametrize("items", ["text", "tokens"])
def test_ptx_nll_falls_with_the_term_and_rises_without_it(tmp_path, items):
    base = _config(f"model.items={items}")
    sft.run_sft(base, tmp_path, log=lambda *a: None)
    params = sft.load_sft_params(base, tmp_path)
    setup = build_setup(base)
    rows = sft.ptx_rows(sft.build_sft_data(base, setup).train, setup.codec)
    start = _nll(setup.model, params, rows)
    after = {}
    for coef in (0.0, 2.0):
        run = PPORun(_config(f"model.items={items}", f"ppo.ptx_coef={coef}"),
                     params=jax.tree.map(jnp.copy, params))  # the iteration donates its state
        assert (run.ptx is None) == (coef == 0.0)
        state, users, key = run.initial()
        assert ("ptx" in state.frozen) == (coef > 0)
        metrics = None
        for i in range(4):
            state, users, metrics = run.iteration(state, users, jax.random.fold_in(key, i))
        assert ("ppo/ptx_nll" in metrics) == (coef > 0)
        after[coef] = _nll(setup.model, state.policy_params(), rows)
    assert after[2.0] < start < after[0.0], (start, after)


def test_ptx_rows_count_the_predicted_items_only():
    config = _config("model.items=tokens")
    setup = build_setup(config)
    data = sft.build_sft_data(config, setup)
    rows = sft.ptx_rows(data.train, setup.codec)
    _, count = sft.sequence_nll(setup.model, setup.codec, setup.params, data.train)
    assert int(rows.mask.sum()) == int(count)  # the same targets as the SFT loss
    text = _config()
    setup = build_setup(text)
    data = sft.build_sft_data(text, setup)
    rows = sft.ptx_rows(data.train, setup.codec)
    p = data.train.prompt.shape[1]
    assert not rows.mask[:, :p].any()
    np.testing.assert_array_equal(rows.mask[:, p:], data.train.completion_mask)
    drawn = sft.draw_ptx(rows, jax.random.key(0), 8)
    again = sft.draw_ptx(rows, jax.random.key(0), 8)
    assert drawn.tokens.shape == (8, rows.tokens.shape[1])
    np.testing.assert_array_equal(drawn.tokens, again.tokens)

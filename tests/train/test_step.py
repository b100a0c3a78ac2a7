"""The pure PPO step: jit, vmap over seeds, what it trains and what it leaves alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import PPOConfig
from jaxrec.models import init_params, llama_config
from jaxrec.train import PPOBatch, create_train_state, ppo_step

CFG = llama_config(vocab_size=48, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                   max_len=32)
PPO = PPOConfig(epochs=2, minibatches=2, policy_lr=1e-3, value_lr=1e-3)
# For comparing two paths to the same update (vmap, the action window): their gradients differ
# in the last bits, and Adam moves a param by up to lr * d / eps per step for a rounding
# difference d in a near-zero gradient. eps 1e-6 bounds that at 1e3 d per step (eps 1e-8: 1e5 d,
# which moved a down-projection by 3e-6 to 9e-6 on an AVX2-only EPYC).
PPO_COMPARED = PPO.replace(adam_eps=1e-6)


def _assert_same_params(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def _batch(seed=0, rows=8, length=10, sft=False):
    rng = np.random.default_rng(seed)
    action = np.zeros((rows, length), bool)
    action[:, 5:] = True
    f = lambda: rng.normal(size=(rows, length)).astype(np.float32)
    old_logp = np.where(action, -np.log(CFG.vocab_size), 0.0).astype(np.float32)
    extra = {}
    if sft:
        extra = dict(sft_tokens=jnp.asarray(rng.integers(0, 48, (4, 7)), jnp.int32),
                     sft_mask=jnp.asarray(np.arange(7)[None].repeat(4, 0) >= 3))
    return PPOBatch(
        tokens=jnp.asarray(rng.integers(0, 48, (rows, length)), jnp.int32),
        valid=jnp.ones((rows, length), bool), action_mask=jnp.asarray(action),
        old_logp=jnp.asarray(old_logp), ref_logp=jnp.asarray(old_logp),
        old_values=jnp.zeros((rows, length), jnp.float32),
        advantages=jnp.asarray(np.where(action, f(), 0)),
        returns=jnp.asarray(np.where(action, f(), 0)), **extra,
    )


def _state(cfg=PPO, seed=0):
    return create_train_state(CFG, cfg, init_params(CFG, jax.random.key(seed)))


step = jax.jit(ppo_step, static_argnums=3)


def test_step_trains_policy_and_value_and_keeps_the_reference():
    state = _state()
    new, metrics = step(state, _batch(), jax.random.key(0), PPO)
    assert int(new.step) == PPO.epochs * PPO.minibatches
    moved = lambda a, b: not np.allclose(np.asarray(a), np.asarray(b))
    assert moved(state.policy["embed"], new.policy["embed"])
    assert moved(state.value["value_head"], new.value["value_head"])
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(new.frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl",
                 "ppo/entropy", "ppo/ratio_mean", "ppo/explained_variance"):
        assert np.isfinite(float(metrics[name])), name
    # On the first minibatch the ratio is exactly 1 only if old_logp were the policy's own;
    # here they are uniform, so the ratio differs from 1 and clipping has work to do.
    assert float(metrics["ppo/ratio_mean"]) != 1.0


def test_value_loss_falls_over_repeated_updates_on_one_batch():
    state, batch = _state(), _batch()
    losses = []
    for i in range(5):
        state, metrics = step(state, batch, jax.random.key(i), PPO)
        losses.append(float(metrics["ppo/value_loss"]))
    assert losses[-1] < losses[0] * 0.8, losses


def test_vmap_over_four_seeds():
    states = jax.vmap(lambda k: _state_from_key(k))(jax.random.split(jax.random.key(0), 4))
    keys = jax.random.split(jax.random.key(1), 4)
    batch = _batch()
    new, metrics = jax.jit(jax.vmap(ppo_step, in_axes=(0, None, 0, None)), static_argnums=3)(
        states, batch, keys, PPO_COMPARED
    )
    assert metrics["ppo/policy_loss"].shape == (4,)
    # Each seed equals its own un-vmapped run (every param, up to the summation order).
    for i in (0, 3):
        one = jax.tree.map(lambda x, i=i: x[i], states)
        single, m = step(one, batch, keys[i], PPO_COMPARED)
        _assert_same_params(jax.tree.map(lambda x, i=i: x[i], new.policy), single.policy)
        assert float(metrics["ppo/policy_loss"][i]) == pytest.approx(
            float(m["ppo/policy_loss"]), abs=1e-5)
    assert not np.allclose(new.policy["embed"][0], new.policy["embed"][1])


def _state_from_key(key):
    return create_train_state(CFG, PPO_COMPARED, init_params(CFG, key))


def test_shared_value_head_trains_in_the_joint_loss():
    cfg = PPO.replace(shared_value=True)
    state = _state(cfg)
    assert state.value == {} and "value_head" in state.policy
    assert "value_head" not in state.frozen["ref"]
    new, metrics = step(state, _batch(), jax.random.key(0), cfg)
    assert not np.allclose(state.policy["value_head"], new.policy["value_head"])
    assert "ppo/value_loss" in metrics


def test_ptx_term_pulls_towards_the_sft_tokens():
    batch = _batch(sft=True)
    cfg = PPO.replace(ptx_coef=1.0)
    _, with_ptx = step(_state(cfg), batch, jax.random.key(0), cfg)
    assert "ppo/ptx_nll" in with_ptx
    # The SFT NLL falls over a few steps when the PPO advantages are zero.
    zero_adv = batch.replace(advantages=jnp.zeros_like(batch.advantages))
    state, nlls = _state(cfg), []
    for i in range(4):
        state, m = step(state, zero_adv, jax.random.key(i), cfg)
        nlls.append(float(m["ppo/ptx_nll"]))
    assert nlls[-1] < nlls[0]


def test_gradient_accumulation_takes_fewer_optimizer_steps():
    cfg = PPO.replace(grad_accum=2)
    state = _state(cfg)
    new, _ = step(state, _batch(), jax.random.key(0), cfg)
    # MultiSteps applies an update every 2 minibatches: params move, at half the steps.
    assert not np.allclose(state.policy["embed"], new.policy["embed"])
    assert int(new.policy_opt.gradient_step) == PPO.epochs * PPO.minibatches // 2


def test_accumulated_minibatches_equal_one_minibatch_of_their_rows():
    """grad_accum averages gradients of sum / (group count / k): the group's update is the one
    of a single minibatch holding all its rows, however unequal their action counts."""
    batch = _batch()
    action = np.zeros((8, 10), bool)
    action[:, 9] = True  # one action in rows 0-6, nine in row 7: any 2-way split is unequal
    action[7, 1:] = True
    batch = batch.replace(action_mask=jnp.asarray(action))
    # Adam's first step is -lr g / (|g| + eps): with eps = 1 it is close to -g, so the params'
    # change shows the gradient itself (with a small eps it is about -lr sign(g))
    one = PPO.replace(epochs=1, minibatches=1, whiten_advantages=False, policy_lr=1.0,
                      value_lr=1.0, adam_eps=1.0)
    acc = one.replace(minibatches=2, grad_accum=2)  # the group is all 8 rows, in any order
    start = _state(one)
    s1, _ = step(start, batch, jax.random.key(0), one)
    s2, _ = step(_state(acc), batch, jax.random.key(0), acc)
    assert int(s2.policy_opt.gradient_step) == 1
    for tree in ("policy", "value"):
        leaves = [jax.tree.leaves(getattr(s, tree)) for s in (start, s1, s2)]
        for a, b, c in zip(*leaves, strict=True):
            one_step, accumulated = np.asarray(b) - np.asarray(a), np.asarray(c) - np.asarray(a)
            np.testing.assert_allclose(accumulated, one_step, rtol=1e-3, atol=1e-7)
        assert np.abs(one_step).max() > 1e-4  # the gradients are not all zero


def test_whitening_keeps_unit_spread_with_a_large_common_offset():
    from jaxrec.train.step import _global_whiten

    rng = np.random.default_rng(0)
    x = jnp.asarray(300.0 + rng.normal(size=(64, 32)), jnp.float32)
    mask = jnp.asarray(rng.random((64, 32)) < 0.5)
    white = np.asarray(_global_whiten(x, mask, None))[np.asarray(mask)]
    assert abs(white.mean()) < 1e-3 and white.std(ddof=1) == pytest.approx(1.0, abs=1e-3)


def test_bad_batch_size_and_config_errors():
    with pytest.raises(ValueError, match="batch rows 7 must divide"):
        step(_state(), _batch(rows=7), jax.random.key(0), PPO)
    with pytest.raises(ValueError, match="ppo.lr_schedule='step' is not allowed"):
        PPOConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="ppo.grad_accum=3 must divide ppo.minibatches=4"):
        PPOConfig(minibatches=4, grad_accum=3)


def test_action_window_gives_the_same_update_when_actions_are_inside_it():
    batch = _batch()  # actions are the last 5 of 10 tokens
    windowed = PPO_COMPARED.replace(action_window=5)
    full, m_full = step(_state(PPO_COMPARED), batch, jax.random.key(0), PPO_COMPARED)
    win, m_win = step(_state(PPO_COMPARED), batch, jax.random.key(0), windowed)
    _assert_same_params(full.policy, win.policy)
    _assert_same_params(full.value, win.value)
    assert float(m_win["ppo/policy_loss"]) == pytest.approx(float(m_full["ppo/policy_loss"]),
                                                            abs=1e-6)


def test_non_finite_gradients_skip_the_update_and_are_counted():
    state = _state()
    batch = _batch()
    poisoned = batch.replace(advantages=batch.advantages.at[0, 6].set(jnp.nan))
    new, metrics = step(state, poisoned, jax.random.key(0), PPO.replace(whiten_advantages=False))
    assert float(metrics["ppo/skipped"]) > 0.0
    # Minibatches holding the NaN row were skipped; the params stay finite either way.
    for leaf in jax.tree.leaves(new.policy):
        assert np.isfinite(np.asarray(leaf)).all()
    assert int(new.step) < PPO.epochs * PPO.minibatches
    # the metrics average the applied minibatches only: finite, though some were not
    for name in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/entropy"):
        assert np.isfinite(float(metrics[name])), name
    all_bad = batch.replace(advantages=jnp.full_like(batch.advantages, jnp.nan))
    new, metrics = step(state, all_bad, jax.random.key(0), PPO)
    assert float(metrics["ppo/skipped"]) == 1.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(state.policy), jax.tree.leaves(new.policy), strict=True):
        np.testing.assert_array_equal(a, b)

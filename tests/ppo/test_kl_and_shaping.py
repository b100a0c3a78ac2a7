"""KL estimators, the controllers' sequences, reward shaping and masked statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ppo import (
    adaptive_kl_update,
    apply_penalties,
    fixed_kl_update,
    init_kl,
    kl_estimate,
    last_token_positions,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    place_scores,
    shape_rewards,
)


def test_kl_estimators_by_hand():
    logp = jnp.array([-1.0, -2.0])
    ref = jnp.array([-1.5, -1.0])
    # log r = ref - logp = (-0.5, 1.0)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), [0.5, -1.0], atol=1e-7)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k2"), [0.125, 0.5], atol=1e-7)
    k3 = [np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0]
    np.testing.assert_allclose(kl_estimate(logp, ref, "k3"), k3, atol=1e-6)
    with pytest.raises(ValueError, match="kl kind 'k4'.*k1"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    true_kl = float(np.sum(p * np.log(p / q)))
    x = rng.choice(3, size=200_000, p=p)
    logp, ref = jnp.log(p[x]), jnp.log(q[x])
    for kind in ("k1", "k3"):
        assert abs(float(kl_estimate(logp, ref, kind).mean()) - true_kl) < 0.01


def test_adaptive_controller_sequence():
    # target 6, horizon 10000, n_steps 256; beta_0 = 0.1.
    state = init_kl(0.1)
    # KL 12 -> error clipped to +0.2 -> beta = 0.1 * (1 + 0.2 * 0.0256) = 0.1005120
    state = adaptive_kl_update(state, 12.0, 256, target=6.0, horizon=10000.0)
    assert np.isclose(float(state.coef), 0.100512, rtol=1e-6)
    # KL 6 -> error 0 -> unchanged
    state = adaptive_kl_update(state, 6.0, 256, target=6.0, horizon=10000.0)
    assert np.isclose(float(state.coef), 0.100512, rtol=1e-6)
    # KL 5.4 -> error -0.1 -> beta *= 1 - 0.00256
    state = adaptive_kl_update(state, 5.4, 256, target=6.0, horizon=10000.0)
    assert np.isclose(float(state.coef), 0.100512 * (1 - 0.00256), rtol=1e-6)
    assert float(state.last_kl) == pytest.approx(5.4)
    fixed = fixed_kl_update(init_kl(0.05), 100.0)
    assert float(fixed.coef) == pytest.approx(0.05) and float(fixed.last_kl) == 100.0


def test_shape_rewards_puts_the_score_on_the_last_action_token():
    mask = jnp.array([[False, True, True, True, False], [True, True, False, False, False]])
    pos = last_token_positions(mask)
    np.testing.assert_array_equal(pos, [3, 1])
    token_scores = place_scores(jnp.array([[2.0], [-1.0]]), pos[:, None], 5)
    logp = jnp.full((2, 5), -1.0)
    ref = jnp.full((2, 5), -1.5)  # k1 = 0.5 per action token
    rewards, metrics = shape_rewards(token_scores, logp, ref, mask, 0.1)
    expected = np.array([[0, -0.05, -0.05, 2 - 0.05, 0], [-0.05, -1 - 0.05, 0, 0, 0]])
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    assert float(metrics["kl/ref"]) == pytest.approx((1.5 + 1.0) / 2)


def test_place_scores_for_several_turns_and_missing_turns():
    out = place_scores(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1, 4, -1]]), 6)
    np.testing.assert_allclose(out, [[0, 1, 0, 0, 2, 0]])


def test_penalties_and_normalisation():
    s = apply_penalties(jnp.array([1.0, 1.0, 1.0]), has_eos=jnp.array([True, False, True]),
                        valid=jnp.array([True, True, False]), missing_eos_penalty=-1.0,
                        invalid_penalty=-2.0)
    np.testing.assert_allclose(s, [1.0, 0.0, -1.0])
    n = normalize_scores(jnp.array([1.0, 2.0, 3.0, 4.0]), clip=1.0)
    assert float(jnp.max(jnp.abs(n))) <= 1.0 and abs(float(n.mean())) < 1e-6


def test_masked_statistics():
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    m = jnp.array([True, True, True, False])
    assert float(masked_mean(x, m)) == pytest.approx(2.0)
    assert float(masked_var(x, m)) == pytest.approx(1.0)  # unbiased
    w = masked_whiten(x, m)
    np.testing.assert_allclose(w, [-1.0, 0.0, 1.0, 0.0], atol=1e-6)
    kept = masked_whiten(x, m, shift_mean=False)
    np.testing.assert_allclose(kept, [1.0, 2.0, 3.0, 0.0], atol=1e-6)
    assert float(masked_mean(x, jnp.zeros(4, bool))) == 0.0  # empty: 0, not NaN

"""GAE: a plain Python loop on random masks, a hand-worked example, awkward masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ppo import gae


def _gae_loop(rewards, values, mask, gamma, lam):
    """Reference: walk each row backwards over its action tokens only."""
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        steps = [j for j in range(t) if mask[i, j]]
        next_value, next_adv = 0.0, 0.0
        for j in reversed(steps):
            delta = rewards[i, j] + gamma * next_value - values[i, j]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, j]
            adv[i, j] = next_adv
    returns = np.where(mask, adv + values, 0.0)
    return adv, returns


def test_matches_python_loop_on_random_masks():
    rng = np.random.default_rng(0)
    b, t = 16, 23
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    mask = rng.random((b, t)) < 0.6  # holes everywhere
    mask[0] = False  # an all-masked row
    mask[1] = True  # a fully unmasked row
    mask[2, :5] = False  # a prompt, then actions
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.97, 0.9)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    assert np.all(np.asarray(adv)[0] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_hand_worked_three_steps():
    # gamma = 0.5, lam = 0.5; rewards (0, 0, 1); values (0.2, 0.4, 0.8); V after the end = 0.
    # delta_3 = 1 + 0.5*0 - 0.8 = 0.2                A_3 = 0.2
    # delta_2 = 0 + 0.5*0.8 - 0.4 = 0.0              A_2 = 0.0 + 0.25*0.2 = 0.05
    # delta_1 = 0 + 0.5*0.4 - 0.2 = 0.0              A_1 = 0.0 + 0.25*0.05 = 0.0125
    # returns = A + V = (0.2125, 0.45, 1.0)
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.2, 0.4, 0.8]])
    adv, ret = gae(rewards, values, jnp.ones((1, 3), bool), 0.5, 0.5)
    np.testing.assert_allclose(adv, [[0.0125, 0.05, 0.2]], atol=1e-7)
    np.testing.assert_allclose(ret, [[0.2125, 0.45, 1.0]], atol=1e-7)


def test_masked_steps_pass_the_carry_through():
    """Inserting observation tokens between actions changes nothing for the actions."""
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.2, 0.4, 0.8]])
    dense_adv, _ = gae(rewards, values, jnp.ones((1, 3), bool), 0.9, 0.8)
    r = jnp.array([[0.0, 5.0, 0.0, 7.0, 7.0, 1.0]])  # junk on masked tokens
    v = jnp.array([[0.2, 9.0, 0.4, 9.0, 9.0, 0.8]])
    m = jnp.array([[True, False, True, False, False, True]])
    adv, _ = gae(r, v, m, 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv)[np.asarray(m)], np.asarray(dense_adv)[0], atol=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.0)])
def test_limits(gamma, lam):
    rng = np.random.default_rng(1)
    r = rng.normal(size=(3, 7)).astype(np.float32)
    v = rng.normal(size=(3, 7)).astype(np.float32)
    m = np.ones((3, 7), bool)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
    if lam == 1.0:  # Monte Carlo: returns are reward-to-go
        np.testing.assert_allclose(ret, np.cumsum(r[:, ::-1], axis=1)[:, ::-1], atol=1e-5)
    else:  # one-step TD
        next_v = np.concatenate([v[:, 1:], np.zeros((3, 1))], axis=1)
        np.testing.assert_allclose(adv, r + next_v - v, atol=1e-5)


def test_jit_and_vmap():
    r = jnp.ones((4, 2, 5))
    v = jnp.zeros((4, 2, 5))
    m = jnp.ones((4, 2, 5), bool)
    adv, _ = jax.jit(jax.vmap(lambda a, b, c: gae(a, b, c, 0.9, 0.95)))(r, v, m)
    assert adv.shape == (4, 2, 5)

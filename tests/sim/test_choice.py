"""Choice models against hand-computed probabilities, and the inverse-CDF draw."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sim import choice_from_uniform, logit_probs, proportional_probs, sample_choice


def test_logit_probs_without_position_bias():
    # exp(1), exp(0), exp(0) for the no-click logit 0: Z = e + 2.
    probs = logit_probs(jnp.array([1.0, 0.0]), 0.0)
    e = math.e
    np.testing.assert_allclose(probs, [e / (e + 2), 1 / (e + 2), 1 / (e + 2)], rtol=1e-6)


def test_logit_probs_with_position_bias():
    # Slot 1 loses one unit: exp(1), exp(0 - 1), exp(0.5): Z = e + 1/e + exp(0.5).
    probs = logit_probs(jnp.array([1.0, 0.0]), 0.5, position_bias=jnp.array([0.0, -1.0]))
    e, z = math.e, math.e + 1 / math.e + math.exp(0.5)
    np.testing.assert_allclose(probs, [e / z, (1 / e) / z, math.exp(0.5) / z], rtol=1e-6)


def test_logit_probs_never_skip_with_minus_infinite_no_click():
    probs = logit_probs(jnp.array([0.0, 0.0]), -jnp.inf)
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0])


def test_proportional_probs_with_min_normalizer_and_no_click_mass():
    # RecSim's defaults: scores u.f = 0.5 and -0.5, no-click mass 1, min_normalizer -1:
    # masses 1.5, 0.5, 2 -> / 4.
    probs = proportional_probs(jnp.array([0.5, -0.5]), 1.0, -1.0)
    np.testing.assert_allclose(probs, [0.375, 0.125, 0.5], rtol=1e-6)


def test_proportional_probs_with_position_bias_scales_masses():
    # masses 1.5, 0.5 * 0.5, 2 -> / 3.75.
    probs = proportional_probs(jnp.array([0.5, -0.5]), 1.0, -1.0,
                               position_bias=jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(probs, [1.5 / 3.75, 0.25 / 3.75, 2 / 3.75], rtol=1e-6)


def test_proportional_probs_lowest_score_gets_zero_mass():
    probs = proportional_probs(jnp.array([-1.0, 1.0]), 1.0, -1.0)
    np.testing.assert_allclose(probs, [0.0, 0.5, 0.5])


@pytest.mark.parametrize("u, expected", [(0.0, 0), (0.1, 0), (0.25, 1), (0.45, 1), (0.6, 2),
                                         (0.9999, 2)])
def test_choice_from_uniform_inverse_cdf(u, expected):
    # cdf 0.25, 0.5, 1.0: [0, 0.25) -> 0, [0.25, 0.5) -> 1, [0.5, 1) -> 2 (no click).
    probs = jnp.array([0.25, 0.25, 0.5])
    assert int(choice_from_uniform(jnp.float32(u), probs)) == expected


@pytest.mark.parametrize("u", [0.0, 0.3, 0.5, 0.9999])
def test_choice_from_uniform_skips_zero_probability(u):
    # cdf 0, 0.5, 0.5, 1: options 0 and 2 can never be drawn, even at u = 0.
    probs = jnp.array([0.0, 0.5, 0.0, 0.5])
    assert int(choice_from_uniform(jnp.float32(u), probs)) in (1, 3)


def test_sample_choice_frequencies():
    probs = jnp.array([0.375, 0.125, 0.5])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(sample_choice, in_axes=(0, None))(keys, probs))
    freq = np.bincount(draws, minlength=3) / n
    se = np.sqrt(np.asarray(probs) * (1 - np.asarray(probs)) / n)
    assert np.all(np.abs(freq - np.asarray(probs)) < 4 * se), freq

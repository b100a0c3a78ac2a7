"""Samplers: the distributions they draw from and the log-probs they report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.generation import Greedy, Temperature, TopK, TopKTopP, TopP, make_sampler
from jaxrec.generation.sampling import draw, top_k_filter, top_p_filter

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]], jnp.float32))


def test_inverse_cdf_draw_matches_the_probabilities():
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    logprobs = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(20000, axis=0)
    tokens = np.asarray(draw(jax.random.key(0), logprobs))
    freq = np.bincount(tokens, minlength=5) / tokens.size
    # 4 standard errors at n=20000 is < 0.015 for these probabilities.
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert freq[4] == 0.0  # a zero-probability token is never drawn


def test_top_k_keeps_the_k_best():
    kept = np.asarray(top_k_filter(LOGITS, 2)) > -1e29
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Row 0: 0.5 + 0.25 = 0.75 >= 0.7 -> two tokens; row 1: 0.4 + 0.3 = 0.7 -> two tokens.
    kept = np.asarray(top_p_filter(LOGITS, 0.7)) > -1e29
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    kept = np.asarray(top_p_filter(LOGITS, 0.05)) > -1e29  # always at least the best token
    np.testing.assert_array_equal(kept.sum(-1), [1, 1])


def test_reported_logp_is_under_the_processed_distribution():
    key = jax.random.key(1)
    tokens, logp = TopK(1.0, k=2).sample(key, LOGITS)
    # Renormalised over the two kept tokens: row 0 {0.5, 0.25} -> 2/3, 1/3.
    expected = {0: np.log(2 / 3), 1: np.log(1 / 3), 2: np.log(3 / 7), 3: np.log(4 / 7)}
    for row in range(2):
        assert np.isclose(float(logp[row]), expected[int(tokens[row])], atol=1e-5)
    t = Temperature(0.5)
    tokens, logp = t.sample(key, LOGITS)
    ref = jax.nn.log_softmax(LOGITS / 0.5, axis=-1)
    np.testing.assert_allclose(logp, ref[jnp.arange(2), tokens], atol=1e-6)


def test_allowed_mask_is_respected_by_every_sampler():
    allowed = jnp.array([[False, False, True, True], [True, False, False, False]])
    for sampler in [Greedy(), Temperature(1.0), TopK(1.0, k=3), TopP(1.0, p=0.9),
                    TopKTopP(1.0, k=2, p=0.5)]:
        for seed in range(5):
            tokens, logp = sampler.sample(jax.random.key(seed), LOGITS, allowed)
            assert bool(allowed[0, tokens[0]]) and int(tokens[1]) == 0, sampler
            assert np.isfinite(np.asarray(logp)).all()


def test_greedy_is_argmax_with_untempered_logps():
    tokens, logp = Greedy().sample(None, LOGITS)
    np.testing.assert_array_equal(tokens, [0, 3])
    np.testing.assert_allclose(logp, np.log([0.5, 0.4]), atol=1e-6)


def test_make_sampler_and_bad_settings():
    assert make_sampler(greedy=True) == Greedy()
    assert make_sampler(temperature=0.7, top_k=5) == TopK(0.7, k=5)
    assert make_sampler(top_p=0.9) == TopP(1.0, p=0.9)
    assert isinstance(make_sampler(top_k=5, top_p=0.9), TopKTopP)
    with pytest.raises(ValueError, match="temperature=0"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        TopP(1.0, p=1.5)


def test_two_level_draw_equals_a_flat_inverse_cdf():
    key = jax.random.key(3)
    logprobs = jax.nn.log_softmax(2 * jax.random.normal(key, (256, 1000)), axis=-1)  # V % 64 != 0
    tokens = np.asarray(draw(key, logprobs))
    u = np.asarray(jax.random.uniform(key, (256, 1), jnp.float32, minval=1e-12), np.float64)
    cdf = np.cumsum(np.exp(np.asarray(logprobs, np.float64)), axis=-1)
    expected = np.minimum((cdf < u * cdf[:, -1:]).sum(-1), 999)
    np.testing.assert_array_equal(tokens, expected)

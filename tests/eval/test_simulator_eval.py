"""Simulator evaluation of an LM policy: one jitted while-loop, metrics accumulated on device."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.codec import build_codec
from jaxrec.data import train_bpe_tokenizer
from jaxrec.eval import metrics
from jaxrec.eval.simulator import (
    evaluate_policy,
    lm_policy_run,
    lm_slate_policy,
    simulate_greedy_and_sampled,
    simulate_policy,
    summarize,
)
from jaxrec.models import init_params, llama_config
from jaxrec.sim import make_env
from jaxrec.sim.evaluate import run_episodes

USERS = 16
K = 2
N = 40


@pytest.fixture(scope="module")
def world():
    env, params = make_env("synthetic", n_items=N, n_topics=4, slate_size=K, history_len=4,
                           history_min=2, seed=0)
    tokenizer = train_bpe_tokenizer(env.titles, vocab_size=300)
    codec = build_codec(env.titles, tokenizer)
    shape = dict(slate_size=K, prompt_len=codec.prompt_len(4), max_new_tokens=codec.slate_len(K))
    cfg = llama_config(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_kv_heads=2,
                       d_ff=64, n_layers=2, max_len=shape["prompt_len"] + shape["max_new_tokens"],
                       eos_id=codec.eos_id, pad_id=codec.pad_id)
    weights = init_params(cfg, jax.random.key(0))
    return env, params, codec, cfg, weights, shape


def _check_row(row, decoding):
    assert row["decoding"] == decoding and row["episodes"] == USERS
    json.dumps(row, allow_nan=False)  # JSON-ready: plain numbers, no NaN
    assert row["unfinished"] == 0 and row["invalid_item_frac"] == 0.0
    assert 0.0 < row["coverage"] <= 1.0
    assert 0.0 <= row["diversity"] <= 2.0
    assert 0.0 <= row["click_rate"] <= 1.0
    assert 0.0 <= row["clicks_mean"] <= row["length_mean"]
    assert row["length_mean"] >= 1.0 and row["novelty"] > 0.0
    assert math.isfinite(row["return_mean"]) and row["return_mean_se"] >= 0.0
    # Every counted step recommended K items for each user still in the first episode.
    assert row["recommended"] == K * round(row["length_mean"] * USERS)


def test_greedy_and_sampled_rows_and_greedy_is_deterministic(world):
    env, params, codec, cfg, weights, shape = world
    key = jax.random.key(1)
    greedy, sampled = simulate_greedy_and_sampled(cfg, weights, codec, env, params, key,
                                                  episodes=USERS, **shape)
    _check_row(greedy, "greedy")
    _check_row(sampled, "sampled")
    assert greedy["temperature"] == 0.0 and sampled["temperature"] == 1.0
    # Same key, same dict (compiled once: the second call hits the cache).
    again = simulate_policy(cfg, weights, codec, env, params, key, episodes=USERS,
                            temperature=0.0, **shape)
    assert again == greedy
    other = simulate_policy(cfg, weights, codec, env, params, jax.random.key(2), episodes=USERS,
                            temperature=0.0, **shape)
    _check_row(other, "greedy")


def test_greedy_policy_ignores_the_key_and_names_valid_unseen_distinct_items(world):
    env, params, codec, cfg, weights, shape = world
    obs, _ = env.reset_batch(jax.random.key(5), USERS, params)  # histories [B, H]

    def slates(temperature, keys):  # one compilation per temperature
        policy = jax.jit(lm_slate_policy(cfg, weights, codec, temperature=temperature, **shape))
        return [np.asarray(policy(key, obs)) for key in keys]

    hist = np.asarray(obs)
    keys = [jax.random.key(i) for i in range(3)]
    greedy = slates(0.0, keys)
    sampled = slates(1.0, keys)
    for a in greedy[1:]:
        np.testing.assert_array_equal(a, greedy[0])  # greedy: the key is unused
    assert any((a != sampled[0]).any() for a in sampled[1:])  # sampling: it is not
    for items in greedy + sampled:
        assert items.shape == (USERS, K) and items.dtype == np.int32
        assert ((items >= 0) & (items < N)).all()
        for row in range(USERS):
            assert len(set(items[row])) == K  # distinct
            assert not set(items[row]) & set(hist[row][hist[row] >= 0])  # history banned


def test_in_loop_metrics_equal_the_host_metrics_of_the_same_slates(world):
    env, params, codec, cfg, weights, shape = world
    key = jax.random.key(3)
    record = 24  # the synthetic users' sessions last at most 20 slates
    run = lm_policy_run(cfg, weights, codec, env, params, key, episodes=USERS, temperature=1.0,
                        record_steps=record, **shape)
    row = summarize(run)
    steps = int(run.steps)
    assert 0 < steps <= record and row["unfinished"] == 0
    slates = np.asarray(run.slates)  # [T, B, K], -1 where not counted
    assert slates.shape == (record, USERS, K)
    assert (slates[steps:] == -1).all()

    # The recorded slates are exactly the counted steps: user u's first `length[u]` steps.
    lengths = np.asarray(run.episodes.lengths)
    counted = (slates >= 0).all(axis=2)  # [T, B]
    assert ((slates >= 0).any(axis=2) == counted).all()  # no partly valid slate
    np.testing.assert_array_equal(counted, np.arange(record)[:, None] < lengths[None, :])
    for t, b in zip(*np.nonzero(counted), strict=True):
        assert len(set(slates[t, b])) == K and (slates[t, b] < N).all()

    # Counts and the device-side metrics against jaxrec.eval.metrics on the same slates.
    np.testing.assert_array_equal(
        np.asarray(run.counts), np.bincount(slates[slates >= 0], minlength=N))
    features = np.asarray(params.catalogue.features)
    assert row["coverage"] == pytest.approx(metrics.coverage(slates, N), abs=1e-12)
    assert row["diversity"] == pytest.approx(
        metrics.intra_list_diversity(slates.reshape(-1, K), features), rel=1e-5)
    # popularity=None: the item frequencies in the users' initial histories.
    k_reset, _ = jax.random.split(key)
    initial, _ = env.reset_batch(k_reset, USERS, params)
    initial = np.asarray(initial)
    popularity = np.bincount(initial[initial >= 0], minlength=N)
    np.testing.assert_array_equal(np.asarray(run.popularity), popularity)
    assert row["novelty"] == pytest.approx(metrics.novelty(slates, popularity), rel=1e-5)


def _constant(items):
    slate = jnp.asarray(items, jnp.int32)

    def policy(key, obs):
        return jnp.broadcast_to(slate, (obs.shape[0], slate.shape[0]))

    return policy


def test_a_constant_slate_policy_by_hand(world):
    env, params, *_ = world
    a, b = 3, 17
    popularity = np.arange(N, dtype=np.float32) % 5  # zeros get the 0.5 floor
    policy = _constant([a, b])
    key = jax.random.key(4)
    run = evaluate_policy(env, params, key, policy, episodes=USERS,
                          popularity=jnp.asarray(popularity))
    row = summarize(run)
    f = np.asarray(params.catalogue.features, np.float64)
    cos = f[a] @ f[b] / (np.linalg.norm(f[a]) * np.linalg.norm(f[b]))
    assert row["coverage"] == pytest.approx(K / N)
    assert row["diversity"] == pytest.approx(1.0 - cos, rel=1e-5)
    pop = np.maximum(popularity.astype(np.float64), 0.5)
    by_hand = -(np.log2(pop[a] / pop.sum()) + np.log2(pop[b] / pop.sum())) / 2
    assert row["novelty"] == pytest.approx(by_hand, rel=1e-5)
    assert row["invalid_item_frac"] == 0.0
    # The returns, clicks and lengths are run_episodes' own under the same key.
    ep = run_episodes(env, params, key, USERS, policy)
    for name in ("returns", "clicks", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(run.episodes, name)),
                                      np.asarray(getattr(ep, name)), err_msg=name)


def test_slates_without_two_items_have_no_diversity(world):
    env, params, *_ = world
    run = evaluate_policy(env, params, jax.random.key(6), _constant([5, -1]), episodes=USERS)
    row = summarize(run)
    json.dumps(row, allow_nan=False)
    assert row["diversity"] is None  # no counted slate had two items
    assert row["coverage"] == pytest.approx(1 / N)
    assert row["invalid_item_frac"] == pytest.approx(0.5)
    assert row["recommended"] == int(np.asarray(run.episodes.lengths).sum())

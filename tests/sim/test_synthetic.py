"""The synthetic world: titles, determinism, vmap vs loop, auto-reset, drift, patience."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sim import make_env
from jaxrec.sim.synthetic import SyntheticEnv, make_world, synthetic_titles, topic_word

B = 6


@pytest.fixture(scope="module")
def world():
    return make_env("synthetic", n_items=200, n_topics=8, slate_size=3, history_len=8)


@functools.cache
def jitted(env):
    """(reset, step, step_batch) compiled once per env: eager ops would each compile."""
    return jax.jit(env.reset), jax.jit(env.step), jax.jit(env.step_batch)


def tree_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_titles_unique_deterministic_and_topical():
    env, _ = make_env("synthetic", seed=3)
    cat, _, titles = make_world(n_items=500, n_topics=10, seed=3)
    assert len(env.titles) == 500 and len(set(env.titles)) == 500
    assert list(env.titles) == titles
    again, _ = make_env("synthetic", seed=3)
    assert again.titles == env.titles
    other, _ = make_env("synthetic", seed=4)
    assert other.titles != env.titles
    topic = np.asarray(cat.topic)
    assert all(topic_word(int(t)) in title.split() for t, title in zip(topic, titles, strict=True))
    # More items per topic than (adjective, noun) pairs still gives unique titles.
    many = synthetic_titles(np.zeros(1300, np.int32), seed=0)
    assert len(set(many)) == 1300


def test_world_deterministic_per_seed():
    a, pop_a, _ = make_world(seed=1)
    b, pop_b, _ = make_world(seed=1)
    c, _, _ = make_world(seed=2)
    assert tree_equal(a, b) and np.array_equal(pop_a, pop_b)
    assert not np.array_equal(np.asarray(a.quality), np.asarray(c.quality))


def test_reset_history_follows_interests(world):
    env, params = world
    obs, state = env.reset_batch(jax.random.key(0), 512, params)
    hist = np.asarray(state.history)
    assert np.array_equal(np.asarray(obs), hist)
    lengths = (hist >= 0).sum(1)
    assert lengths.min() >= env.history_min and lengths.max() <= env.history_len
    for row in hist:  # padding in front, distinct items after it
        valid = row[row >= 0]
        assert np.all(row[: len(row) - len(valid)] == -1) and len(set(valid)) == len(valid)
    # History items match the user's interests far better than the catalogue on average.
    feats = np.asarray(params.catalogue.features)
    aff = np.einsum("bt,nt->bn", np.asarray(state.interest), feats)  # [B, N]
    in_hist = np.take_along_axis(aff, np.maximum(hist, 0), 1)[hist >= 0].mean()
    assert in_hist > aff.mean() + 0.3


def test_small_catalogue_histories_are_distinct():
    # A pool no smaller than the catalogue samples the whole catalogue exactly.
    env, params = make_env("synthetic", n_items=12, n_topics=3, history_len=10, history_min=10)
    _, state = jax.jit(env.reset_batch, static_argnums=1)(jax.random.key(0), 64, params)
    for row in np.asarray(state.history):
        assert len(set(row.tolist())) == 10 and row.min() >= 0 and row.max() < 12


def test_determinism_per_key(world):
    env, params = world
    reset, step, _ = jitted(env)
    key = jax.random.key(7)
    _, s1 = reset(key, params)
    _, s2 = reset(key, params)
    assert tree_equal(s1, s2)
    slate = jnp.asarray([1, 2, 3], jnp.int32)
    out1 = step(jax.random.key(8), s1, slate, params)
    out2 = step(jax.random.key(8), s2, slate, params)
    assert tree_equal(out1, out2)
    _, s3 = reset(jax.random.key(9), params)
    assert not tree_equal(s1, s3)


def test_vmapped_step_equals_a_loop(world):
    env, params = world
    _, step, step_batch = jitted(env)
    _, states = env.reset_batch(jax.random.key(0), B, params)
    actions = jax.random.randint(jax.random.key(1), (B, 3), 0, 200)
    key = jax.random.key(2)
    for _ in range(4):  # several steps, so clicks, drift and resets all happen
        key, sub = jax.random.split(key)
        batched = step_batch(sub, states, actions, params)
        keys = jax.random.split(sub, B)
        for b in range(B):
            one = step(keys[b], jax.tree.map(lambda x, b=b: x[b], states), actions[b], params)
            row = jax.tree.map(lambda x, b=b: x[b], batched)
            for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(row), strict=True):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
        states = batched[1]


def test_auto_reset_replaces_a_finished_user(world):
    env, params = world
    reset, step, _ = jitted(env)
    _, state = reset(jax.random.key(0), params)
    state = state.replace(patience=jnp.asarray(0.5, jnp.float32))
    nothing = jnp.full((3,), -1, jnp.int32)  # an all-invalid slate: no click, patience - 1
    key = jax.random.key(5)
    obs, nxt, reward, done, info = step(key, state, nothing, params)
    assert bool(done) and not bool(info["response"].clicked)
    obs_reset, fresh = reset(jax.random.split(key)[1], params)
    assert tree_equal(nxt, fresh) and tree_equal(obs, obs_reset)
    # Without auto-reset the finished state comes back as is.
    _, plain_step, _ = jitted(dataclasses.replace(env, auto_reset=False))
    _, kept, _, done, _ = plain_step(key, state, nothing, params)
    assert bool(done) and float(kept.patience) == pytest.approx(-0.5)
    assert int(kept.step) == 1 and tree_equal(kept.interest, state.interest)


def test_patience_ends_sessions_after_bad_recommendations(world):
    env, params = world
    reset, step, _ = jitted(dataclasses.replace(env, auto_reset=False))
    params = params.replace(budget_min=jnp.asarray(1e6), budget_max=jnp.asarray(2e6),
                            max_steps=jnp.asarray(100))
    _, state = reset(jax.random.key(0), params)
    nothing = jnp.full((3,), -1, jnp.int32)
    for t in range(3):  # patience 3, each slate without a click costs 1
        assert float(state.patience) == pytest.approx(3.0 - t)
        _, state, reward, done, _ = step(jax.random.key(t), state, nothing, params)
        assert bool(done) == (t == 2)
        # Three invalid entries, penalised 1.0 each by default.
        assert float(reward) == pytest.approx(-3.0)
    # A disliked click costs (3 - rating) / 2: force a click on the user's worst item.
    sure = params.replace(no_click_logit=jnp.asarray(-1e9), rating_noise=jnp.asarray(0.0))
    _, state = reset(jax.random.key(1), sure)
    cat = sure.catalogue
    score = cat.features @ state.interest + cat.quality
    worst = int(jnp.argmin(score))
    _, nxt, _, _, info = step(jax.random.key(2), state, jnp.asarray([worst, -1, -1]), sure)
    rating = float(info["response"].rating)
    assert rating == float(np.clip(np.round(3 + 2 * float(score[worst])), 1, 5)) and rating < 3
    assert float(nxt.patience) == pytest.approx(3.0 - (3.0 - rating) / 2)


def test_interest_drifts_toward_the_consumed_item(world):
    env, params = world
    reset, step, _ = jitted(env)
    sure = params.replace(no_click_logit=jnp.asarray(-1e9))  # always click
    _, state = reset(jax.random.key(3), sure)
    item = int(jnp.argmin(sure.catalogue.features @ state.interest))  # least liked item
    f = sure.catalogue.features[item]
    _, nxt, _, _, info = step(jax.random.key(4), state, jnp.asarray([item, -1, -1]), sure)
    assert int(info["response"].item) == item
    assert float(nxt.interest @ f) > float(state.interest @ f)
    moved = nxt.interest - state.interest
    assert bool(jnp.all(moved >= 0)) and int(jnp.argmax(moved)) == int(jnp.argmax(f))
    assert float(jnp.max(jnp.abs(nxt.interest))) <= 1.0
    assert int(nxt.history[-1]) == item and bool(jnp.all(nxt.history[:-1] == state.history[1:]))


def test_budget_is_spent_by_watching(world):
    env, params = world
    reset, step, _ = jitted(env)
    sure = params.replace(no_click_logit=jnp.asarray(-1e9))
    _, state = reset(jax.random.key(3), sure)
    _, nxt, _, _, info = step(jax.random.key(4), state, jnp.asarray([0, 1, 2]), sure)
    watch = float(info["response"].watch_time)
    item = int(info["response"].item)
    rating = float(info["response"].rating)
    assert watch == pytest.approx(float(sure.catalogue.length[item]) * rating / 5, rel=1e-5)
    assert float(nxt.budget) == pytest.approx(float(state.budget) - 0.5 - watch, rel=1e-5)


def test_greedy_beats_random_in_a_scanned_rollout():
    env, params = make_env("synthetic", n_items=200, reward="content")
    cat = params.catalogue

    @jax.jit
    def run(key, greedy):
        _, states = env.reset_batch(key, 256, params)

        def body(states, k):
            k_act, k_step = jax.random.split(k)
            score = states.interest @ cat.features.T * params.interest_weight + cat.quality
            slates = jnp.where(greedy, jax.lax.top_k(score, 3)[1],
                               jax.random.randint(k_act, (256, 3), 0, 200))
            _, states, r, d, _ = env.step_batch(k_step, states, slates, params)
            return states, (r, d)

        return jax.lax.scan(body, states, jax.random.split(key, 20))[1]

    r_greedy, d_greedy = run(jax.random.key(0), True)
    r_random, d_random = run(jax.random.key(0), False)
    assert np.isfinite(np.asarray(r_random)).all() and 0 < float(d_random.mean()) < 1
    assert float(r_greedy.mean()) > 1.3 * float(r_random.mean())


@pytest.mark.parametrize("preset", ["products", "ads"])
def test_other_reward_presets_run(preset):
    env, params = make_env("synthetic", n_items=100, reward=preset)
    assert isinstance(env, SyntheticEnv) and env.reward == preset
    _, states = env.reset_batch(jax.random.key(0), 256, params)
    slates = jax.random.randint(jax.random.key(1), (256, 3), 0, 100)
    _, _, r, _, info = jax.jit(env.step_batch)(jax.random.key(2), states, slates, params)
    assert np.isfinite(np.asarray(r)).all()
    key = "revenue" if preset == "products" else "paid_bid"
    assert float(info["terms"][key].max()) > 0  # some click paid


def test_overrides_are_checked():
    env, params = make_env("synthetic", position_bias=[0.0, -1.0], slate_size=2,
                           reward_weights={"like": 2.0})
    assert params.position_bias.tolist() == [0.0, -1.0] and params.weights.like == 2.0
    with pytest.raises(ValueError, match="unknown settings"):
        make_env("synthetic", n_item=5)
    with pytest.raises(ValueError, match="reward preset"):
        make_env("synthetic", reward="revenue")

"""The `recsim-ie` preset: RecSim's own figures, hand-worked steps, and the batched step."""

import json
import math
import pathlib

import jax
import jax.extend.random as jrandom
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.sim import Environment, choice_from_uniform, make_env, presets, proportional_probs
from jaxrec.sim.core import batch_bits, below, normal_from_bits, threefry2x32, unit_uniform
from jaxrec.sim.evaluate import episode_stats, make_policy, random_slates, run_episodes
from jaxrec.sim.recsim_ie import RecsimIEState, StepDraws, topic_update

REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "reference" / "recsim_ie_stats.json"


@pytest.fixture(scope="module")
def env_params():
    return make_env("recsim-ie")


def _state(interests, budget=200.0, clusters=None):
    """A batch of one user (leading axis 1) for `transition`."""
    clusters = list(range(10)) if clusters is None else clusters
    return RecsimIEState(
        interests=jnp.asarray([interests], jnp.float32),
        budget=jnp.asarray([budget], jnp.float32),
        doc_cluster=jnp.asarray([clusters], jnp.int32),
    )


def _draws(u_choice, u_flip=0.5, z=0.0):
    return StepDraws(
        u_choice=jnp.asarray([u_choice], jnp.float32),
        u_flip=jnp.asarray([u_flip], jnp.float32),
        z_quality=jnp.asarray([z], jnp.float32),
        doc_cluster=jnp.zeros((1, 10), jnp.int32),
    )


# --- RecSim's own figures ---------------------------------------------------------------------


def test_matches_recsim_reference_within_1_5_percent(env_params):
    """10,000 first episodes under random slates against RecSim 0.2.4's own run (same policy)."""
    env, params = env_params
    ref = json.loads(REFERENCE.read_text())["stats"]
    ours = episode_stats(run_episodes(env, params, jax.random.key(0), 10_000,
                                      make_policy("random", env)))
    assert ours["unfinished"] == 0
    for name in ("return_mean", "clicks_mean", "length_mean", "click_rate"):
        assert abs(ours[name] / ref[name] - 1) < 0.015, (name, ours[name], ref[name])
    # The spread has ~1% sampling error on each side, so it gets a looser check (RecSim's own
    # return std over seeds 0-4 ranged 11.22-11.40; ours is 11.46 at seed 0).
    assert abs(ours["return_std"] / ref["return_std"] - 1) < 0.05


def test_batched_step_matches_vmapped_step_statistics(env_params):
    """step_batch (one draw per step) and the vmapped per-user step give the same statistics."""
    env, params = env_params
    policy = make_policy("random", env)
    fast = episode_stats(run_episodes(env, params, jax.random.key(1), 4000, policy))
    slow = episode_stats(run_episodes(env, params, jax.random.key(2), 4000, policy,
                                      batched=False))
    for name in ("return_mean", "clicks_mean", "length_mean", "click_rate"):
        se = math.hypot(fast[name + "_se"], slow[name + "_se"])
        assert abs(fast[name] - slow[name]) < 4 * se, (name, fast[name], slow[name], se)


# --- hand-worked pieces -----------------------------------------------------------------------


@pytest.mark.parametrize("u_c, flip, expected", [
    (0.5, 0.2, 0.575),  # a = -0.3 * 0.5 + 0.3 = 0.15; p+ = 0.75 > 0.2: 0.5 + 0.15 * 0.5
    (0.5, 0.9, 0.425),  # 0.9 >= 0.75: away, 0.5 - 0.15 * 0.5
    (-0.5, 0.2, -0.275),  # a = 0.15, p+ = 0.25 > 0.2: -0.5 + 0.15 * 1.5
    (-1.0, 0.0, -1.0),  # a = 0 at |u| = 1: extreme interests stay put
    (0.0, 0.49, 0.3),  # a = 0.3, p+ = 0.5: 0 + 0.3 * 1
])
def test_topic_update_hand_worked(env_params, u_c, flip, expected):
    _, params = env_params
    out = topic_update(jnp.float32(u_c), jnp.float32(flip), params)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_topic_update_is_recsims_vector_rule(env_params):
    """RecSim's update_state on one-hot features, in numpy, moves only the clicked topic."""
    _, params = env_params
    rng = np.random.default_rng(0)
    for _ in range(50):
        u = rng.uniform(-1, 1, 20)
        c, flip = rng.integers(20), rng.uniform()
        f = np.eye(20)[c]
        alpha = (-0.3 / 1.0) * np.abs(u) + 0.3  # compute_alpha
        update = alpha * f * (f - u)
        positive = flip < np.dot((u + 1.0) / 2, f)
        want = np.clip(u + update if positive else u - update, -1.0, 1.0)
        got = u.copy()
        got[c] = topic_update(jnp.float32(u[c]), jnp.float32(flip), params)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_transition_click_hand_worked(env_params):
    # Slate [3, 7] shows clusters 3 and 7 with u_3 = 0.5, u_7 = -0.5: masses 1.5, 0.5 and 2 for
    # no click (cdf 1.5, 2, 4). u = 0.3: 0.3 * 4 = 1.2 < 1.5 -> slot 0, cluster 3.
    env, params = env_params
    u = np.zeros(20)
    u[3], u[7] = 0.5, -0.5
    state, reward, done, info = env.transition(
        _state(u), jnp.array([[3, 7]]), _draws(0.3, u_flip=0.2, z=1.0), params)
    assert bool(info["response"].clicked[0]) and int(info["response"].position[0]) == 0
    assert int(info["response"].item[0]) == 3 and int(info["cluster"][0]) == 3
    # quality = linspace(-3, 0, 14)[3] + 0.1 * 1 = -3 + 9/13 + 0.1
    quality = -3 + 9 / 13 + 0.1
    np.testing.assert_allclose(info["quality"][0], quality, rtol=1e-6)
    # budget = 200 - 4 + (0.9 / 3.4) * 4 * quality (user_quality_factor = 0)
    np.testing.assert_allclose(state.budget[0], 196 + 0.9 / 3.4 * 4 * quality, rtol=1e-6)
    np.testing.assert_allclose(reward[0], 4.0)
    assert not bool(done[0])
    want = u.copy()
    want[3] = 0.575  # topic_update(0.5, flip 0.2)
    np.testing.assert_allclose(state.interests[0], want, rtol=1e-6)


def test_transition_second_slot_and_no_click(env_params):
    env, params = env_params
    u = np.zeros(20)
    u[3], u[7] = 0.5, -0.5
    # u = 0.45: 1.8 in [1.5, 2) -> slot 1 (cluster 7); flip 0.2 < p+ = 0.25 -> toward.
    state, reward, _, info = env.transition(
        _state(u), jnp.array([[3, 7]]), _draws(0.45, u_flip=0.2), params)
    assert int(info["response"].position[0]) == 1 and int(info["cluster"][0]) == 7
    np.testing.assert_allclose(state.interests[0, 7], -0.275, rtol=1e-6)
    # u = 0.6: 2.4 >= 2 -> no click: the step penalty, nothing else moves.
    state, reward, done, info = env.transition(
        _state(u), jnp.array([[3, 7]]), _draws(0.6), params)
    assert not bool(info["response"].clicked[0]) and int(info["response"].position[0]) == 2
    assert int(info["response"].item[0]) == -1 and int(info["cluster"][0]) == -1
    np.testing.assert_allclose(state.budget[0], 199.5)
    np.testing.assert_allclose(reward[0], 0.0)
    np.testing.assert_allclose(state.interests[0], u)


def test_watch_time_is_cut_by_the_budget_and_ends_the_session(env_params):
    env, params = env_params
    u = np.full(20, -0.2)
    u[0] = 0.0  # cluster 0: mean quality -3, so the budget cannot recover
    state, reward, done, _ = env.transition(
        _state(u, budget=1.5, clusters=[0] * 10), jnp.array([[0, 1]]), _draws(0.0), params)
    np.testing.assert_allclose(reward[0], 1.5)  # min(budget, 4)
    assert bool(done[0]) and float(state.budget[0]) <= 0.0


def test_transition_choice_is_choice_modules_proportional_draw(env_params):
    """The unrolled choice equals choice_from_uniform(proportional_probs(...)) on a grid."""
    env, params = env_params
    rng = np.random.default_rng(1)
    for _ in range(20):
        u = rng.uniform(-1, 1, 20)
        slate = rng.choice(10, 2, replace=False)
        clusters = rng.integers(0, 20, 10)
        probs = proportional_probs(jnp.asarray(u[clusters[slate]], jnp.float32), 1.0, -1.0)
        for uc in np.linspace(0.0, 0.999, 23):
            _, _, _, info = env.transition(_state(u, clusters=list(clusters)),
                                           jnp.asarray([slate]), _draws(uc), params)
            want = choice_from_uniform(jnp.float32(uc), probs)
            assert int(info["response"].position[0]) == int(want)


# --- the gymnax interface ---------------------------------------------------------------------


def test_preset_is_registered_and_observation_shapes(env_params):
    env, params = env_params
    assert "recsim-ie" in presets()
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.user.shape == (20,) and obs.doc.shape == (10, 20)
    np.testing.assert_array_equal(obs.doc.sum(-1), np.ones(10))  # one-hot topics
    np.testing.assert_array_equal(np.argmax(obs.doc, -1), state.doc_cluster)
    assert float(state.budget) == 200.0
    assert np.all(np.abs(obs.user) <= 1.0)


def test_determinism_per_key(env_params):
    env, params = env_params
    obs1, s1 = env.reset(jax.random.key(3), params)
    obs2, s2 = env.reset(jax.random.key(3), params)
    _, s3 = env.reset(jax.random.key(4), params)
    np.testing.assert_array_equal(s1.interests, s2.interests)
    assert not np.array_equal(s1.interests, s3.interests)
    slate = jnp.array([0, 1])
    out1 = env.step(jax.random.key(5), s1, slate, params)
    out2 = env.step(jax.random.key(5), s2, slate, params)
    jax.tree.map(np.testing.assert_array_equal, out1, out2)
    _, states = env.reset_batch(jax.random.key(6), 32, params)
    slates = jnp.tile(slate, (32, 1))
    b1 = env.step_batch(jax.random.key(7), states, slates, params)
    b2 = env.step_batch(jax.random.key(7), states, slates, params)
    b3 = env.step_batch(jax.random.key(8), states, slates, params)
    jax.tree.map(np.testing.assert_array_equal, b1, b2)
    assert not np.array_equal(b1[1].doc_cluster, b3[1].doc_cluster)


def test_vmapped_step_equals_loop_of_single_steps(env_params):
    env, params = env_params
    n = 6
    _, states = env.reset_batch(jax.random.key(0), n, params)
    slates = random_slates(jax.random.key(1), n, 10, 2)
    keys = jax.random.split(jax.random.key(2), n)
    batched = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, states, slates, params)
    for i in range(n):
        state_i = jax.tree.map(lambda a, i=i: a[i], states)
        single = env.step(keys[i], state_i, slates[i], params)
        jax.tree.map(lambda b, s, i=i: np.testing.assert_allclose(b[i], s, rtol=1e-6),
                     batched, single)
    # Environment.step_batch is that vmap with one key per user.
    default = Environment.step_batch(env, jax.random.key(9), states, slates, params)
    keys = jax.random.split(jax.random.key(9), n)
    jax.tree.map(np.testing.assert_array_equal, default,
                 jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, states, slates, params))


def _no_click_state(n, budget):
    # All interests -1: every slate item has mass 0, so the user never clicks.
    return RecsimIEState(
        interests=-jnp.ones((n, 20), jnp.float32),
        budget=jnp.asarray(budget, jnp.float32),
        doc_cluster=jnp.zeros((n, 10), jnp.int32),
    )


def test_auto_reset_single_user(env_params):
    env, params = env_params
    state = jax.tree.map(lambda a: a[0], _no_click_state(1, [0.3]))
    obs, nxt, reward, done, _ = env.step(jax.random.key(0), state, jnp.array([0, 1]), params)
    assert bool(done) and float(reward) == 0.0
    assert float(nxt.budget) == 200.0  # a fresh user
    assert not np.allclose(nxt.interests, -1.0)
    np.testing.assert_array_equal(obs.user, nxt.interests)
    plain, plain_params = make_env("recsim-ie", auto_reset=False)
    _, nxt, _, done, _ = plain.step(jax.random.key(0), state, jnp.array([0, 1]), plain_params)
    assert bool(done) and float(nxt.budget) == pytest.approx(-0.2)


@pytest.mark.parametrize("n_done", [5, 40])  # few (scattered rows) and many (all rows drawn)
def test_auto_reset_batched(env_params, n_done):
    env, params = env_params
    n = 64
    assert env.reset_rows(n) == 16
    budget = np.full(n, 100.0)
    ended = np.random.default_rng(0).choice(n, n_done, replace=False)
    budget[ended] = 0.3
    obs, nxt, _, done, _ = env.step_batch(jax.random.key(1), _no_click_state(n, budget),
                                          jnp.tile(jnp.array([0, 1]), (n, 1)), params)
    done = np.asarray(done)
    np.testing.assert_array_equal(np.flatnonzero(done), np.sort(ended))
    interests = np.asarray(nxt.interests)
    np.testing.assert_array_equal(np.asarray(nxt.budget)[done], 200.0)
    np.testing.assert_array_equal(np.asarray(nxt.budget)[~done], 99.5)
    np.testing.assert_array_equal(interests[~done], -1.0)
    assert np.all(np.abs(interests[done]) < 1.0) and np.all(interests[done] != -1.0)
    assert len({tuple(row) for row in interests[done]}) == n_done  # independent fresh users
    np.testing.assert_array_equal(obs.user, nxt.interests)


def test_overrides_and_validation():
    env, params = make_env("recsim-ie", num_topics=10, num_candidates=5, slate_size=3,
                           time_budget=50.0)
    assert (env.num_topics, env.num_candidates, env.slate_size) == (10, 5, 3)
    np.testing.assert_allclose(params.cluster_means,
                               np.concatenate([np.linspace(-3, 0, 7), np.linspace(0, 3, 3)]))
    assert float(params.time_budget) == 50.0
    obs, state = env.reset(jax.random.key(0), params)
    _, state, *_ = env.step(jax.random.key(1), state, jnp.array([0, 1, 2]), params)
    assert obs.doc.shape == (5, 10)
    with pytest.raises(ValueError, match="unknown settings"):
        make_env("recsim-ie", slate=3)
    with pytest.raises(ValueError, match="slate_size"):
        make_env("recsim-ie", slate_size=11)
    with pytest.raises(ValueError, match="cluster_means"):
        make_env("recsim-ie", num_topics=11)


# --- random words and random slates -----------------------------------------------------------


def test_threefry_matches_jax():
    key = jnp.array([0x13198A2E, 0x03707344], jnp.uint32)
    counts = jnp.arange(64, dtype=jnp.uint32)
    y0, y1 = threefry2x32(key[0], key[1], counts[:32], counts[32:])
    np.testing.assert_array_equal(jnp.concatenate([y0, y1]), jrandom.threefry_2x32(key, counts))


def test_below_is_multiply_shift():
    w = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64)
    w = np.concatenate([w, [0, 1, 2**31, 2**32 - 1]]).astype(np.uint64)
    for n in (2, 9, 10, 20, 32767):
        q, rest = below(jnp.asarray(w, jnp.uint32), n)
        np.testing.assert_array_equal(np.asarray(q), (w * n) >> 32)
        np.testing.assert_array_equal(np.asarray(rest), (w * n) & (2**32 - 1))


@pytest.mark.parametrize("method", ["threefry", "xla_threefry", "key"])
def test_batch_bits_shapes_and_uniformity(method):
    key = jax.random.key(0)
    bits = batch_bits(key, (6, 5000), method)
    assert bits.shape == (6, 5000) and bits.dtype == jnp.uint32
    np.testing.assert_array_equal(bits, batch_bits(key, (6, 5000), method))
    assert batch_bits(key, (3, 7), method).shape == (3, 7)
    u = np.asarray(unit_uniform(bits)).ravel()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    z = np.asarray(normal_from_bits(bits)).ravel()
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.std() - 1.0) < 0.02
    rows = np.asarray(bits, np.float64)
    assert abs(np.corrcoef(rows[0], rows[3])[0, 1]) < 0.05  # the two halves are unrelated


@pytest.mark.parametrize("slate_size", [1, 2, 3])
def test_random_slates_are_distinct_and_uniform(slate_size):
    n, c = 60_000, 5
    slates = np.asarray(random_slates(jax.random.key(0), n, c, slate_size))
    assert slates.shape == (n, slate_size) and slates.min() >= 0 and slates.max() < c
    assert all(len(set(row)) == slate_size for row in slates[:2000])
    codes = (slates * c ** np.arange(slate_size)).sum(-1)
    counts = np.bincount(codes, minlength=c**slate_size)
    counts = counts[counts > 0]
    assert len(counts) == math.perm(c, slate_size)  # every ordered slate occurs
    expected = n / len(counts)
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))


# --- the command line -------------------------------------------------------------------------


def test_simulate_command_prints_statistics(capsys):
    assert main(["simulate", "--preset", "recsim-ie", "--episodes", "200", "--policy", "random",
                 "--seed", "0"]) == 0
    row = json.loads(capsys.readouterr().out)
    for key in ("return_mean", "return_std", "clicks_mean", "length_mean", "click_rate"):
        assert math.isfinite(row[key]), key
    assert row["episodes"] == 200
    assert 100 < row["return_mean"] < 220 and 0.3 < row["click_rate"] < 0.6
    assert row["clicks_mean"] * 4 >= row["return_mean"] - 1e-3  # at most 4 minutes per click


def test_simulate_command_rejects_bad_input(capsys):
    assert main(["simulate", "--episodes", "0"]) == 2
    assert main(["simulate", "--preset", "nope", "--episodes", "2"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_invalid_slate_entries_are_never_clicked(env_params):
    env, params = env_params
    u = np.ones(20)  # every valid document has the largest mass
    for uc in (0.0, 0.3, 0.49, 0.5, 0.99):
        _, _, _, info = env.transition(_state(u), jnp.array([[-1, 10]]), _draws(uc), params)
        assert not bool(info["response"].clicked[0])
    # [-1, 4]: masses 0, 2 and 2 for no click: slot 1 for u < 0.5.
    _, _, _, info = env.transition(_state(u), jnp.array([[-1, 4]]), _draws(0.3), params)
    assert int(info["response"].position[0]) == 1 and int(info["response"].item[0]) == 4

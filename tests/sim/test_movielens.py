"""The MovieLens-calibrated world on ml-100k: the rating model's held-out RMSE, real starting
histories, drift, patience, determinism, and a greedy policy beating a random one."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sim import make_env
from jaxrec.sim.movielens import (
    fit_rating_model,
    histories_from_interactions,
    history_table,
    rating_rmse,
)

H = 20


def load_100k(shared_dir):
    """ml-100k as 0-based arrays with a chronological leave-one-out split (last rating of each
    user is test, the one before it validation), through jaxrec.data when it is there."""
    try:
        from jaxrec.data import histories, leave_one_out, load_movielens
    except ImportError:
        return _load_100k_inline(shared_dir / "data/movielens/ml-100k/u.data")
    ratings = load_movielens("movielens-100k", data_dir=shared_dir / "data/movielens")
    split = leave_one_out(ratings)
    return types.SimpleNamespace(
        user=ratings.user, item=ratings.item, rating=ratings.rating,
        timestamp=ratings.timestamp, n_users=ratings.n_users, n_items=ratings.n_items,
        train=split.train, val=split.val, test=split.test,
        histories=histories(ratings, split.train), genres=ratings.items.genres,
        titles=list(ratings.items.title),
    )


def _load_100k_inline(path):
    data = np.loadtxt(path, dtype=np.int64)  # user item rating timestamp, tab separated
    _, user = np.unique(data[:, 0], return_inverse=True)
    _, item = np.unique(data[:, 1], return_inverse=True)
    order = np.lexsort((item, data[:, 3], user))
    user, item, rating, ts = user[order], item[order], data[order, 2], data[order, 3]
    ends = np.cumsum(np.bincount(user))
    train = np.ones(len(user), bool)
    train[ends - 1] = train[ends - 2] = False  # every ml-100k user has >= 20 ratings
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    rows = np.flatnonzero(train)
    return types.SimpleNamespace(
        user=user, item=item, rating=rating.astype(np.float32), timestamp=ts,
        n_users=n_users, n_items=n_items, train=rows, val=ends - 2, test=ends - 1,
        histories=histories_from_interactions(user[rows], item[rows], ts[rows], n_users),
        genres=None, titles=None,
    )


@pytest.fixture(scope="module")
def ml(shared_dir):
    d = load_100k(shared_dir)
    tr = d.train
    model = fit_rating_model(d.user[tr], d.item[tr], d.rating[tr], d.n_users, d.n_items)
    env, params = make_env(
        "movielens", users=d.user[tr], items=d.item[tr], ratings=d.rating[tr],
        timestamps=d.timestamp[tr], n_users=d.n_users, n_items=d.n_items,
        histories=d.histories, model=model, genres=d.genres, titles=d.titles, history_len=H,
    )
    return types.SimpleNamespace(data=d, model=model, env=env, params=params)


@functools.cache
def jitted(env):
    return jax.jit(env.reset), jax.jit(env.step), jax.jit(env.step_batch)


def tree_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_heldout_rmse_beats_the_baselines(ml):
    d = ml.data
    tr, te = d.train, d.test
    rmse = rating_rmse(ml.model, d.user[te], d.item[te], d.rating[te])
    mu = d.rating[tr].mean()
    global_rmse = float(np.sqrt(np.mean((d.rating[te] - mu) ** 2)))
    counts = np.bincount(d.item[tr], minlength=d.n_items)
    sums = np.bincount(d.item[tr], d.rating[tr], minlength=d.n_items)
    item_mean = np.where(counts > 0, sums / np.maximum(counts, 1), mu)
    item_rmse = float(np.sqrt(np.mean((d.rating[te] - item_mean[d.item[te]]) ** 2)))
    print(f"held-out RMSE {rmse:.4f}, item mean {item_rmse:.4f}, global mean {global_rmse:.4f}")
    # Measured (Nov 2026): model 1.03, item mean 1.13, global mean 1.23 on the last rating of
    # each user (later ratings drift from a user's past: random 90/10 splits give 0.91).
    assert rmse < 1.06
    assert rmse < item_rmse - 0.05 and rmse < global_rmse - 0.15
    # Fitting the training ratings well is not the point, but they must be fitted.
    assert rating_rmse(ml.model, d.user[tr], d.item[tr], d.rating[tr]) < 0.8


def test_dense_and_sparse_fits_agree(ml):
    d = ml.data
    rows = d.train[d.user[d.train] < 100]  # a small slice keeps this quick
    args = (d.user[rows], d.item[rows], d.rating[rows], 100, d.n_items)
    dense = fit_rating_model(*args, steps=30, dense=True)
    sparse = fit_rating_model(*args, steps=30, dense=False)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_users_start_from_their_real_history(ml):
    env, params, d = ml.env, ml.params, ml.data
    _, states = jax.jit(env.reset_batch, static_argnums=1)(jax.random.key(0), 64, params)
    assert len(set(np.asarray(states.user).tolist())) > 40
    for b in range(64):
        u = int(states.user[b])
        real = np.asarray(d.histories[u])[-H:]
        expect = np.concatenate([np.full(H - len(real), -1), real])
        assert np.array_equal(np.asarray(states.history[b]), expect)
        np.testing.assert_array_equal(np.asarray(states.factor[b]),
                                      np.asarray(ml.model.user_factors[u]))
    assert np.asarray(params.histories).shape == (d.n_users, H)
    assert ml.env.titles[0] == (d.titles[0] if d.titles else "item 0")


def test_history_table_from_lists_and_padded_rows():
    table = history_table([[1, 2, 3], [], [4]], 3, 2)
    assert table.tolist() == [[2, 3], [-1, -1], [-1, 4]]
    table = history_table(np.asarray([[-1, 5, 6], [-1, -1, 7]]), 2, 4)
    assert table.tolist() == [[-1, -1, 5, 6], [-1, -1, -1, 7]]
    hist = histories_from_interactions([1, 0, 1, 0], [10, 11, 12, 13], [5, 9, 1, 2], 3)
    assert [h.tolist() for h in hist] == [[13, 11], [12, 10], []]


def test_determinism_and_vmap_equals_loop(ml):
    env, params = ml.env, ml.params
    reset, step, step_batch = jitted(env)
    _, s1 = reset(jax.random.key(1), params)
    _, s2 = reset(jax.random.key(1), params)
    assert tree_equal(s1, s2)
    slate = jnp.asarray([0, 1, 2], jnp.int32)
    assert tree_equal(step(jax.random.key(2), s1, slate, params),
                      step(jax.random.key(2), s2, slate, params))
    n = 5
    _, states = env.reset_batch(jax.random.key(3), n, params)
    actions = jax.random.randint(jax.random.key(4), (n, 3), 0, ml.data.n_items)
    batched = step_batch(jax.random.key(5), states, actions, params)
    keys = jax.random.split(jax.random.key(5), n)
    for b in range(n):
        one = step(keys[b], jax.tree.map(lambda x, b=b: x[b], states), actions[b], params)
        row = jax.tree.map(lambda x, b=b: x[b], batched)
        for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(row), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_drift_toward_the_consumed_item(ml):
    env, params = ml.env, ml.params
    reset, step, _ = jitted(env)
    sure = params.replace(click_center=jnp.asarray(-100.0))  # every slate gets a click
    _, state = reset(jax.random.key(6), sure)
    item = 50
    _, nxt, _, _, info = step(jax.random.key(7), state, jnp.asarray([item, -1, -1]), sure)
    assert int(info["response"].item) == item
    q = ml.model.item_factors[item]
    assert float(jnp.linalg.norm(nxt.factor - q)) < float(jnp.linalg.norm(state.factor - q))
    np.testing.assert_allclose(np.asarray(nxt.factor),
                               np.asarray(state.factor + 0.1 * (q - state.factor)), rtol=1e-5)
    assert int(nxt.history[-1]) == item


def test_patience_runs_out_after_bad_recommendations(ml):
    env, params = ml.env, ml.params
    reset, step, _ = jitted(dataclasses.replace(env, auto_reset=False))
    _, state = reset(jax.random.key(8), params)
    pred = env.predicted_ratings(state, params)  # [N]
    worst = jnp.argsort(pred)[:3]
    best = jnp.argsort(-jnp.where(jnp.isin(jnp.arange(pred.shape[0]), state.history), 0, pred))[:3]
    # Good slates (best prediction above the 4.0 threshold) never cost patience.
    assert float(pred[best[0]]) > 4.5
    s = state
    for t in range(5):
        _, s, _, done, _ = step(jax.random.key(t), s, best, params)
        assert not bool(done) and float(s.patience) >= 3.0 - 1e-6
    # Bad slates cost 4.0 - best prediction each; the session ends when patience reaches 0.
    cost = 4.0 - float(jnp.max(pred[worst]))
    assert cost > 1.0
    s = state
    for t in range(10):
        _, s, reward, done, info = step(jax.random.key(10 + t), s, worst, params)
        if bool(done):
            break
    assert t + 1 == int(np.ceil(3.0 / cost - 1e-6)) and float(s.patience) <= 0
    # With auto-reset the finished user is replaced by a fresh one.
    _, auto_step, _ = jitted(env)
    key = jax.random.key(99)
    low = state.replace(patience=jnp.asarray(0.5, jnp.float32))
    _, fresh, _, done, _ = auto_step(key, low, worst, params)
    assert bool(done) and tree_equal(fresh, reset(jax.random.split(key)[1], params)[1])


def test_greedy_policy_earns_more_than_random(ml):
    env, params = ml.env, ml.params
    n_items = ml.data.n_items
    b = 256

    @jax.jit
    def run(key, greedy):
        _, states = env.reset_batch(key, b, params)

        def body(states, k):
            k_act, k_step = jax.random.split(k)
            pred = jax.vmap(env.predicted_ratings, in_axes=(0, None))(states, params)  # [B, N]
            seen = jax.vmap(lambda h: jnp.zeros(n_items, bool).at[h].set(h >= 0, mode="drop"))(
                states.history)
            top = jax.lax.top_k(jnp.where(seen, 0.0, pred), 3)[1]
            slates = jnp.where(greedy, top, jax.random.randint(k_act, (b, 3), 0, n_items))
            _, states, r, _, info = env.step_batch(k_step, states, slates, params)
            return states, (r, info["response"].clicked, info["response"].rating)

        return jax.lax.scan(body, states, jax.random.split(key, 10))[1]

    r_g, c_g, rating_g = run(jax.random.key(0), True)
    r_r, c_r, rating_r = run(jax.random.key(0), False)
    print(f"reward greedy {float(r_g.mean()):.3f} random {float(r_r.mean()):.3f}; clicks "
          f"{float(c_g.mean()):.2f} / {float(c_r.mean()):.2f}")
    assert float(r_g.mean()) > 1.3 * float(r_r.mean())
    assert float(c_g.mean()) > float(c_r.mean())
    mean_rating = lambda r, c: float(r.sum() / c.sum())
    assert mean_rating(rating_g, c_g) > mean_rating(rating_r, c_r) + 0.5


def test_the_data_is_required():
    with pytest.raises(ValueError, match="needs users"):
        make_env("movielens")
    with pytest.raises(ValueError, match="unknown settings"):
        make_env("movielens", users=[0], items=[0], ratings=[4.0], n_users=1, n_items=1,
                 factor=3)


def test_logged_futures_start_at_a_cut_and_attract_clicks(ml):
    """future_items m: a session starts at a cut c of the real training history, shows the H
    items before it, and the m items rated next are clicked far more than other items."""
    d, m = ml.data, 2
    env, params = make_env(
        "movielens", users=d.user[d.train], items=d.item[d.train], ratings=d.rating[d.train],
        timestamps=d.timestamp[d.train], n_users=d.n_users, n_items=d.n_items,
        histories=d.histories, model=ml.model, history_len=H, future_items=m,
    )
    b = 128
    _, states = jax.jit(env.reset_batch, static_argnums=1)(jax.random.key(1), b, params)
    cuts = set()
    for row in range(b):
        real = np.asarray(d.histories[int(states.user[row])])
        future = np.asarray(states.future[row])
        hist = np.asarray(states.history[row])
        shown = hist[hist >= 0]
        # the history is a window of the real sequence ending at the cut, the future follows
        for cut in range(1, len(real)):
            if np.array_equal(real[max(0, cut - H):cut], shown) and np.array_equal(
                    real[cut:cut + m], future[future >= 0]):
                cuts.add(cut == len(real) - 1)
                break
        else:
            raise AssertionError(f"row {row}: history and future are not a cut of the user")
    assert cuts == {True, False}  # cuts fall inside histories, not only at their ends

    step = jax.jit(env.step_batch)
    other = (states.future[:, :1] + 1 + jnp.arange(3)[None, :]) % d.n_items  # [B, 3]
    with_future = other.at[:, 2].set(states.future[:, 0])
    clicked = {}
    for name, slates in (("future", with_future), ("other", other)):
        _, _, _, _, info = step(jax.random.key(2), states, slates.astype(jnp.int32), params)
        r = info["response"]
        clicked[name] = float(jnp.mean(r.clicked & (r.position == 2)))
    assert clicked["future"] > clicked["other"] + 0.3, clicked
    # without logged futures the world is the end-of-history one
    assert np.asarray(ml.params.sequences).shape == (d.n_users, 0)

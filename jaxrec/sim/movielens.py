"""The MovieLens-calibrated world: users who answer like a rating model fitted to real ratings.

    model = fit_rating_model(users, items, ratings, n_users, n_items)     # a few seconds
    rating_rmse(model, test_users, test_items, test_ratings)              # held-out RMSE
    env, params = make_env("movielens", users=users, items=items, ratings=ratings,
                           timestamps=timestamps, n_users=n_users, n_items=n_items, model=model)

jaxrec.sim does not read files (it ranks beside jaxrec.data): the caller passes plain arrays of
the TRAINING interactions with 0-based user and item indices, and optionally per-user histories,
item genres and titles.

Rating model: r_hat(u, i) = mu + b_u + b_i + p_u . q_i, fitted by full-batch Adam on

    (1 / n) [ sum (r - r_hat)^2 + bias_l2 (sum b_u^2 + sum b_i^2)
              + factor_l2 (sum |p_u|^2 + sum |q_i|^2) ]

(the classic regularised SVD objective). On ml-100k's chronological leave-one-out split
(jaxrec.data.leave_one_out: each user's last rating is test, the one before validation) it
reaches a held-out RMSE of 1.03 on test and 1.00 on validation, against 1.13 for item means
and 1.23 for the global mean; on a random 90/10 split, 0.91. A user's latest ratings drift from
their past, which is why the last-item split is harder.

User model (one user; all randomness from the key):
- a fresh user is a real user u (drawn uniformly among those with a history): the factor p
  starts at p_u and the history [H] is u's last H training items (oldest first, -1 padding at
  the front).
- predicted rating of an item: r_hat = clip(mu + b_u + b_i + p . q_i, 1, 5), with the CURRENT p.
- choice: multinomial logit, slot utility click_scale * (r_hat - click_center) + seen_utility
  * [in history] + position bias, no-click utility 0; so a lone item is clicked with
  probability sigmoid(click_scale * (r_hat - click_center)).
- response to a click: rating = clip(round(r_hat + N(0, rating_noise^2)), 1, 5);
  liked = rating >= like_threshold; watch time = length * rating / 5 with length 1 (runtimes are
  unknown: the share of the film watched grows with the rating).
- interest drift: a click moves p toward the item: p <- p + drift * (q_i - p).
- logged futures (`future_items` m > 0): a session starts at a uniform cut c of the real
  user's training history (1 <= c < its length), the history is the H items before c, and the
  m items the user really rated next (training rows only) add `future_utility` to their slot's
  utility: the user clicks what they went on to watch, so a policy earns reward by naming the
  user's next items, a signal of the sequence the rating model does not see. m = 0 starts at
  the end of the training history with no such term.
- patience: each slate costs max(0, patience_threshold - best r_hat on the slate) (invalid slots
  count as r_hat = 1) and a like gives back patience_recovery, capped at the start value; the
  session ends at patience <= 0 or after max_steps slates.
- catalogue: features = item factors q_i (the user model's own taste space, so the ads
  preset's relevance is cosine similarity of factors), topic = first genre (or the largest
  factor when no genres are given), quality = b_i, popularity = training count / max count.
  MovieLens has no prices or bids: they are drawn log-normal from `seed` for the products and
  ads presets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxrec.sim import rewards
from jaxrec.sim.choice import choose_from_slate
from jaxrec.sim.core import (
    Catalogue,
    Environment,
    Response,
    normal_from_bits,
    register,
    unit_uniform,
)
from jaxrec.sim.synthetic import position_bias_array

NEG = -1e9  # utility of an invalid slate entry


# --- the rating model --------------------------------------------------------------------------


@struct.dataclass
class RatingModel:
    """Biased matrix factorisation: r_hat(u, i) = mu + b_u + b_i + p_u . q_i."""

    global_bias: jax.Array  # [] float32 mu, the training mean
    user_bias: jax.Array  # [U] float32
    item_bias: jax.Array  # [N] float32
    user_factors: jax.Array  # [U, D] float32
    item_factors: jax.Array  # [N, D] float32

    def predict(self, users: jax.Array, items: jax.Array) -> jax.Array:
        """Unclipped predictions for index arrays of one shape."""
        dot = jnp.sum(self.user_factors[users] * self.item_factors[items], axis=-1)
        return self.global_bias + self.user_bias[users] + self.item_bias[items] + dot


DENSE_CELLS = 1 << 23  # user x item tables up to this size fit through dense matmuls


def fit_rating_model(
    users: Any,  # [R] int 0-based user indices of the training ratings
    items: Any,  # [R] int 0-based item indices
    ratings: Any,  # [R] float ratings (1-5)
    n_users: int,
    n_items: int,
    *,
    dim: int = 32,
    bias_l2: float = 1.0,
    factor_l2: float = 10.0,
    steps: int = 150,
    learning_rate: float = 0.05,
    seed: int = 0,
    dense: bool | None = None,
) -> RatingModel:
    """Fit the rating model by full-batch Adam (one jitted scan of `steps` updates).

    Defaults were chosen on ml-100k's chronological leave-one-out split: factor_l2 from 5 to 20
    and dim from 16 to 64 all land within 0.01 of the best held-out RMSE; 100-300 steps agree
    within 0.003. `dense` (default: when n_users * n_items <= DENSE_CELLS) computes the same
    objective over the whole user x item table with matmuls instead of gathers and scatters
    over the ratings: about 3x faster on ml-100k's CPU fit.
    """
    u = np.asarray(users, np.int64)
    i = np.asarray(items, np.int64)
    r = np.asarray(ratings, np.float32)
    k_user, k_item = jax.random.split(jax.random.key(seed))
    init = RatingModel(
        global_bias=jnp.asarray(r.mean(), jnp.float32),
        user_bias=jnp.zeros((n_users,), jnp.float32),
        item_bias=jnp.zeros((n_items,), jnp.float32),
        user_factors=0.1 * jax.random.normal(k_user, (n_users, dim), jnp.float32),
        item_factors=0.1 * jax.random.normal(k_item, (n_items, dim), jnp.float32),
    )
    opt = (bias_l2, factor_l2, learning_rate)
    use_dense = n_users * n_items <= DENSE_CELLS if dense is None else dense
    if use_dense:
        # Per cell: count c and rating sum s; sum over its ratings of (r - x)^2 is
        # c x^2 - 2 s x + const, so duplicate (user, item) pairs stay exact.
        counts = np.zeros((n_users, n_items), np.float32)
        sums = np.zeros((n_users, n_items), np.float32)
        np.add.at(counts, (u, i), 1.0)
        np.add.at(sums, (u, i), r)
        return _fit_dense(init, jnp.asarray(counts), jnp.asarray(sums), *opt, steps=steps)
    return _fit_sparse(init, jnp.asarray(u, jnp.int32), jnp.asarray(i, jnp.int32),
                       jnp.asarray(r), *opt, steps=steps)


def _penalty(model: RatingModel, bias_l2, factor_l2) -> jax.Array:
    biases = jnp.sum(model.user_bias**2) + jnp.sum(model.item_bias**2)
    factors = jnp.sum(model.user_factors**2) + jnp.sum(model.item_factors**2)
    return bias_l2 * biases + factor_l2 * factors


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_sparse(init, u, i, r, bias_l2, factor_l2, learning_rate, steps):
    def loss(model):
        err = r - model.predict(u, i)  # [R]
        return (jnp.sum(err**2) + _penalty(model, bias_l2, factor_l2)) / r.shape[0]

    return _adam(loss, init, learning_rate, steps)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_dense(init, counts, sums, bias_l2, factor_l2, learning_rate, steps):
    n = jnp.sum(counts)

    def loss(model):
        pred = (model.global_bias + model.user_bias[:, None] + model.item_bias[None, :]
                + model.user_factors @ model.item_factors.T)  # [U, N]
        sq = jnp.sum(counts * pred**2 - 2.0 * sums * pred)  # sum of squared errors - const
        return (sq + _penalty(model, bias_l2, factor_l2)) / n

    return _adam(loss, init, learning_rate, steps)


def _adam(loss, init: RatingModel, learning_rate, steps: int) -> RatingModel:
    opt = optax.adam(learning_rate)
    # mu stays the training mean: it is not a trained parameter.
    frozen_mu = lambda g: dataclasses.replace(g, global_bias=jnp.zeros((), jnp.float32))

    def body(carry, _):
        model, opt_state = carry
        grads = frozen_mu(jax.grad(loss)(model))
        updates, opt_state = opt.update(grads, opt_state, model)
        return (optax.apply_updates(model, updates), opt_state), None

    (model, _), _ = jax.lax.scan(body, (init, opt.init(init)), None, length=steps)
    return model


def rating_rmse(model: RatingModel, users: Any, items: Any, ratings: Any) -> float:
    """RMSE of the model's predictions (clipped to [1, 5]) on the given ratings."""
    pred = jnp.clip(model.predict(jnp.asarray(users, jnp.int32), jnp.asarray(items, jnp.int32)),
                    1.0, 5.0)
    return float(jnp.sqrt(jnp.mean((jnp.asarray(ratings, jnp.float32) - pred) ** 2)))


# --- the environment -----------------------------------------------------------------------------


@struct.dataclass
class MovieLensParams:
    """The fitted model, the real histories and the user-model settings (a pytree)."""

    catalogue: Catalogue  # N items, F = D factor features
    popularity: jax.Array  # [N] float32 in [0, 1], training count / max count
    weights: rewards.RewardWeights
    model: RatingModel
    histories: jax.Array  # [U, H] int32 each real user's last H training items, -1 padded front
    sequences: jax.Array  # [U, H + T + m] int32 each user's T-item training history after H -1s,
    #                       -1 after it (the logged futures' source; [U, 0] when m = 0)
    lengths: jax.Array  # [U] int32 training items per user
    start_users: jax.Array  # [M] int32 users a session may start from (non-empty history)
    position_bias: jax.Array  # [K] float32 added to each slot's utility
    click_scale: jax.Array  # [] float32 click logit per rating point
    click_center: jax.Array  # [] float32 predicted rating at which a lone item is clicked 50%
    seen_utility: jax.Array  # [] float32 utility added to an item already in the history
    rating_noise: jax.Array  # [] float32 std of a given rating around the prediction
    like_threshold: jax.Array  # [] float32 a rating at or above this is a like
    drift: jax.Array  # [] float32 step of the user factor toward a consumed item's factor
    patience: jax.Array  # [] float32 start (and maximum) patience
    patience_threshold: jax.Array  # [] float32 best predicted rating a slate needs to cost nothing
    patience_recovery: jax.Array  # [] float32 patience regained per like
    max_steps: jax.Array  # [] int32 slates per session at most
    future_utility: jax.Array  # [] float32 utility added to an item among the logged futures


@struct.dataclass
class MovieLensState:
    """One simulated user, started from a real one."""

    user: jax.Array  # [] int32 the real user it started from
    factor: jax.Array  # [D] float32 current taste (starts at the user's fitted factor)
    history: jax.Array  # [H] int32 oldest first, -1 padding at the front
    patience: jax.Array  # [] float32
    step: jax.Array  # [] int32 slates shown this session
    future: jax.Array  # [max(m, 1)] int32 the items the real user rated next (-1: none)


@dataclasses.dataclass(frozen=True)
class MovieLensEnv(Environment):
    slate_size: int = 3  # K
    history_len: int = 20  # H
    reward: str = "content"  # reward preset: content, products or ads
    n_items: int = 0  # N, the catalogue size (slates index the whole catalogue)
    future_items: int = 0  # m: logged next items that attract clicks (0: sessions start at the
    #                        end of the training history, no such term)
    # Host-side item titles (for the codec); excluded from equality so they never recompile.
    titles: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def num_candidates(self) -> int:
        """Slates choose among the whole catalogue (no candidate sampling)."""
        return self.n_items

    def observation(self, state: MovieLensState, params: MovieLensParams) -> jax.Array:
        """What the policy sees: the history [H] int32 (-1 padded at the front)."""
        return state.history

    def predicted_ratings(self, state: MovieLensState, params: MovieLensParams,
                          items: jax.Array | None = None) -> jax.Array:
        """r_hat for `items` (default: the whole catalogue, [N]) under the user's current taste,
        clipped to [1, 5]. Also the oracle for a greedy baseline policy."""
        m = params.model
        if items is None:
            items = jnp.arange(m.item_bias.shape[0], dtype=jnp.int32)
        items = jnp.clip(items, 0, m.item_bias.shape[0] - 1)
        raw = (m.global_bias + m.user_bias[state.user] + m.item_bias[items]
               + m.item_factors[items] @ state.factor)
        return jnp.clip(raw, 1.0, 5.0)

    def reset(self, key: jax.Array, params: MovieLensParams):
        k_user, k_cut = jax.random.split(key)
        idx = jax.random.randint(k_user, (), 0, params.start_users.shape[0])  # a uniform user
        user = params.start_users[idx]
        history, future = params.histories[user], jnp.full((1,), -1, jnp.int32)
        if self.future_items:
            h, m = self.history_len, self.future_items
            cut = jax.random.randint(k_cut, (), 1, params.lengths[user])  # 1 <= c < length
            row = params.sequences[user]
            history = jax.lax.dynamic_slice_in_dim(row, cut, h)  # items [c - H, c)
            future = jax.lax.dynamic_slice_in_dim(row, cut + h, m)  # items [c, c + m)
        state = MovieLensState(
            user=user,
            factor=params.model.user_factors[user],
            history=history,
            patience=jnp.asarray(params.patience, jnp.float32),
            step=jnp.zeros((), jnp.int32),
            future=future,
        )
        return self.observation(state, params), state

    def step_env(self, key: jax.Array, state: MovieLensState, action: jax.Array,
                 params: MovieLensParams):
        bits = jax.random.bits(key, (2,), jnp.uint32)  # choice, rating noise
        cat = params.catalogue
        slate, valid, safe, seen = rewards.slate_view(action, cat.size, state.history)  # [K] each
        pred = self.predicted_ratings(state, params, safe)  # [K]
        utility = params.click_scale * (pred - params.click_center) + params.seen_utility * seen
        ahead = jnp.any((slate[:, None] == state.future[None, :]) & (state.future >= 0), axis=1)
        utility = utility + params.future_utility * ahead  # [K]
        utility = jnp.where(valid, utility, NEG)
        position, clicked, slot = choose_from_slate(
            unit_uniform(bits[0]), utility, 0.0, params.position_bias)
        item = jnp.where(clicked, safe[slot], -1).astype(jnp.int32)

        noise = params.rating_noise * normal_from_bits(bits[1])
        rating = jnp.clip(jnp.round(pred[slot] + noise), 1.0, 5.0)
        response = Response(
            clicked=clicked,
            position=position,
            item=item,
            watch_time=jnp.where(clicked, cat.length[safe[slot]] * rating / 5.0, 0.0),
            rating=jnp.where(clicked, rating, 0.0),
            liked=clicked & (rating >= params.like_threshold),
        )
        reward, terms = rewards.reward_fn(self.reward)(
            response, slate, cat, state.history, params.weights, params.popularity
        )

        q = params.model.item_factors[safe[slot]]  # [D]
        factor = jnp.where(clicked, state.factor + params.drift * (q - state.factor), state.factor)
        history = rewards.push_history(state.history, item, clicked)
        best = jnp.max(jnp.where(valid, pred, 1.0))
        lost = jnp.maximum(params.patience_threshold - best, 0.0)
        patience = jnp.minimum(
            state.patience - lost + params.patience_recovery * response.liked, params.patience
        )
        next_state = MovieLensState(
            user=state.user, factor=factor, history=history.astype(jnp.int32),
            patience=patience, step=state.step + 1, future=state.future,
        )
        done = (patience <= 0.0) | (next_state.step >= params.max_steps)
        info = {"response": response, "terms": terms, "predicted": pred}
        return self.observation(next_state, params), next_state, reward, done, info


# --- building the world from arrays ------------------------------------------------------------


def history_table(histories: Any, n_users: int, history_len: int) -> np.ndarray:
    """[U, H] int32 from per-user histories: a sequence of 1-D id arrays in time order, or a 2-D
    array whose entries < 0 are padding (kept entries stay in order). Keeps the last H items;
    pads at the front with -1."""
    rows = list(histories)
    if len(rows) != n_users:
        raise ValueError(f"histories has {len(rows)} users, expected n_users={n_users}")
    table = np.full((n_users, history_len), -1, np.int32)
    for u, row in enumerate(rows):
        row = np.asarray(row, np.int64).ravel()
        row = row[row >= 0][-history_len:] if history_len > 0 else row[:0]
        if len(row):
            table[u, history_len - len(row):] = row
    return table


def _sequences(histories: Any, n_users: int, history_len: int,
               future_items: int) -> tuple[np.ndarray, np.ndarray]:
    """([U, H + T + m] int32, [U] int32): every user's whole history after H columns of -1 and
    before m more (so any window of H before, or m after, a cut is one slice), and its length;
    [U, 0] when m = 0 (sessions then start from `history_table`)."""
    rows = [np.asarray(r, np.int64).ravel() for r in histories]
    rows = [r[r >= 0] for r in rows]
    lengths = np.asarray([len(r) for r in rows], np.int32)
    if not future_items:
        return np.zeros((n_users, 0), np.int32), lengths
    width = history_len + int(lengths.max(initial=0)) + future_items
    out = np.full((n_users, width), -1, np.int32)
    for u, r in enumerate(rows):
        out[u, history_len:history_len + len(r)] = r
    return out, lengths


def histories_from_interactions(users: Any, items: Any, timestamps: Any | None,
                                n_users: int) -> list[np.ndarray]:
    """Per-user item ids in time order (ties keep input order); input order without timestamps."""
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    keys = (np.arange(len(users)),) if timestamps is None else (np.arange(len(users)),
                                                                  np.asarray(timestamps))
    order = np.lexsort((*keys, users))
    users, items = users[order], items[order]
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    return [items[bounds[u]:bounds[u + 1]] for u in range(n_users)]


_ENV = dict(slate_size=3, history_len=20, reward="content", auto_reset=True, future_items=0)
_USER = dict(
    position_bias=0.2,  # slope: slot k loses 0.2 * k utility
    click_scale=1.5,  # a lone 4.5-star prediction is clicked 82%, a 2-star one 10%
    click_center=3.5,  # ml-100k's mean rating is 3.53
    seen_utility=-2.0,  # people rarely pick a film they have already rated
    rating_noise=0.9,  # what the fitted model cannot explain: its held-out RMSE is 0.9-1.0
    like_threshold=4.0,
    drift=0.1,
    patience=3.0,
    patience_threshold=4.0,  # a slate whose best film is predicted under 4 stars tries patience
    patience_recovery=0.5,
    max_steps=20,
    future_utility=3.0,  # a logged next item is clicked like one predicted 2 stars higher
)
_FIT = dict(dim=32, bias_l2=1.0, factor_l2=10.0, steps=150, learning_rate=0.05)
_WORLD = dict(seed=0)


@register("movielens")
def make_movielens(
    *,
    users: Any = None,
    items: Any = None,
    ratings: Any = None,
    n_users: int | None = None,
    n_items: int | None = None,
    timestamps: Any = None,
    histories: Any = None,
    model: RatingModel | None = None,
    genres: Any = None,
    titles: Sequence[str] | None = None,
    reward_weights: rewards.RewardWeights | dict | None = None,
    **settings: Any,
) -> tuple[MovieLensEnv, MovieLensParams]:
    """(env, params) for users calibrated to the given TRAINING ratings.

    users, items, ratings: [R] arrays (0-based indices); n_users, n_items: table sizes;
    timestamps: [R] (orders the histories when `histories` is not given); histories: per-user
    training histories (see `history_table`); model: a fitted RatingModel (fitted here when
    None, with settings dim, bias_l2, factor_l2, steps, learning_rate, seed); genres: [N, G]
    0/1 (gives each item's topic); titles: N strings (default "item <i>").
    Other settings: slate_size, history_len, reward, auto_reset and the MovieLensParams fields.
    reward_weights: RewardWeights or a dict of changes to the preset's defaults (here content
    counts watch time in films, weight 1.0, and every preset penalises items already in the
    history by 0.5).
    """
    allowed = set(_ENV) | set(_USER) | set(_FIT) | set(_WORLD)
    bad = sorted(set(settings) - allowed)
    if bad:
        raise ValueError(f"movielens: unknown settings {bad}; choose from {sorted(allowed)}")
    if users is None or items is None or ratings is None or n_users is None or n_items is None:
        raise ValueError("movielens needs users, items, ratings, n_users and n_items: load them "
                         "with jaxrec.data and pass the training split")
    pick = lambda d: {k: settings.get(k, v) for k, v in d.items()}
    env_kw, user, fit_kw, world = pick(_ENV), pick(_USER), pick(_FIT), pick(_WORLD)
    users_np = np.asarray(users, np.int64)
    items_np = np.asarray(items, np.int64)
    if len(users_np) and (users_np.min() < 0 or users_np.max() >= n_users
                          or items_np.min() < 0 or items_np.max() >= n_items):
        raise ValueError("movielens: user and item indices must be 0-based and below n_users, "
                         "n_items")
    if model is None:
        model = fit_rating_model(users_np, items_np, ratings, n_users, n_items,
                                 seed=world["seed"], **fit_kw)

    if histories is None:
        histories = histories_from_interactions(users_np, items_np, timestamps, n_users)
    histories = list(histories)  # read twice below
    table = history_table(histories, n_users, env_kw["history_len"])
    sequences, lengths = _sequences(histories, n_users, env_kw["history_len"],
                                    env_kw["future_items"])
    # a session needs a history; with logged futures also one item after its cut
    start = np.flatnonzero(lengths >= (2 if env_kw["future_items"] else 1)).astype(np.int32)
    if len(start) == 0:
        raise ValueError("movielens: no user has a training history")

    q = np.asarray(model.item_factors)
    if genres is not None:
        genres = np.asarray(genres)
        if genres.shape[0] != n_items:
            raise ValueError(f"genres has {genres.shape[0]} rows, expected n_items={n_items}")
        topic = np.argmax(genres, axis=1)  # the first listed genre
    else:
        topic = np.argmax(np.abs(q), axis=1)
    rng = np.random.default_rng([world["seed"], 2])
    price = np.round(np.clip(rng.lognormal(np.log(20.0), 0.8, n_items), 1.0, 500.0), 2)
    bid = np.round(np.clip(rng.lognormal(np.log(0.5), 0.5, n_items), 0.05, 5.0), 2)
    counts = np.bincount(items_np, minlength=n_items).astype(np.float32)
    catalogue = Catalogue(
        features=jnp.asarray(q, jnp.float32),
        topic=jnp.asarray(topic, jnp.int32),
        quality=jnp.asarray(model.item_bias, jnp.float32),
        length=jnp.ones((n_items,), jnp.float32),
        price=jnp.asarray(price, jnp.float32),
        bid=jnp.asarray(bid, jnp.float32),
    )

    reward = env_kw["reward"]
    rewards.reward_fn(reward)  # validates the name
    if reward_weights is None or isinstance(reward_weights, dict):
        changes = {"seen": 0.5, **({"watch": 1.0} if reward == "content" else {})}
        reward_weights = rewards.default_weights(reward, **{**changes, **(reward_weights or {})})
    if titles is None:
        titles = [f"item {i}" for i in range(n_items)]
    if len(titles) != n_items:
        raise ValueError(f"titles has {len(titles)} entries, expected n_items={n_items}")

    env = MovieLensEnv(titles=tuple(titles), n_items=n_items, **env_kw)
    scalars = {k: jnp.asarray(v, jnp.int32 if k == "max_steps" else jnp.float32)
               for k, v in user.items() if k != "position_bias"}
    params = MovieLensParams(
        catalogue=catalogue,
        popularity=jnp.asarray(counts / max(counts.max(), 1.0)),
        weights=rewards.as_weights(reward, reward_weights),
        model=model,
        histories=jnp.asarray(table),
        sequences=jnp.asarray(sequences),
        lengths=jnp.asarray(lengths),
        start_users=jnp.asarray(start),
        position_bias=position_bias_array(user["position_bias"], env_kw["slate_size"]),
        **scalars,
    )
    return env, params

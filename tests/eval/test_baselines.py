"""The recommender baselines: popularity on a hand-made table, BPR and SASRec end to end on the
real ml-100k (few epochs), and the name dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data import load_movielens, make_ratings
from jaxrec.data.movielens import make_items
from jaxrec.eval.baselines import (
    BASELINES,
    BPR,
    Popularity,
    SASRec,
    _fit_rows,
    _sample_negatives,
    fit_baseline,
    validation_hr10,
)
from jaxrec.eval.data import leave_one_out_protocol


def _items(ids):
    """A catalogue of placeholder dramas with these MovieLens ids (sorted)."""
    return make_items({i: (f"Movie {i} (2000)", ("Drama",)) for i in ids})


# (user id, item id, timestamp); per user in time order the last is test, the one before it
# validation, the rest fit rows
ROWS = [
    (1, 10, 1), (1, 20, 2), (1, 30, 3), (1, 40, 4), (1, 50, 5),  # fit 10 20 30; val 40, test 50
    (2, 20, 1), (2, 30, 2), (2, 10, 3), (2, 50, 4),  # fit 20 30; val 10; test 50
    (3, 30, 1), (3, 40, 2), (3, 20, 3),  # fit 30; val 40; test 20
    (4, 60, 1),  # one rating: a fit row, and an item user 1 never rated (for the candidates)
]


@pytest.fixture
def tiny():
    u, i, t = map(np.array, zip(*ROWS, strict=True))
    ratings = make_ratings(u, i, np.full(len(u), 4.0), t, _items([10, 20, 30, 40, 50, 60]))
    return ratings, leave_one_out_protocol(ratings, candidates=2)


def test_popularity_counts_fit_rows_only(tiny):
    ratings, protocol = tiny
    model = Popularity.fit(ratings, protocol)
    # fit items 10 20 30 | 20 30 | 30 | 60 -> counts of items 10..60 (dense 0..5)
    assert model.counts.tolist() == [1, 2, 3, 0, 0, 1]
    scores = model.scores(protocol.users, protocol.histories)
    assert scores.dtype == np.float32 and scores.shape == (3, 6)
    assert (scores == model.counts).all()
    again = fit_baseline("popularity", ratings, protocol, seed=7)
    assert again.counts.tolist() == [1, 2, 3, 0, 0, 1]


def test_unknown_name_and_setting(tiny):
    ratings, protocol = tiny
    with pytest.raises(ValueError, match="popularity, bpr, sasrec"):
        fit_baseline("nope", ratings, protocol)
    assert BASELINES == ("popularity", "bpr", "sasrec")
    with pytest.raises(ValueError, match="dim"):
        fit_baseline("bpr", ratings, protocol, dimension=8)


def test_bpr_negatives_are_unrated(tiny):
    ratings, protocol = tiny
    rows = _fit_rows(ratings, protocol.fit_rows)
    users = jnp.asarray(np.repeat(np.arange(3, dtype=np.int32), 200))
    # 32 tries: user 0 rated 3 of 6 items, and with 8 some all-rated draws would be kept
    neg = np.asarray(_sample_negatives(jax.random.key(0), rows, users, ratings.n_items, 32))
    rated = {(int(u), int(i)) for u, i in zip(ratings.user[protocol.fit_rows],
                                              ratings.item[protocol.fit_rows], strict=True)}
    pairs = set(zip(np.asarray(users).tolist(), neg.tolist(), strict=True))
    assert not pairs & rated
    # every unrated item of users 0-2 (3 + 4 + 5 of them) turns up: uniform, 200 draws each
    assert len(pairs) == 12


@pytest.fixture(scope="module")
def ml100k(shared_dir):
    ratings = load_movielens("movielens-100k", data_dir=shared_dir / "data" / "movielens")
    protocol = leave_one_out_protocol(ratings)
    return ratings, protocol, validation_hr10(Popularity.fit(ratings, protocol), protocol)


def _check_end_to_end(cls, ratings, protocol, popularity_hr, **hyper):
    a = cls.fit(ratings, protocol, seed=0, **hyper)
    b = cls.fit(ratings, protocol, seed=0, **hyper)
    scores = a.scores(protocol.users, protocol.histories)
    assert scores.dtype == np.float32
    assert scores.shape == (len(protocol), ratings.n_items)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, b.scores(protocol.users, protocol.histories))
    hr = validation_hr10(a, protocol)
    assert hr == max(h for _, h in a.val_curve)  # the best evaluated parameters are kept
    chance = 10 / ratings.n_items
    # popularity's validation HR@10 on ml-100k is ~0.064, chance 0.006; a few epochs of either
    # model reach ~0.10
    assert popularity_hr > 5 * chance
    assert hr > popularity_hr, (hr, popularity_hr, a.val_curve)
    return a, scores


def test_bpr_on_ml100k(ml100k):
    ratings, protocol, popularity_hr = ml100k
    model, scores = _check_end_to_end(BPR, ratings, protocol, popularity_hr, epochs=6,
                                      eval_every=3)
    assert [e for e, _ in model.val_curve] == [3, 6]
    other = BPR.fit(ratings, protocol, seed=1, epochs=1)
    assert not np.array_equal(other.scores(protocol.users[:4], protocol.histories[:4]),
                              scores[:4])


def test_sasrec_on_ml100k(ml100k):
    ratings, protocol, popularity_hr = ml100k
    model, scores = _check_end_to_end(SASRec, ratings, protocol, popularity_hr, epochs=6,
                                      eval_every=3)
    # scores read only the history: a user's row depends on the last max_len items
    assert len(protocol.histories[0]) > model.config.max_len
    short = protocol.histories[:, -model.config.max_len:]
    np.testing.assert_allclose(model.scores(protocol.users, short), scores, rtol=1e-5,
                               atol=1e-5)

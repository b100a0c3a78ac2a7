"""The Ratings table, the chronological leave-one-out split, histories and preference pairs, on
hand-made tables whose answers are worked out in the comments."""

import itertools

import numpy as np
import pytest

from jaxrec.data import (
    Items,
    histories,
    k_core,
    leave_one_out,
    make_ratings,
    preference_pairs,
)


def _items(ids):
    n = len(ids)
    return Items(
        ids=np.asarray(ids, np.int64),
        title=np.array([f"Movie {i} (2000)" for i in ids]),
        clean_title=np.array([f"Movie {i}" for i in ids]),
        year=np.full(n, 2000, np.int32),
        genres=np.zeros((n, 1), bool),
        genre_names=("Drama",),
    )


# rows given out of order: (user id, item id, rating, timestamp)
ROWS = [
    (70, 300, 4.0, 30),
    (70, 100, 5.0, 10),
    (9, 200, 1.0, 5),
    (70, 200, 2.0, 30),  # ties with item 300 at t=30: item 200 (dense 1) comes first
    (70, 400, 3.0, 40),
    (9, 100, 3.0, 6),  # user 9 has 2 ratings: all train
    (12, 400, 5.0, 1),
    (12, 300, 5.0, 2),
    (12, 100, 1.0, 3),
]


@pytest.fixture
def table():
    u, i, r, t = map(np.array, zip(*ROWS, strict=True))
    # the catalogue lists an unrated item (500), in a shuffled order
    return make_ratings(u, i, r, t, _items([500, 300, 100, 400, 200]), source="hand")


def test_dense_indices_and_canonical_order(table):
    assert (len(table), table.n_users, table.n_items) == (9, 3, 4)
    assert table.user_ids.tolist() == [9, 12, 70]  # dense user = rank of the original id
    assert table.items.ids.tolist() == [100, 200, 300, 400]  # only rated items, by id
    assert table.items.title[2] == "Movie 300 (2000)"
    assert table.items.index_of([400, 100]).tolist() == [3, 0]
    with pytest.raises(ValueError, match="not in the table"):
        table.items.index_of([500])
    # rows sorted by (user, timestamp, item, rating)
    assert table.user.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert table.timestamp.tolist() == [5, 6, 1, 2, 3, 10, 30, 30, 40]
    assert table.item.tolist() == [1, 0, 3, 2, 0, 0, 1, 2, 3]
    assert (table.user.dtype, table.item.dtype) == (np.int32, np.int32)
    assert (table.rating.dtype, table.timestamp.dtype) == (np.float32, np.int64)


def test_the_order_of_the_input_rows_does_not_matter(table):
    rows = [ROWS[k] for k in np.random.default_rng(0).permutation(len(ROWS))]
    u, i, r, t = map(np.array, zip(*rows, strict=True))
    other = make_ratings(u, i, r, t, _items([100, 200, 300, 400]))
    for name in ("user", "item", "rating", "timestamp", "user_ids"):
        np.testing.assert_array_equal(getattr(other, name), getattr(table, name))


def test_an_item_without_text_is_an_error():
    with pytest.raises(ValueError, match=r"1 rated item ids are not in the table, e\.g\. \[7\]"):
        make_ratings([1], [7], [3.0], [0], _items([1, 2]))


def test_leave_one_out(table):
    split = leave_one_out(table)
    # user 9 (2 ratings): all train. user 12: train t=1 (row 2), val t=2, test t=3.
    # user 70: t=10, then the t=30 tie (item 200 before item 300), then t=40:
    # train rows 5, 6 (item 200 @30), val row 7 (item 300 @30), test row 8 (item 400 @40).
    assert split.train.tolist() == [0, 1, 2, 5, 6]
    assert split.val.tolist() == [3, 7]
    assert split.test.tolist() == [4, 8]
    assert table.items.ids[table.item[split.test]].tolist() == [100, 400]
    assert table.items.ids[table.item[split.val]].tolist() == [300, 300]
    all_rows = np.sort(np.concatenate([split.train, split.val, split.test]))
    np.testing.assert_array_equal(all_rows, np.arange(len(table)))


def test_histories(table):
    hist = histories(table)
    assert [h.tolist() for h in hist] == [[1, 0], [3, 2, 0], [0, 1, 2, 3]]
    assert all(h.dtype == np.int32 for h in hist)
    split = leave_one_out(table)
    train = histories(table, split.train)
    assert [h.tolist() for h in train] == [[1, 0], [3], [0, 1]]
    # rows given in any order come back in time order
    assert [h.tolist() for h in histories(table, split.train[::-1])] == [[1, 0], [3], [0, 1]]
    assert [h.tolist() for h in histories(table, [])] == [[], [], []]


def test_preference_pairs_are_ordered_and_reproducible(table):
    pairs = preference_pairs(table, pairs_per_user=50, seed=3)
    assert len(pairs) == 150  # every user here has two different rating values
    assert np.all(pairs.rating_hi > pairs.rating_lo)
    assert np.all(pairs.item_hi != pairs.item_lo)
    # each side really is a rating of that user, with that value
    lookup = {(u, i): r for u, i, r in zip(table.user, table.item, table.rating, strict=True)}
    for k in range(len(pairs)):
        u = pairs.user[k]
        assert lookup[(u, pairs.item_hi[k])] == pairs.rating_hi[k]
        assert lookup[(u, pairs.item_lo[k])] == pairs.rating_lo[k]
    again = preference_pairs(table, pairs_per_user=50, seed=3)
    np.testing.assert_array_equal(again.item_hi, pairs.item_hi)
    np.testing.assert_array_equal(again.item_lo, pairs.item_lo)
    other = preference_pairs(table, pairs_per_user=50, seed=4)
    assert not np.array_equal(other.item_hi, pairs.item_hi)


def test_preference_pairs_skip_users_without_two_values(table):
    split = leave_one_out(table)
    # train rows: user 9 (1.0 and 3.0), user 12 (5.0 only), user 70 (5.0 and 2.0)
    pairs = preference_pairs(table, split.train, pairs_per_user=4, seed=0)
    assert pairs.user.tolist() == [0] * 4 + [2] * 4
    # user 9: item 100 (3.0) over item 200 (1.0); user 70: item 100 (5.0) over item 200 (2.0)
    assert set(zip(pairs.item_hi.tolist(), pairs.item_lo.tolist(), strict=True)) == {(0, 1)}
    assert len(preference_pairs(table, [])) == 0  # no rows: no pairs (not an IndexError)
    with pytest.raises(ValueError, match=r"rows must be a 1-D array.*shape \(1, 2\)"):
        preference_pairs(table, np.array([[0, 1]]))


def test_preference_pairs_are_uniform_over_differing_pairs():
    # one user, ratings 5,5,4,1,1,1: pairs with different values are 2*1 + 2*3 + 1*3 = 11
    rng = np.random.default_rng(0)
    stars = np.array([5, 5, 4, 1, 1, 1], np.float32)
    perm = rng.permutation(len(stars))
    table = make_ratings(np.zeros(6), perm, stars[perm], np.arange(6), _items(range(6)))
    draws = 44000
    pairs = preference_pairs(table, pairs_per_user=draws, seed=1)
    valid = {
        (i, j) if table.rating[a] > table.rating[b] else (j, i)
        for (a, i), (b, j) in itertools.combinations(enumerate(table.item.tolist()), 2)
        if table.rating[a] != table.rating[b]
    }
    assert len(valid) == 11
    drawn = np.stack([pairs.item_hi, pairs.item_lo], 1)
    keys, counts = np.unique(drawn, axis=0, return_counts=True)
    assert {tuple(k) for k in keys.tolist()} == valid
    # each of the 11 pairs expects 4000 draws, standard deviation ~60
    assert np.all(np.abs(counts - draws / 11) < 300), counts


def test_preference_pairs_argument_checks(table):
    with pytest.raises(ValueError, match="pairs_per_user"):
        preference_pairs(table, pairs_per_user=0)
    gen = np.random.default_rng(5)
    assert len(preference_pairs(table, pairs_per_user=1, seed=gen)) == 3


def test_k_core_drops_until_stable():
    # user 1 rates items 10, 20; user 2 rates 10, 20, 30; user 3 rates 10, 30. At 2/2 nothing
    # goes; at users >= 3: users 1 and 3 go, then items 10, 20 and 30 have 1 rating each
    # (< 2 at items >= 2), which leaves user 2 with none: the 3/2 core is empty.
    rows = [(1, 10), (1, 20), (2, 10), (2, 20), (2, 30), (3, 10), (3, 30)]
    u, i = map(np.array, zip(*rows, strict=True))
    t = make_ratings(u, i, np.ones(len(u)), np.arange(len(u)), _items([10, 20, 30]))
    assert k_core(t, 2, 2) is t
    assert len(k_core(t, 3, 2)) == 0
    # users >= 3 and items >= 1: only user 2 remains, re-indexed densely with its 3 items
    kept = k_core(t, 3, 1)
    assert kept.n_users == 1 and kept.user_ids.tolist() == [2]
    assert kept.items.ids.tolist() == [10, 20, 30] and kept.item.tolist() == [0, 1, 2]
    # items >= 3: only item 10 (3 ratings) stays; then every user has 1 rating, none has 2
    assert len(k_core(t, 2, 3)) == 0
    with pytest.raises(ValueError, match="min_user=-1"):
        k_core(t, -1, 0)


def test_k_core_of_ml_latest_small_is_llamarecs_split(shared_dir):
    """LlamaRec's "ML-100k": ml-latest-small at 5/5, repeated until stable."""
    from jaxrec.data import load_movielens

    raw = load_movielens("movielens-latest-small", data_dir=shared_dir / "data/movielens")
    core = k_core(raw, 5, 5)
    assert (core.n_users, core.n_items, len(core)) == (610, 3650, 90274)
    assert np.bincount(core.user).min() >= 5 and np.bincount(core.item).min() >= 5
    # the titles follow their items
    pos = np.searchsorted(raw.items.ids, core.items.ids)
    assert np.array_equal(raw.items.title[pos], core.items.title)

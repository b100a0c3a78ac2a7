"""The chronological leave-one-out protocol, on a hand-made table whose answers are worked out in
the comments, and on the real ml-100k files."""

import numpy as np
import pytest

from jaxrec.data import leave_one_out, load_movielens, make_ratings
from jaxrec.data.movielens import make_items
from jaxrec.eval import leave_one_out_protocol
from jaxrec.eval.metrics import candidate_scores, exclude_items, ranking_metrics, target_ranks


def _items(ids):
    """A catalogue of placeholder dramas with these MovieLens ids (sorted)."""
    return make_items({i: (f"Movie {i} (2000)", ("Drama",)) for i in ids})


# (user id, item id, timestamp), given out of order. Item ids 1..12 are all rated by someone,
# so dense item = id - 1; user ids 3, 5, 7, 9 -> dense users 0, 1, 2, 3.
ROWS = [
    (9, 1, 100),
    (5, 3, 30),
    (7, 6, 50),  # user 7: items 6 and 5 tie at t=50; the tie breaks by dense item index,
    (7, 5, 50),  #         5 (dense 4) first, so 6 is the target and 5 the validation item
    (3, 9, 2),  # user 3 has 2 ratings: not evaluated, both rows are fit rows
    (5, 1, 10),
    (9, 12, 3),
    (9, 11, 1),  # user 9: 11 and 10 tie at t=1 (10 first), mid-history
    (7, 8, 10),
    (5, 4, 40),
    (9, 10, 1),
    (3, 7, 1),
    (5, 2, 20),
    (9, 2, 7),
]
# user 5 in time order: 1, 2, 3, 4        -> target 4, val 3, fit 1, 2
# user 7 in time order: 8, 5, 6           -> target 6, val 5, fit 8
# user 9 in time order: 10, 11, 12, 2, 1  -> target 1, val 2, fit 10, 11, 12
N_ITEMS = 12
RATED = {1: {0, 1, 2, 3}, 2: {4, 5, 7}, 3: {0, 1, 9, 10, 11}}  # dense user -> dense items


def _table(rows=ROWS, catalogue=range(1, 13)):
    u, i, t = map(np.array, zip(*rows, strict=True))
    return make_ratings(u, i, np.full(len(u), 4.0), t, _items(list(catalogue)), source="hand")


@pytest.fixture(scope="module")
def table():
    return _table()


@pytest.fixture(scope="module")
def protocol(table):
    return leave_one_out_protocol(table, candidates=5, seed=0)


def test_the_table_is_as_the_comments_say(table):
    assert (len(table), table.n_users, table.n_items) == (14, 4, N_ITEMS)
    assert table.user_ids.tolist() == [3, 5, 7, 9]
    assert table.items.ids.tolist() == list(range(1, 13))


def test_users_and_targets(protocol):
    assert len(protocol) == 3
    assert protocol.users.tolist() == [1, 2, 3]  # user 3 (dense 0) has < 3 ratings
    assert protocol.users.dtype == np.int64
    assert protocol.targets.tolist() == [4 - 1, 6 - 1, 1 - 1]  # last item by time
    assert protocol.val_targets.tolist() == [3 - 1, 5 - 1, 2 - 1]  # second to last
    assert protocol.targets.dtype == np.int32 and protocol.val_targets.dtype == np.int32
    assert protocol.n_items == N_ITEMS


def test_histories_are_left_padded_and_end_with_the_validation_item(protocol):
    # everything but the test target, oldest first (dense ids), padded on the left to width 4
    assert protocol.histories.dtype == np.int32
    assert protocol.histories.tolist() == [
        [-1, 0, 1, 2],  # ids 1, 2, 3
        [-1, -1, 7, 4],  # ids 8, 5
        [9, 10, 11, 1],  # ids 10, 11, 12, 2
    ]
    np.testing.assert_array_equal(protocol.histories[:, -1], protocol.val_targets)
    for row in range(len(protocol)):
        assert protocol.targets[row] not in protocol.histories[row]


def test_fit_histories_drop_the_last_item(protocol):
    before = protocol.histories.copy()
    assert protocol.fit_histories().tolist() == [
        [-1, -1, 0, 1],
        [-1, -1, -1, 7],
        [-1, 9, 10, 11],
    ]
    np.testing.assert_array_equal(protocol.histories, before)  # not modified in place
    for row in range(len(protocol)):
        assert protocol.val_targets[row] not in protocol.fit_histories()[row]


def test_fit_rows_exclude_both_held_out_rows(table, protocol):
    fit = protocol.fit_rows
    assert fit.dtype == np.int64
    pairs = sorted(zip(table.user[fit].tolist(), table.item[fit].tolist(), strict=True))
    # (dense user, dense item): user 3 keeps both rows; the others lose target and val
    assert pairs == [(0, 6), (0, 8), (1, 0), (1, 1), (2, 7), (3, 9), (3, 10), (3, 11)]
    np.testing.assert_array_equal(fit, leave_one_out(table).train)
    held = set(range(len(table))) - set(fit.tolist())
    held_pairs = {(int(table.user[r]), int(table.item[r])) for r in held}
    expect = {(int(u), int(i)) for u, t, v in zip(protocol.users, protocol.targets,
                                                  protocol.val_targets, strict=True)
              for i in (t, v)}
    assert held_pairs == expect


def _check_candidates(protocol, c):
    cands = protocol.candidates
    assert cands.shape == (len(protocol), c) and cands.dtype == np.int32
    for row, (u, t) in enumerate(zip(protocol.users.tolist(), protocol.targets.tolist(),
                                     strict=True)):
        cs = cands[row].tolist()
        assert cs.count(t) == 1  # the target exactly once
        assert len(set(cs)) == c  # C distinct items
        assert all(0 <= i < N_ITEMS for i in cs)
        assert not (set(cs) - {t}) & RATED[u]  # no other item the user ever rated


@pytest.mark.parametrize("seed", range(20))
def test_candidates(table, seed):
    _check_candidates(leave_one_out_protocol(table, candidates=5, seed=seed), 5)


def test_candidates_are_reproducible_per_seed(table):
    a = leave_one_out_protocol(table, candidates=5, seed=3).candidates
    b = leave_one_out_protocol(table, candidates=5, seed=3).candidates
    c = leave_one_out_protocol(table, candidates=5, seed=4).candidates
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_candidates_are_uniform_over_unrated_items_and_positions(table):
    # user 9 (row 2) has 7 unrated items (dense 2..8); with C = 5 each is a negative with
    # probability 4/7, and the target's column is uniform over the 5 columns
    counts = np.zeros(N_ITEMS, int)
    positions = np.zeros(5, int)
    runs = 280
    for seed in range(runs):
        row = leave_one_out_protocol(table, candidates=5, seed=seed).candidates[2]
        counts[row] += 1
        positions[np.flatnonzero(row == 0)] += 1
    assert counts[0] == runs
    assert counts[[9, 10, 11, 1]].sum() == 0
    expect = runs * 4 / 7  # 160, sd ~ 8.3
    assert np.all(np.abs(counts[2:9] - expect) < 40), counts
    assert np.all(np.abs(positions - runs / 5) < 30), positions  # 56 each, sd ~ 6.7


def test_exactly_enough_unrated_items(table):
    # user 9 has 12 - 5 = 7 unrated items: C = 8 takes all of them
    p = leave_one_out_protocol(table, candidates=8, seed=0)
    _check_candidates(p, 8)
    assert sorted(p.candidates[2].tolist()) == [0, 2, 3, 4, 5, 6, 7, 8]


def test_too_few_unrated_items_is_an_error(table):
    with pytest.raises(ValueError, match="too few unrated items for 9 candidates"):
        leave_one_out_protocol(table, candidates=9)


def test_no_user_with_three_ratings_is_an_error():
    t = _table(rows=[(1, 1, 0), (1, 2, 1), (2, 1, 0)], catalogue=[1, 2])
    with pytest.raises(ValueError, match="no user has the 3 ratings"):
        leave_one_out_protocol(t)


def test_take_subsets_consistently(protocol):
    sub = protocol.take([2, 0])
    assert len(sub) == 2
    assert sub.users.tolist() == [3, 1]
    np.testing.assert_array_equal(sub.histories, protocol.histories[[2, 0]])
    np.testing.assert_array_equal(sub.targets, protocol.targets[[2, 0]])
    np.testing.assert_array_equal(sub.val_targets, protocol.val_targets[[2, 0]])
    np.testing.assert_array_equal(sub.candidates, protocol.candidates[[2, 0]])
    np.testing.assert_array_equal(sub.fit_histories(), protocol.fit_histories()[[2, 0]])
    np.testing.assert_array_equal(sub.fit_rows, protocol.fit_rows)  # unchanged
    assert sub.n_items == protocol.n_items
    mask = protocol.take(np.array([False, True, False]))
    assert mask.users.tolist() == [2] and mask.targets.tolist() == [5]
    assert len(protocol) == 3  # the original is untouched


def test_a_history_scorer_end_to_end(protocol):
    # a scorer that loves what the user already saw: excluded, so only the target and the
    # unrated items are ranked; it scores the target above the rest
    scores = np.zeros((len(protocol), N_ITEMS))
    for row in range(len(protocol)):
        scores[row, protocol.histories[row][protocol.histories[row] >= 0]] = 100.0
        scores[row, protocol.targets[row]] = 1.0
    masked = exclude_items(scores, protocol.histories)
    assert ranking_metrics(masked, protocol.targets)["hr@1"] == pytest.approx(1.0)
    sub = candidate_scores(masked, protocol.candidates)
    position = np.argmax(protocol.candidates == protocol.targets[:, None], axis=1)
    assert np.isfinite(sub).all()  # candidates never include a history item
    assert target_ranks(sub, position)[0].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Real files


@pytest.fixture(scope="module")
def ml100k(shared_dir):
    return load_movielens("movielens-100k", data_dir=shared_dir / "data" / "movielens")


def test_ml100k_protocol(ml100k):
    p = leave_one_out_protocol(ml100k)  # C = 20, seed 0
    assert len(p) == 943  # every ml-100k user has at least 20 ratings
    assert p.n_items == 1682
    assert p.candidates.shape == (943, 20)
    np.testing.assert_array_equal(p.users, np.arange(943))
    # every target is absent from its user's history row; histories end with the val target
    assert not np.any(p.histories == p.targets[:, None])
    np.testing.assert_array_equal(p.histories[:, -1], p.val_targets)
    # each history holds all the user's other ratings: lengths add up to the table
    assert int((p.histories >= 0).sum()) + len(p) == len(ml100k)
    assert len(p.fit_rows) == len(ml100k) - 2 * 943
    # candidates: the target once, 20 distinct, none from the history
    assert np.all((p.candidates == p.targets[:, None]).sum(axis=1) == 1)
    assert all(len(set(row)) == 20 for row in p.candidates.tolist())
    hist = p.histories
    assert not np.any((p.candidates[:, :, None] == hist[:, None, :]) & (hist[:, None, :] >= 0))
    # the protocol works with the metrics: random scores on the unrated items
    scores = np.random.default_rng(0).normal(size=(943, 1682))
    m = ranking_metrics(candidate_scores(exclude_items(scores, hist), p.candidates),
                        np.argmax(p.candidates == p.targets[:, None], axis=1))
    assert m["users"] == 943
    assert 0.0 < m["hr@10"] < 1.0

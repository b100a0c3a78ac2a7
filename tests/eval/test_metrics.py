"""Ranking and slate metrics against values worked out by hand in the comments."""

import math

import numpy as np
import pytest

from jaxrec.eval.metrics import (
    KS,
    NDCG_KS,
    candidate_scores,
    coverage,
    exclude_items,
    hit_rate,
    intra_list_diversity,
    mean_interval,
    ndcg,
    novelty,
    ranking_metrics,
    reciprocal_rank,
    target_ranks,
)


def _log2(x):
    return math.log2(x)


# ---------------------------------------------------------------------------------------------
# Ranks without ties

# 3 users over 8 items, all scores distinct within a row.
SCORES = np.array(
    [
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # target 0 is the best: rank 1
        [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # target 2: items 0 and 1 above it, rank 3
        [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # target 6: items 0..5 above it, rank 7
    ]
)
TARGETS = np.array([0, 2, 6])


def test_target_ranks_without_ties():
    better, tied = target_ranks(SCORES, TARGETS)
    assert better.tolist() == [0, 2, 6]
    assert tied.tolist() == [0, 0, 0]


def test_per_user_metrics_without_ties():
    better, tied = target_ranks(SCORES, TARGETS)
    # ranks 1, 3, 7
    np.testing.assert_allclose(hit_rate(better, tied, 1), [1, 0, 0])
    np.testing.assert_allclose(hit_rate(better, tied, 5), [1, 1, 0])
    np.testing.assert_allclose(hit_rate(better, tied, 7), [1, 1, 1])
    # NDCG@5: 1/log2(1+1) = 1, 1/log2(3+1) = 1/2, rank 7 > 5 -> 0
    np.testing.assert_allclose(ndcg(better, tied, 5), [1.0, 0.5, 0.0])
    # NDCG@10: rank 7 -> 1/log2(8) = 1/3
    np.testing.assert_allclose(ndcg(better, tied, 10), [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(reciprocal_rank(better, tied), [1.0, 1 / 3, 1 / 7])


def test_ranking_metrics_without_ties():
    m = ranking_metrics(SCORES, TARGETS)
    assert set(m) == {f"hr@{k}" for k in KS} | {f"ndcg@{k}" for k in NDCG_KS} | {"mrr", "users"}
    assert m["users"] == 3
    assert m["hr@1"] == pytest.approx(1 / 3)  # only user 0
    assert m["hr@5"] == pytest.approx(2 / 3)  # users 0 and 1
    assert m["hr@10"] == pytest.approx(1.0)
    assert m["hr@20"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5 + 0) / 3)  # = 0.5
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)  # = 11/18
    assert m["ndcg@20"] == pytest.approx(11 / 18)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 3)  # = 31/63
    assert m["mrr"] == pytest.approx(31 / 63)
    assert all(isinstance(v, float) for k, v in m.items() if k != "users")


def test_ranking_metrics_custom_cut_offs():
    m = ranking_metrics(SCORES, TARGETS, ks=(3,), ndcg_ks=(3,))
    assert set(m) == {"hr@3", "ndcg@3", "mrr", "users"}
    assert m["hr@3"] == pytest.approx(2 / 3)  # ranks 1 and 3
    assert m["ndcg@3"] == pytest.approx((1 + 0.5) / 3)


# ---------------------------------------------------------------------------------------------
# Ties: the exact expectation over a random tie-break


def test_hand_example_with_better_and_tied_items():
    # target 2 scores 3; item 0 is strictly above (g = 1), items 1 and 3 tie with it (t = 2):
    # its rank is uniform on {2, 3, 4}.
    scores = np.array([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    better, tied = target_ranks(scores, [2])
    assert (better.tolist(), tied.tolist()) == ([1], [2])
    assert hit_rate(better, tied, 1)[0] == pytest.approx(0.0)
    assert hit_rate(better, tied, 2)[0] == pytest.approx(1 / 3)  # rank 2 only
    assert hit_rate(better, tied, 3)[0] == pytest.approx(2 / 3)  # ranks 2, 3
    assert hit_rate(better, tied, 4)[0] == pytest.approx(1.0)
    assert hit_rate(better, tied, 5)[0] == pytest.approx(1.0)
    # NDCG@3: (1/log2 3 + 1/log2 4 + 0) / 3; NDCG@5: (1/log2 3 + 1/log2 4 + 1/log2 5) / 3
    assert ndcg(better, tied, 3)[0] == pytest.approx((1 / _log2(3) + 0.5) / 3)
    assert ndcg(better, tied, 5)[0] == pytest.approx((1 / _log2(3) + 0.5 + 1 / _log2(5)) / 3)
    # MRR: (1/2 + 1/3 + 1/4) / 3 = (13/12) / 3 = 13/36
    assert reciprocal_rank(better, tied)[0] == pytest.approx(13 / 36)
    m = ranking_metrics(scores, [2], ks=(1, 2, 3), ndcg_ks=(3, 5))
    assert (m["hr@1"], m["hr@2"], m["hr@3"]) == pytest.approx((0, 1 / 3, 2 / 3))
    assert m["mrr"] == pytest.approx(13 / 36)


@pytest.mark.parametrize("n", [1, 7, 10, 25])
def test_a_constant_scorer_gets_the_chance_level(n):
    # every item ties with the target: rank uniform on 1..N
    scores = np.zeros((4, n))
    targets = np.arange(4) % n
    better, tied = target_ranks(scores, targets)
    assert better.tolist() == [0] * 4 and tied.tolist() == [n - 1] * 4
    m = ranking_metrics(scores, targets)
    for k in KS:
        assert m[f"hr@{k}"] == pytest.approx(min(k, n) / n)  # HR@k = k/N (1 when k >= N)
    for k in NDCG_KS:  # (1/N) * sum_{r <= min(k, N)} 1/log2(r + 1)
        expect = sum(1 / _log2(r + 1) for r in range(1, min(k, n) + 1)) / n
        assert m[f"ndcg@{k}"] == pytest.approx(expect)
    harmonic = sum(1 / r for r in range(1, n + 1))
    assert m["mrr"] == pytest.approx(harmonic / n)  # H_N / N


def test_constant_scorer_ten_items_by_hand():
    m = ranking_metrics(np.full((1, 10), 0.3), [4])
    # HR@1 = 1/10, HR@5 = 5/10, HR@10 = HR@20 = 1
    assert (m["hr@1"], m["hr@5"], m["hr@10"], m["hr@20"]) == pytest.approx((0.1, 0.5, 1, 1))
    # H_10 = 7381/2520, MRR = H_10 / 10
    assert m["mrr"] == pytest.approx(7381 / 2520 / 10)
    # NDCG@5 = (1 + 1/log2 3 + 1/2 + 1/log2 5 + 1/log2 6) / 10
    assert m["ndcg@5"] == pytest.approx(
        (1 + 1 / _log2(3) + 0.5 + 1 / _log2(5) + 1 / _log2(6)) / 10)


def test_hit_rate_is_the_expectation_over_tie_breaks_by_enumeration():
    # brute force: every g, t up to small sizes against counting the ranks directly
    for g in range(6):
        for t in range(6):
            ranks = np.arange(g + 1, g + t + 2)
            b, ti = np.array([g]), np.array([t])
            for k in (1, 2, 3, 5, 8, 20):
                assert hit_rate(b, ti, k)[0] == pytest.approx(np.mean(ranks <= k))
                expect = np.mean(np.where(ranks <= k, 1 / np.log2(ranks + 1.0), 0.0))
                assert ndcg(b, ti, k)[0] == pytest.approx(expect)
            assert reciprocal_rank(b, ti)[0] == pytest.approx(np.mean(1 / ranks))


# ---------------------------------------------------------------------------------------------
# Excluded items


def test_exclude_items_sets_history_to_minus_inf_on_a_copy():
    scores = np.arange(12, dtype=np.float32).reshape(2, 6)
    hist = np.array([[-1, 5, 1], [0, 0, 3]])  # -1 is padding; a repeated item is harmless
    out = exclude_items(scores, hist)
    assert out.dtype == np.float64
    expect = scores.astype(np.float64)
    expect[0, [5, 1]] = -np.inf
    expect[1, [0, 3]] = -np.inf
    np.testing.assert_array_equal(out, expect)
    # the input is untouched
    np.testing.assert_array_equal(scores, np.arange(12, dtype=np.float32).reshape(2, 6))


def test_an_excluded_history_item_never_pushes_the_target_down():
    # user 0: item 3 is in the history and scored far above everything; target 1 is second
    # best among the rest, behind item 0 only.
    # user 1: history item 1 ties with the target 2 at the top score 7.
    scores = np.array([[0.9, 0.5, 0.1, 1e9, 0.2], [0.0, 7.0, 7.0, 0.0, 0.0]])
    targets = np.array([1, 2])
    better, tied = target_ranks(scores, targets)  # unexcluded: item 3 and item 1 count
    assert (better.tolist(), tied.tolist()) == ([2, 0], [0, 1])
    hist = np.array([[3, -1], [1, -1]])
    masked = exclude_items(scores, hist)
    better, tied = target_ranks(masked, targets)
    assert better.tolist() == [1, 0]
    assert tied.tolist() == [0, 0]
    m = ranking_metrics(masked, targets, ks=(1, 2), ndcg_ks=(2,))
    assert m["hr@1"] == pytest.approx(0.5)  # user 0 at rank 2, user 1 at rank 1
    assert m["hr@2"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)


def test_excluded_items_do_not_tie_with_each_other_or_the_target():
    # a constant scorer on 6 items with 3 history items excluded: chance level over the other 3
    scores = exclude_items(np.zeros((1, 6)), np.array([[0, 2, 4]]))
    better, tied = target_ranks(scores, [5])
    assert (better.tolist(), tied.tolist()) == ([0], [2])  # items 1, 3 tie; -inf never counts
    assert ranking_metrics(scores, [5])["hr@1"] == pytest.approx(1 / 3)


def test_an_excluded_target_is_an_error_naming_the_user_row():
    scores = np.zeros((3, 4))
    masked = exclude_items(scores, np.array([[-1], [-1], [2]]))
    with pytest.raises(ValueError, match=r"user row 2\b.*held-out item 2"):
        target_ranks(masked, [0, 1, 2])
    with pytest.raises(ValueError, match=r"user row 2\b"):
        ranking_metrics(masked, [0, 1, 2])


@pytest.mark.parametrize("bad", [-np.inf, np.inf, np.nan])
def test_a_non_finite_target_score_is_an_error(bad):
    scores = np.zeros((3, 4))
    scores[1, 3] = bad
    with pytest.raises(ValueError, match=r"user row 1\b"):
        target_ranks(scores, [0, 3, 0])
    # elsewhere in the row it is fine
    better, tied = target_ranks(scores, [0, 0, 0])
    assert tied.tolist()[0] == 3


@pytest.mark.parametrize(
    "scores, targets",
    [
        (np.zeros(5), np.zeros(1, int)),  # scores not [U, N]
        (np.zeros((2, 3, 4)), np.zeros(2, int)),
        (np.zeros((2, 5)), np.zeros(3, int)),  # one target per user
        (np.zeros((2, 5)), np.zeros((2, 1), int)),
    ],
)
def test_shape_errors(scores, targets):
    with pytest.raises(ValueError, match="scores must be"):
        target_ranks(scores, targets)
    with pytest.raises(ValueError, match="scores must be"):
        ranking_metrics(scores, targets)


# ---------------------------------------------------------------------------------------------
# Candidates


def test_candidate_scores_picks_each_users_columns():
    scores = np.array([[0.0, 10.0, 20.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0, 9.0]])
    cands = np.array([[3, 0, 4], [1, 1, 0]], np.int32)
    out = candidate_scores(scores, cands)
    np.testing.assert_array_equal(out, [[30.0, 0.0, 40.0], [6.0, 6.0, 5.0]])


def test_candidate_protocol_ranks_among_the_candidates_only():
    # 8 items; the candidates of user 0 are items 6, 2, 5 (target 2): among them the target is
    # beaten by item 6 only, though items 0, 1, 3 score higher over the full catalogue
    scores = np.array([[9.0, 8.0, 4.0, 7.0, 0.0, 1.0, 5.0, 2.0]])
    cands = np.array([[6, 2, 5]])
    sub = candidate_scores(scores, cands)
    position = np.flatnonzero(cands[0] == 2)  # the target's column among candidates
    better, tied = target_ranks(sub, position)
    assert (better.tolist(), tied.tolist()) == ([1], [0])
    assert ranking_metrics(sub, position)["mrr"] == pytest.approx(0.5)
    assert target_ranks(scores, [2])[0].tolist() == [4]  # full ranking: rank 5


# ---------------------------------------------------------------------------------------------
# Slates


def test_coverage():
    slates = np.array([[0, 1], [1, -1], [3, 0]])
    assert coverage(slates, 8) == pytest.approx(3 / 8)  # items 0, 1, 3
    assert coverage(slates[None], 4) == pytest.approx(3 / 4)  # any leading shape
    assert coverage(np.full((2, 3), -1), 5) == 0.0


def test_intra_list_diversity_by_hand():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    # 0 and 1 orthogonal: distance 1; 0 and 2 same direction (different norms): distance 0;
    # 0 and 3: cos = 1/sqrt2, distance 1 - 1/sqrt2
    assert intra_list_diversity(np.array([[0, 1]]), features) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[0, 2]]), features) == pytest.approx(0.0, abs=1e-12)
    assert intra_list_diversity(np.array([[0, 3]]), features) == pytest.approx(
        1 - 1 / math.sqrt(2))
    # slate [0, 1, 2]: pairs (0,1) = 1, (0,2) = 0, (1,2) = 1: mean 2/3
    assert intra_list_diversity(np.array([[0, 1, 2]]), features) == pytest.approx(2 / 3)
    # several slates: the mean of the slates' values; slates with < 2 items are skipped
    slates = np.array([[0, 1, 2], [0, 2, -1], [3, -1, -1], [-1, -1, -1]])
    assert intra_list_diversity(slates, features) == pytest.approx((2 / 3 + 0) / 2)
    # identical items: distance 0
    assert intra_list_diversity(np.array([[1, 1]]), features) == pytest.approx(0.0, abs=1e-12)


def test_intra_list_diversity_with_only_short_slates_is_nan():
    features = np.eye(3)
    assert math.isnan(intra_list_diversity(np.array([[0, -1], [-1, -1]]), features))


def test_novelty_by_hand():
    popularity = np.array([4, 2, 1, 1])  # sum 8: p = 1/2, 1/4, 1/8, 1/8
    slates = np.array([[0, 1], [2, -1]])
    # -log2 p: item 0 -> 1, item 1 -> 2, item 2 -> 3; mean (1 + 2 + 3) / 3 = 2
    assert novelty(slates, popularity) == pytest.approx(2.0)
    # repeated recommendations count each time: (1 + 1 + 3) / 3
    assert novelty(np.array([[0, 0, 3]]), popularity) == pytest.approx(5 / 3)


def test_novelty_of_an_unseen_item_is_finite():
    # counts [7, 0, 0]: the unseen items count as 1/2 a view, so pop = [7, .5, .5], sum 8;
    # item 1: -log2(0.5 / 8) = 4; item 0: -log2(7 / 8)
    popularity = np.array([7, 0, 0])
    assert novelty(np.array([[1]]), popularity) == pytest.approx(4.0)
    assert novelty(np.array([[0, 1]]), popularity) == pytest.approx((-_log2(7 / 8) + 4) / 2)


def test_novelty_of_empty_slates_is_nan():
    assert math.isnan(novelty(np.full((2, 2), -1), np.ones(3)))


# ---------------------------------------------------------------------------------------------
# Confidence intervals


def test_mean_interval_three_runs():
    out = mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd (ddof 1) = 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3)
    half = 4.302652729749462 / math.sqrt(3)
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(2.0)
    assert out["low"] == pytest.approx(2.0 - half, rel=1e-9)
    assert out["high"] == pytest.approx(2.0 + half, rel=1e-9)


@pytest.mark.parametrize("n, confidence", [(2, 0.95), (3, 0.95), (5, 0.9), (10, 0.99),
                                           (31, 0.95), (4, 0.5)])
def test_mean_interval_matches_the_student_t_quantile(n, confidence):
    values = np.random.default_rng(n).normal(0.3, 0.05, n)
    sd, mean = values.std(ddof=1), values.mean()
    try:
        from scipy import stats
    except ImportError:
        known = {(2, 0.95): 12.706204736174694, (3, 0.95): 4.302652729749462,
                 (5, 0.9): 2.1318467863266495, (10, 0.99): 3.249835541592126,
                 (31, 0.95): 2.0422724563012378, (4, 0.5): 0.7648923284043444}
        q = known[(n, confidence)]
        rel = 1e-8
    else:
        q = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        rel = 1e-9
    out = mean_interval(values, confidence)
    half = q * sd / math.sqrt(n)
    assert out["mean"] == pytest.approx(mean)
    assert out["high"] - out["mean"] == pytest.approx(half, rel=rel)
    assert out["mean"] - out["low"] == pytest.approx(half, rel=rel)
    assert out["n"] == n


def test_mean_interval_of_one_run_has_zero_width():
    out = mean_interval([0.42])
    assert out == {"mean": pytest.approx(0.42), "low": pytest.approx(0.42),
                   "high": pytest.approx(0.42), "n": 1}
    assert out["low"] == out["high"] == out["mean"]


def test_mean_interval_of_equal_runs_has_zero_width():
    out = mean_interval([0.5, 0.5, 0.5, 0.5])
    assert out["low"] == pytest.approx(0.5) and out["high"] == pytest.approx(0.5)


def test_a_target_outside_the_scored_items_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match="user row 1: target item -1 is outside the 3"):
        target_ranks(np.zeros((2, 3)), np.array([0, -1]))
    with pytest.raises(ValueError, match="user row 0: target item 3"):
        target_ranks(np.zeros((2, 3)), np.array([3, 0]))

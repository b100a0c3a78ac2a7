"""Ranking and slate metrics, as functions of numpy arrays (host side, exact).

Shapes: U users, N catalogue items, C candidates per user, K slate size.

Ranks treat ties fairly: a held-out item whose score equals that of t other items, with g items
scored strictly higher, is equally likely to sit at any rank g+1 .. g+1+t (random tie-breaking),
and every metric is the exact expectation over that uniform draw. A constant scorer therefore
gets the chance level (HR@K = K/N), not a lucky rank 1 or an unlucky rank N.
"""

from __future__ import annotations

import math

import numpy as np

KS = (1, 5, 10, 20)  # cut-offs of HR@K
NDCG_KS = (5, 10, 20)  # cut-offs of NDCG@K


def target_ranks(
    scores: np.ndarray,  # [U, N] float, higher is better; -inf where excluded
    targets: np.ndarray,  # [U] int, the held-out item of each user
) -> tuple[np.ndarray, np.ndarray]:
    """(better [U], tied [U]): items scored strictly above the target, and other items scored
    exactly as it. Excluded items (score -inf) never count; the target must not be excluded."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets, np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [U, N] and targets [U]; got {scores.shape} and "
                         f"{targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        bad = int(np.flatnonzero((targets < 0) | (targets >= scores.shape[1]))[0])
        raise ValueError(f"user row {bad}: target item {targets[bad]} is outside the "
                         f"{scores.shape[1]} scored items")
    own = scores[np.arange(len(targets)), targets]  # [U]
    if not np.all(np.isfinite(own)):
        bad = int(np.flatnonzero(~np.isfinite(own))[0])
        raise ValueError(f"user row {bad}: the held-out item {targets[bad]} has score "
                         f"{own[bad]} (excluded or not finite)")
    better = np.sum(scores > own[:, None], axis=1)
    tied = np.sum(scores == own[:, None], axis=1) - 1  # the target itself does not count
    return better, tied


def _expected(better: np.ndarray, tied: np.ndarray, f) -> np.ndarray:
    """E[f(rank)] with rank uniform on better+1 .. better+1+tied, per user: [U]."""
    out = np.empty(len(better), np.float64)
    for u, (g, t) in enumerate(zip(better.tolist(), tied.tolist(), strict=True)):
        ranks = np.arange(g + 1, g + t + 2, dtype=np.float64)
        out[u] = f(ranks).mean()
    return out


def hit_rate(better: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """[U] P(rank <= k): (k - better) / (tied + 1), clipped to [0, 1]."""
    return np.clip((k - better) / (tied + 1.0), 0.0, 1.0)


def ndcg(better: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """[U] E[1 / log2(rank + 1)] over ranks <= k (one relevant item, so IDCG = 1)."""
    return _expected(better, tied, lambda r: np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0))


def reciprocal_rank(better: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """[U] E[1 / rank]."""
    return _expected(better, tied, lambda r: 1.0 / r)


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, ks=KS, ndcg_ks=NDCG_KS) -> dict:
    """Mean HR@k, NDCG@k and MRR over users, with lower-case keys ('hr@10', 'ndcg@10', 'mrr')."""
    better, tied = target_ranks(scores, targets)
    out = {f"hr@{k}": float(hit_rate(better, tied, k).mean()) for k in ks}
    out.update({f"ndcg@{k}": float(ndcg(better, tied, k).mean()) for k in ndcg_ks})
    out["mrr"] = float(reciprocal_rank(better, tied).mean())
    out["users"] = int(len(better))
    return out


def exclude_items(scores: np.ndarray, histories: np.ndarray) -> np.ndarray:
    """scores [U, N] with every item of histories [U, H] (-1 padded) set to -inf (a copy)."""
    scores = np.array(scores, np.float64)
    rows, cols = np.nonzero(histories >= 0)
    scores[rows, histories[rows, cols]] = -np.inf
    return scores


def candidate_scores(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[U, N] full scores -> [U, C] the scores of each user's candidates."""
    return np.take_along_axis(np.asarray(scores), np.asarray(candidates, np.int64), axis=1)


# ---------------------------------------------------------------------------------------------
# Slates


def coverage(slates: np.ndarray, n_items: int) -> float:
    """Fraction of the catalogue recommended at least once; slates [..., K], -1 ignored."""
    items = np.asarray(slates).ravel()
    return float(np.unique(items[items >= 0]).size / n_items)


def intra_list_diversity(slates: np.ndarray, features: np.ndarray) -> float:
    """Mean over slates of the mean pairwise cosine distance between the slate's items.

    slates [S, K] (-1 where absent; slates with fewer than 2 items are skipped), features
    [N, F]: item embeddings (topics, genres).
    """
    slates = np.asarray(slates)
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    total, count = 0.0, 0
    for slate in slates.reshape(-1, slates.shape[-1]):
        items = slate[slate >= 0]
        if items.size < 2:
            continue
        sim = f[items] @ f[items].T  # [k, k]
        k = items.size
        total += float((k * (k - 1) - (sim.sum() - np.trace(sim))) / (k * (k - 1)))
        count += 1
    return total / count if count else math.nan


def novelty(slates: np.ndarray, popularity: np.ndarray) -> float:
    """Mean self-information -log2 p(item) of recommended items, p = popularity / its sum.

    popularity [N] counts (e.g. training interactions); an unseen item counts as 1/2 a view,
    so its novelty is finite.
    """
    items = np.asarray(slates).ravel()
    items = items[items >= 0]
    if items.size == 0:
        return math.nan
    pop = np.maximum(np.asarray(popularity, np.float64), 0.5)
    return float(np.mean(-np.log2(pop[items] / pop.sum())))


def mean_interval(values, confidence: float = 0.95) -> dict:
    """{'mean', 'low', 'high', 'n'}: Student-t interval of the mean of a few runs (seeds)."""
    x = np.asarray(values, np.float64)
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": int(n)}
    half = _t_quantile(0.5 + confidence / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(n)}


def _t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by bisection on the regularised incomplete beta (no scipy)."""
    def cdf(t):  # P(T <= t), t >= 0
        x = dof / (dof + t * t)
        return 1.0 - 0.5 * _betainc(dof / 2.0, 0.5, x)

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2.0


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a

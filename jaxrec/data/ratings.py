"""One ratings table for every reader, and what training needs from it: the chronological
leave-one-out split, per-user histories and preference pairs.

Host-side only (numpy and the standard library); jax is never imported.

`Ratings` holds one row per rating with dense 0-based int32 user and item indices, and the
original ids to map back. Dense indices are ranks of the sorted original ids, and rows are kept
in one canonical order, (user, timestamp, item, rating). So two readers of the same data (raw
files or tensorflow-datasets, which shuffles) give equal tables, and everything derived from a
table (splits, histories, pairs) is the same whatever order the rows were read in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Items:
    """Item texts, aligned to the dense item index (row i describes item i)."""

    ids: np.ndarray  # [I] int64 original item ids (MovieLens movieId)
    title: np.ndarray  # [I] str full title as listed, surrounding whitespace removed
    clean_title: np.ndarray  # [I] str title without its "(year)"
    year: np.ndarray  # [I] int32 release year from the title, -1 where it has none
    genres: np.ndarray  # [I, G] bool genre flags, columns named by genre_names
    genre_names: tuple[str, ...]  # [G]

    def __post_init__(self):
        n = len(self.ids)
        for name in ("title", "clean_title", "year"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Items.{name} has {len(getattr(self, name))} rows, ids has {n}")
        if self.genres.shape != (n, len(self.genre_names)):
            raise ValueError(
                f"Items.genres has shape {self.genres.shape}, expected {(n, len(self.genre_names))}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def genres_of(self, i: int) -> tuple[str, ...]:
        """The genre names of item i, in genre_names order."""
        return tuple(g for g, on in zip(self.genre_names, self.genres[i], strict=True) if on)

    def index_of(self, ids) -> np.ndarray:
        """Dense indices of original item ids ([K] int32; ValueError naming absent ones)."""
        return _positions(self.ids, ids, "item").astype(np.int32)

    def take(self, index: np.ndarray) -> Items:
        """The items at dense indices `index`, in that order."""
        return dataclasses.replace(
            self,
            ids=self.ids[index],
            title=self.title[index],
            clean_title=self.clean_title[index],
            year=self.year[index],
            genres=self.genres[index],
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Users:
    """User demographics where the data set has them (MovieLens 100k and 1m)."""

    ids: np.ndarray  # [U] int64 original user ids
    gender: np.ndarray  # [U] str "M" or "F"
    age: np.ndarray  # [U] int32 age in years (100k) or the age-group code (1m: 1, 18, 25, ...)
    occupation: np.ndarray  # [U] str occupation as the data set names it
    zip_code: np.ndarray  # [U] str

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> Users:
        """The users at `index`, in that order."""
        return Users(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _positions(table: np.ndarray, query, what: str) -> np.ndarray:
    """Positions of `query` ids in the id array `table` (any order, unique ids)."""
    query = np.asarray(query, np.int64).reshape(-1)
    if len(table) == 0:
        pos, missing = np.zeros(len(query), np.int64), query
    else:
        order = np.argsort(table, kind="stable")
        pos = order[np.searchsorted(table[order], query).clip(0, len(table) - 1)]
        missing = query[table[pos] != query]
    if len(missing):
        example = missing[:5].tolist()
        raise ValueError(f"{len(missing)} {what} ids are not in the table, e.g. {example}")
    return pos


@dataclasses.dataclass(frozen=True, eq=False)
class Ratings:
    """Ratings as parallel numpy arrays, one row per rating, in (user, timestamp, item, rating)
    order. Build one with `make_ratings`, which fixes the indices and the order."""

    user: np.ndarray  # [N] int32 dense user index in [0, n_users)
    item: np.ndarray  # [N] int32 dense item index in [0, n_items)
    rating: np.ndarray  # [N] float32 stars
    timestamp: np.ndarray  # [N] int64 seconds since the Unix epoch
    user_ids: np.ndarray  # [U] int64 original user id of each dense user index
    items: Items  # [I] texts of the rated items; items.ids maps dense item -> original id
    users: Users | None = None  # [U] demographics, where the data set has them
    source: str = ""  # e.g. "movielens-100k"
    skipped: int = 0  # malformed rows skipped (lenient reading only)
    skipped_notes: tuple[str, ...] = ()  # the first few skip reasons, "file, line n: why"

    def __post_init__(self):
        n = len(self.user)
        for name in ("item", "rating", "timestamp"):
            if (got := len(getattr(self, name))) != n:
                raise ValueError(f"Ratings.{name} has {got} rows, Ratings.user has {n}")
        if self.users is not None and len(self.users) != len(self.user_ids):
            raise ValueError(f"Ratings.users has {len(self.users)} rows for {self.n_users} users")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        skipped = f", skipped={self.skipped}" if self.skipped else ""
        return (
            f"Ratings(source={self.source!r}, rows={len(self)}, users={self.n_users}, "
            f"items={self.n_items}{skipped})"
        )


def make_ratings(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    items: Items,
    users: Users | None = None,
    *,
    source: str = "",
    skipped: int = 0,
    skipped_notes: Sequence[str] = (),
) -> Ratings:
    """A `Ratings` table from rows given by original ids.

    Args:
      user_ids, item_ids: [N] integer original ids of each row.
      rating: [N] stars; timestamp: [N] integer seconds.
      items: texts of at least every rated item, in any order (matched on `items.ids`); only
        the rated ones are kept, in dense-index order.
      users: demographics of at least every rating user, matched on `users.ids`, or None.

    Dense indices are ranks among the distinct original ids that occur in the rows; rows are
    sorted by (user, timestamp, item, rating). A rated id missing from `items` or `users` is a
    ValueError.
    """
    rating = np.asarray(rating, np.float32)
    timestamp = np.asarray(timestamp, np.int64)
    lengths = {len(user_ids), len(item_ids), len(rating), len(timestamp)}
    if len(lengths) != 1:
        raise ValueError(f"user_ids, item_ids, rating and timestamp differ in length: {lengths}")
    uniq_users, user = np.unique(np.asarray(user_ids, np.int64), return_inverse=True)
    uniq_items, item = np.unique(np.asarray(item_ids, np.int64), return_inverse=True)
    items = items.take(_positions(items.ids, uniq_items, "rated item"))
    if users is not None:
        users = users.take(_positions(users.ids, uniq_users, "rating user"))
    order = np.lexsort((rating, item, timestamp, user))
    return Ratings(
        user=user.astype(np.int32)[order],
        item=item.astype(np.int32)[order],
        rating=rating[order],
        timestamp=timestamp[order],
        user_ids=uniq_users,
        items=items,
        users=users,
        source=source,
        skipped=int(skipped),
        skipped_notes=tuple(skipped_notes),
    )


def k_core(ratings: Ratings, min_user: int, min_item: int) -> Ratings:
    """The rows whose user has >= `min_user` and whose item has >= `min_item` ratings, dropping
    both repeatedly until stable (the "k-core" filter of sequential-recommendation papers;
    LlamaRec's ML-100k is ml-latest-small at 5/5). Users and items are re-indexed densely in
    the order of their original ids, so the result is a table like any other; 0/0 is no-op.
    """
    if min_user < 0 or min_item < 0:
        raise ValueError(f"k_core: min_user={min_user} and min_item={min_item} must be >= 0")
    keep = np.ones(len(ratings), bool)
    while True:
        users = np.bincount(ratings.user[keep], minlength=ratings.n_users)  # [U]
        items = np.bincount(ratings.item[keep], minlength=ratings.n_items)  # [I]
        drop = keep & ((users[ratings.user] < min_user) | (items[ratings.item] < min_item))
        if not drop.any():
            break
        keep &= ~drop
    if keep.all():
        return ratings
    rows = np.flatnonzero(keep)
    return make_ratings(
        ratings.user_ids[ratings.user[rows]], ratings.items.ids[ratings.item[rows]],
        ratings.rating[rows], ratings.timestamp[rows], ratings.items, ratings.users,
        source=ratings.source, skipped=ratings.skipped, skipped_notes=ratings.skipped_notes)


# ---------------------------------------------------------------------------------------------
# Chronological leave-one-out split and histories


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Row indices into a `Ratings` table, each in (user, time) order."""

    train: np.ndarray  # [N_train] int64
    val: np.ndarray  # [N_val] int64, at most one row per user
    test: np.ndarray  # [N_test] int64, at most one row per user


def _time_order(ratings: Ratings, rows: np.ndarray) -> np.ndarray:
    """`rows` sorted by (user, timestamp), ties kept in row order (stable)."""
    return rows[np.lexsort((rows, ratings.timestamp[rows], ratings.user[rows]))]


def leave_one_out(ratings: Ratings) -> Split:
    """Chronological leave-one-out: per user, in time order, the last rating is test, the one
    before it validation, the rest train.

    Ties in timestamp keep the table's row order, which `Ratings` fixes as (user, timestamp,
    item, rating), so a tie breaks by dense item index, the same for every reader. Users with
    fewer than 3 ratings put them all in train: a validation or test row needs at least one
    earlier rating to predict from.
    """
    rows = _time_order(ratings, np.arange(len(ratings), dtype=np.int64))
    user = ratings.user[rows]
    counts = np.bincount(user, minlength=ratings.n_users)  # [U]
    ends = np.cumsum(counts)  # [U] one past each user's last row (in `rows`)
    held = ends[counts >= 3]
    test_pos, val_pos = held - 1, held - 2
    train = np.ones(len(rows), bool)
    train[test_pos] = False
    train[val_pos] = False
    return Split(train=rows[train], val=rows[val_pos], test=rows[test_pos])


def histories(ratings: Ratings, rows: np.ndarray | None = None) -> list[np.ndarray]:
    """Per user, the dense item indices of `rows` (default: every row) in time order.

    Returns a list of n_users int32 arrays (empty for users with no rows); ties in timestamp
    are ordered as in `leave_one_out`.
    """
    rows = np.arange(len(ratings), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    rows = _time_order(ratings, rows)
    counts = np.bincount(ratings.user[rows], minlength=ratings.n_users)  # [U]
    if ratings.n_users == 0:
        return []
    return np.split(ratings.item[rows], np.cumsum(counts)[:-1])


# ---------------------------------------------------------------------------------------------
# Preference pairs for reward-model training


@dataclasses.dataclass(frozen=True, eq=False)
class PreferencePairs:
    """Pairs of one user's ratings where the user rated `item_hi` above `item_lo`."""

    user: np.ndarray  # [P] int32 dense user index
    item_hi: np.ndarray  # [P] int32 the preferred item
    item_lo: np.ndarray  # [P] int32
    rating_hi: np.ndarray  # [P] float32, > rating_lo
    rating_lo: np.ndarray  # [P] float32

    def __len__(self) -> int:
        return len(self.user)


def preference_pairs(
    ratings: Ratings,
    rows: np.ndarray | None = None,
    *,
    pairs_per_user: int = 16,
    seed: int | np.random.Generator = 0,
) -> PreferencePairs:
    """Sample (preferred, other) item pairs from each user's ratings, for Bradley-Terry training.

    Sampling: among `rows` (default every row; pass `split.train` to keep held-out ratings out),
    each user with at least two different rating values gets `pairs_per_user` pairs, drawn
    independently (with replacement) and each uniform over that user's unordered pairs of
    ratings with different values. A draw picks a first rating with probability proportional
    to the number of the user's ratings that differ from it, then a second uniformly among
    those; every ordered pair then has probability 1 / (number of ordered pairs), so unordered
    pairs are uniform. The pair is oriented so `rating_hi > rating_lo`. Users with one distinct
    value (or one rating) give none. Pairs come grouped by user, in user order; shuffle them
    for training. The same seed gives the same pairs.
    """
    if pairs_per_user < 1:
        raise ValueError(f"pairs_per_user must be >= 1, got {pairs_per_user}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rows = np.arange(len(ratings), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    if rows.ndim != 1:
        raise ValueError(f"preference_pairs: rows must be a 1-D array of rating indices, got "
                         f"shape {rows.shape}")
    rows = rows[np.lexsort((rows, ratings.rating[rows], ratings.user[rows]))]
    u, r = ratings.user[rows], ratings.rating[rows]  # [R], sorted by (user, rating)
    n_users = ratings.n_users
    count = np.bincount(u, minlength=n_users)  # [U] ratings per user
    seg_start = np.cumsum(count) - count  # [U] first position of each user
    # blocks of equal (user, rating): every position's block start and size
    new_block = np.ones(len(rows), bool)
    new_block[1:] = (u[1:] != u[:-1]) | (r[1:] != r[:-1])
    block_id = np.cumsum(new_block) - 1
    block_start = np.flatnonzero(new_block)  # [B]
    block_size = np.diff(np.append(block_start, len(rows)))  # [B]
    same = block_size[block_id]  # [R] ratings of this user with this value
    weight = count[u] - same  # [R] ratings of this user with another value
    cum = np.cumsum(weight)  # [R] inclusive
    total = np.bincount(u, weights=weight, minlength=n_users).astype(np.int64)  # [U]
    users = np.repeat(np.flatnonzero(total > 0), pairs_per_user)  # [P]
    before = np.concatenate([[0], cum])[seg_start]  # [U] weight before each segment
    # first rating: proportional to weight within the user's segment
    t1 = rng.integers(0, total[users])
    first = np.searchsorted(cum, before[users] + t1, side="right")  # [P]
    # second rating: uniform over the user's ratings outside the first one's block
    t2 = rng.integers(0, weight[first])
    local_block = block_start[block_id[first]] - seg_start[users]
    second = seg_start[users] + np.where(t2 < local_block, t2, t2 + same[first])  # [P]
    a, b = rows[first], rows[second]
    a_high = ratings.rating[a] > ratings.rating[b]
    hi, lo = np.where(a_high, a, b), np.where(a_high, b, a)
    return PreferencePairs(
        user=users.astype(np.int32),
        item_hi=ratings.item[hi],
        item_lo=ratings.item[lo],
        rating_hi=ratings.rating[hi],
        rating_lo=ratings.rating[lo],
    )

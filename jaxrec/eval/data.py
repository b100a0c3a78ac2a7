"""The offline protocol: chronological leave-one-out on a `Ratings` table (host side, numpy).

Per user with at least 3 ratings, in time order: the last item is the test target, the one
before it the validation target; models fit on the rest (`fit_rows`). At test time the history
is everything but the last item (fit rows plus the validation item), and items in the history
are never ranked. The candidate protocol adds C - 1 negatives per user, drawn uniformly (with a
fixed seed, so every model sees the same lists) from the items the user never rated.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data import Ratings, histories, leave_one_out


@dataclasses.dataclass(frozen=True, eq=False)
class LeaveOneOut:
    users: np.ndarray  # [U] int64 dense user index of each evaluated user
    histories: np.ndarray  # [U, H] int32 items before the test target, oldest first; -1 on the
    #                        left where a user has fewer than H
    targets: np.ndarray  # [U] int32 the test item (each user's last)
    val_targets: np.ndarray  # [U] int32 the validation item (each user's second to last)
    candidates: np.ndarray  # [U, C] int32 the test item and C - 1 unrated items, shuffled
    fit_rows: np.ndarray  # [R] int64 rows of the Ratings table models may fit on
    n_items: int  # N catalogue items

    def __len__(self) -> int:
        return len(self.users)

    def fit_histories(self) -> np.ndarray:
        """[U, H] the histories without their last item (what predicts `val_targets`)."""
        h = np.roll(self.histories, 1, axis=1)
        h[:, 0] = -1
        return h

    def take(self, index) -> LeaveOneOut:
        """The same protocol for a subset of its users (fit rows unchanged)."""
        index = np.asarray(index)
        return dataclasses.replace(
            self, users=self.users[index], histories=self.histories[index],
            targets=self.targets[index], val_targets=self.val_targets[index],
            candidates=self.candidates[index])


def _left_padded(seqs: list[np.ndarray]) -> np.ndarray:
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), -1, np.int32)
    for row, s in enumerate(seqs):
        if len(s):
            out[row, width - len(s):] = s
    return out


def _candidates(ratings: Ratings, users, targets, n: int, seed: int) -> np.ndarray:
    """[U, n] the target plus n - 1 distinct items the user never rated, shuffled."""
    rng = np.random.default_rng(seed)
    rated = histories(ratings)  # every rating, per user
    out = np.empty((len(users), n), np.int32)
    for row, (u, t) in enumerate(zip(users, targets, strict=True)):
        seen = np.unique(rated[u])
        if ratings.n_items - len(seen) < n - 1:
            raise ValueError(f"user {u} has rated {len(seen)} of {ratings.n_items} items: too "
                             f"few unrated items for {n} candidates")
        picks: list[int] = []
        while len(picks) < n - 1:  # rejection sampling: users rate a small part of a catalogue
            draw = rng.integers(0, ratings.n_items, 2 * n)
            fresh = draw[~np.isin(draw, seen)]
            picks = list(dict.fromkeys(picks + fresh.tolist()))[: n - 1]
        out[row] = rng.permutation(np.asarray([t, *picks]))
    return out


def leave_one_out_protocol(ratings: Ratings, candidates: int = 20, seed: int = 0) -> LeaveOneOut:
    """The protocol above; `candidates` = C (the held-out item plus C - 1 negatives)."""
    split = leave_one_out(ratings)
    if len(split.test) == 0:
        raise ValueError(f"{ratings!r}: no user has the 3 ratings leave-one-out needs")
    users = ratings.user[split.test]  # [U], sorted (split rows are in user order)
    per_user = histories(ratings, np.concatenate([split.train, split.val]))
    hist = _left_padded([per_user[u] for u in users])
    return LeaveOneOut(
        users=users.astype(np.int64),
        histories=hist,
        targets=ratings.item[split.test].astype(np.int32),
        val_targets=ratings.item[split.val].astype(np.int32),
        candidates=_candidates(ratings, users, ratings.item[split.test], candidates, seed),
        fit_rows=split.train,
        n_items=int(ratings.n_items),
    )

"""Recommender baselines for the leave-one-out protocol: popularity, BPR-MF and SASRec, in JAX.

Shapes: U users (dense indices), N catalogue items, B users in a scoring batch, H history
length (-1 left padded, oldest first, as `LeaveOneOut.histories`), D embedding size, L the
SASRec window (`max_len`), R fit rows.

Every baseline has the same face:

    model = BPR.fit(ratings, protocol, seed=0, epochs=60)    # or fit_baseline("bpr", ...)
    scores = model.scores(protocol.users, protocol.histories)   # [U, N] float32, raw
    ranking_metrics(exclude_items(scores, protocol.histories), protocol.targets)

Models fit on `protocol.fit_rows` only (every user's ratings but the last two). Model selection
uses the validation item: `protocol.fit_histories()` predicts `protocol.val_targets`, ranked
over the full catalogue with the history excluded, by HR@10 -- the same measurement as the
test, one step earlier, so the test item never influences training or selection.

- `Popularity`: how often each item occurs in the fit rows; the same list for every user.
- `BPR` (Rendle et al. 2009): score(u, i) = <p_u, q_i> + b_i, trained on (user, rated item,
  unrated item) triples with the pairwise loss -log sigmoid(x_ui - x_uj) plus L2, by Adam. A
  whole epoch is one jitted `lax.scan` over minibatches; negatives are drawn inside it, uniform
  over items the user did not rate in the fit rows (a few draws each, the first unrated one
  kept). Transductive: it scores the users it was fit on and ignores `histories`.
- `SASRec` (Kang & McAuley 2018): item + learned position embeddings, pre-LayerNorm causal
  self-attention blocks, next-item prediction at every position with a full softmax over the N
  items (stronger than the paper's one sampled negative, and cheap at MovieLens sizes). Each
  user contributes the last L+1 items of their fit sequence. Scores are the last position's
  hidden state against the (shared) item embeddings, so it reads `histories` and needs no user
  ids.

BPR and SASRec evaluate every `eval_every` epochs, keep the parameters with the best
validation HR@10, and stop after `patience` evaluations without improvement.
`model.val_curve` lists (epoch, validation HR@10) and `model.best_epoch` the one kept.

Randomness comes from `jax.random.key(seed)` only, so a seed fixes the result.

On ml-100k (seed 0, defaults) test HR@10 is about 0.050 popularity, 0.086 BPR, 0.163 SASRec;
SASRec is above the ~0.10 often quoted partly because of the protocol: many ratings share a
timestamp (44% of test items share the validation item's) and `Ratings` breaks such ties by item
index, an order a sequence model can learn (SASRec HR@10 0.178 on those users, 0.152 on the
rest; popularity and BPR do worse on them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxrec.config import BASELINES
from jaxrec.data import Ratings, histories
from jaxrec.eval.data import LeaveOneOut
from jaxrec.eval.metrics import exclude_items, hit_rate, target_ranks

__all__ = ["BASELINES", "BPR", "Popularity", "SASRec", "fit_baseline", "validation_hr10"]
_SCORE_BATCH = 256  # users per scoring call: a fixed shape, so one compilation


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _config(cls, hyper: dict):
    """`cls(**hyper)`, with a ValueError naming the allowed keys for an unknown one."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyper) - allowed)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**hyper)


def validation_hr10(model, protocol: LeaveOneOut) -> float:
    """HR@10 of `model` on the validation item: full ranking, fit history excluded."""
    hist = protocol.fit_histories()
    return _hr10(model.scores(protocol.users, hist), hist, protocol.val_targets)


def _hr10(scores: np.ndarray, hist: np.ndarray, targets: np.ndarray) -> float:
    better, tied = target_ranks(exclude_items(scores, hist), targets)
    return float(hit_rate(better, tied, 10).mean())


def _in_batches(fn: Callable[[np.ndarray], jax.Array], rows: np.ndarray, width: int):
    """fn over rows [B, ...] -> [B, width] float32, in fixed-size chunks (the last padded by
    repeating row 0, then dropped), so a jitted fn compiles once whatever B is."""
    out = [np.zeros((0, width), np.float32)]
    for start in range(0, len(rows), _SCORE_BATCH):
        chunk = rows[start:start + _SCORE_BATCH]
        pad = _SCORE_BATCH - len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
        out.append(np.asarray(fn(padded))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)


def _wrapped_batches(key: jax.Array, n: int, batch: int) -> jax.Array:
    """[ceil(n / batch), batch] a random order of 0..n-1, the last batch filled from its start:
    every example once per epoch (a few twice) with static shapes."""
    steps = -(-n // batch)
    order = jax.random.permutation(key, n)
    return order[jnp.arange(steps * batch) % n].reshape(steps, batch)


@dataclasses.dataclass
class _Best:
    """Early stopping by validation HR@10: the best parameters so far and the curve."""

    params: Any = None
    hr: float = -1.0
    epoch: int = 0
    stale: int = 0
    curve: list = dataclasses.field(default_factory=list)

    def update(self, epoch: int, hr: float, params) -> None:
        self.curve.append((epoch, hr))
        if hr > self.hr:
            self.params, self.hr, self.epoch, self.stale = params, hr, epoch, 0
        else:
            self.stale += 1


def _train(run_epoch, evaluate, params, opt_state, key, *, epochs, eval_every, patience):
    """Epochs of `run_epoch(params, opt_state, key) -> (params, opt_state, loss)` with
    evaluation every `eval_every` epochs (and after the last); returns the `_Best`."""
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs and eval_every must be >= 1, got {epochs} and {eval_every}")
    best = _Best()
    for epoch in range(1, epochs + 1):
        key, sub = jax.random.split(key)
        params, opt_state, _ = run_epoch(params, opt_state, sub)
        if epoch % eval_every == 0 or epoch == epochs:
            best.update(epoch, evaluate(params), params)
            if best.stale >= patience:
                break
    return best


# ---------------------------------------------------------------------------------------------
# Popularity


@dataclasses.dataclass(frozen=True, eq=False)
class Popularity:
    """Every user gets the items ranked by their number of fit ratings."""

    counts: np.ndarray  # [N] float32 occurrences of each item in the fit rows
    name: ClassVar[str] = "popularity"

    @classmethod
    def fit(cls, ratings: Ratings, protocol: LeaveOneOut, *, seed: int = 0, **hyper) -> Self:
        del seed  # deterministic
        _config(_NoSettings, hyper)
        items = ratings.item[protocol.fit_rows]
        return cls(np.bincount(items, minlength=ratings.n_items).astype(np.float32))

    def scores(self, users: np.ndarray, histories: np.ndarray) -> np.ndarray:
        """[B, N] the counts, the same row for every user."""
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


@dataclasses.dataclass(frozen=True)
class _NoSettings:
    pass


# ---------------------------------------------------------------------------------------------
# BPR matrix factorisation


@dataclasses.dataclass(frozen=True)
class BPRConfig:
    dim: int = 64  # D
    epochs: int = 150  # the most; early stopping usually ends sooner
    batch_size: int = 1024
    learning_rate: float = 5e-3
    l2: float = 1e-4  # per-example weight on |p_u|^2 + |q_i|^2 + |q_j|^2 + b_i^2 + b_j^2
    init_scale: float = 0.1  # std of the initial embeddings
    negative_tries: int = 8  # uniform draws per triple; the first unrated one is kept
    eval_every: int = 5
    patience: int = 4  # evaluations without improvement before stopping


@struct.dataclass
class BPRParams:
    user: jax.Array  # [U, D]
    item: jax.Array  # [N, D]
    bias: jax.Array  # [N]


@struct.dataclass
class _FitRows:
    """The fit (user, item) pairs sorted lexicographically, for sampling and membership."""

    user: jax.Array  # [R] int32
    item: jax.Array  # [R] int32


def _fit_rows(ratings: Ratings, rows: np.ndarray) -> _FitRows:
    u, i = ratings.user[rows].astype(np.int32), ratings.item[rows].astype(np.int32)
    order = np.lexsort((i, u))
    return _FitRows(jnp.asarray(u[order]), jnp.asarray(i[order]))


def _is_rated(rows: _FitRows, u: jax.Array, j: jax.Array) -> jax.Array:
    """Whether (u, j) is a fit pair, elementwise: a binary search over the sorted pairs (no
    dense [U, N] table, so memory stays O(R) on large catalogues)."""
    u, j = jnp.broadcast_arrays(u, j)
    n = rows.user.shape[0]
    lo, hi = jnp.zeros(u.shape, jnp.int32), jnp.full(u.shape, n, jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        mu, mi = rows.user[mid], rows.item[mid]  # mid < n while lo < hi
        below = (mu < u) | ((mu == u) & (mi < j))
        return jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)

    lo, _ = jax.lax.fori_loop(0, max(n, 1).bit_length(), halve, (lo, hi))
    pos = jnp.minimum(lo, n - 1)
    return (rows.user[pos] == u) & (rows.item[pos] == j)


def _sample_negatives(key, rows: _FitRows, u: jax.Array, n_items: int, tries: int) -> jax.Array:
    """Per user in u, an item they did not rate: the first unrated of `tries` uniform draws
    (the last draw if all are rated, which needs a user to have rated most of the catalogue)."""
    draws = jax.random.randint(key, (*u.shape, tries), 0, n_items, jnp.int32)
    rated = _is_rated(rows, u[..., None], draws)
    first = jnp.argmax(~rated, axis=-1)  # 0 when all rated: fall back below
    first = jnp.where(jnp.all(rated, axis=-1), tries - 1, first)
    return jnp.take_along_axis(draws, first[..., None], axis=-1)[..., 0]


def _bpr_loss(params: BPRParams, u, i, j, l2: float) -> jax.Array:
    pu, qi, qj = params.user[u], params.item[i], params.item[j]  # [B, D]
    bi, bj = params.bias[i], params.bias[j]
    diff = jnp.sum(pu * (qi - qj), -1) + bi - bj
    reg = jnp.sum(pu**2 + qi**2 + qj**2, -1) + bi**2 + bj**2
    return jnp.mean(-jax.nn.log_sigmoid(diff) + l2 * reg)


@functools.lru_cache(maxsize=8)
def _bpr_epoch(cfg: BPRConfig, n_rows: int, n_items: int):
    """The jitted epoch for these static sizes (cached, so refits reuse the compilation)."""
    opt = optax.adam(cfg.learning_rate)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(_bpr_loss)(params, *batch, cfg.l2)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, key, rows: _FitRows):
        k_order, k_neg = jax.random.split(key)
        idx = _wrapped_batches(k_order, n_rows, cfg.batch_size)  # [S, B]
        u, i = rows.user[idx], rows.item[idx]
        j = _sample_negatives(k_neg, rows, u, n_items, cfg.negative_tries)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (u, i, j))
        return params, opt_state, losses.mean()

    return opt, epoch


@jax.jit
def _bpr_scores(params: BPRParams, users: jax.Array) -> jax.Array:
    return params.user[users] @ params.item.T + params.bias


@dataclasses.dataclass(frozen=True, eq=False)
class BPR:
    """BPR-MF; see the module docstring. Defaults: `BPRConfig`."""

    config: BPRConfig
    params: BPRParams
    best_epoch: int
    val_curve: tuple[tuple[int, float], ...]
    name: ClassVar[str] = "bpr"

    @classmethod
    def fit(cls, ratings: Ratings, protocol: LeaveOneOut, *, seed: int = 0, **hyper) -> Self:
        cfg = _config(BPRConfig, hyper)
        rows = _fit_rows(ratings, protocol.fit_rows)
        n_users, n_items = ratings.n_users, ratings.n_items
        key, k_user, k_item = jax.random.split(jax.random.key(seed), 3)
        params = BPRParams(
            user=cfg.init_scale * jax.random.normal(k_user, (n_users, cfg.dim)),
            item=cfg.init_scale * jax.random.normal(k_item, (n_items, cfg.dim)),
            bias=jnp.zeros(n_items))
        opt, epoch = _bpr_epoch(cfg, int(rows.user.shape[0]), n_items)

        def evaluate(p):
            return validation_hr10(cls(cfg, p, 0, ()), protocol)

        best = _train(functools.partial(_run_with, epoch, rows), evaluate, params,
                      opt.init(params), key, epochs=cfg.epochs, eval_every=cfg.eval_every,
                      patience=cfg.patience)
        return cls(cfg, best.params, best.epoch, tuple(best.curve))

    def scores(self, users: np.ndarray, histories: np.ndarray) -> np.ndarray:
        """[B, N] <p_u, q_i> + b_i (histories unused: the user embedding already holds them)."""
        users = np.asarray(users, np.int32)
        n_users, n_items = self.params.user.shape[0], self.params.item.shape[0]
        if users.size and (users.min() < 0 or users.max() >= n_users):
            raise ValueError(f"BPR was fit on users 0..{n_users - 1}; got {users.min()} .. "
                             f"{users.max()}")  # a jax gather would clamp them silently
        return _in_batches(lambda u: _bpr_scores(self.params, u), users, n_items)


def _run_with(epoch, data, params, opt_state, key):
    return epoch(params, opt_state, key, data)


# ---------------------------------------------------------------------------------------------
# SASRec


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    # Chosen on the validation item of ml-100k and ml-latest-small 5-core (seed 0): L 100
    # over 50 and 200, batch 64 over 128 and 32, up to 100 epochs with patience 4; dropout 0.2
    # on ml-100k and 0.4 on ml-latest-small (eval.sasrec_dropout).
    max_len: int = 100  # L: the most recent items read
    hidden: int = 64
    heads: int = 2
    blocks: int = 2
    dropout: float = 0.2
    epochs: int = 100  # the most; validation HR@10 peaks at 20-70 epochs, then overfits
    batch_size: int = 64  # sequences (one per user)
    learning_rate: float = 3e-3  # 1e-3 ends a little higher but needs ~3x the epochs
    eval_every: int = 5
    patience: int = 4  # evaluations without improvement before stopping


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a point-wise FFN."""

    hidden: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, train: bool):
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.hidden, dropout_rate=self.dropout,
            deterministic=not train)(nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(attn)
        h = nn.relu(nn.Dense(self.hidden)(nn.LayerNorm()(x)))
        h = nn.Dense(self.hidden)(nn.Dropout(self.dropout, deterministic=not train)(h))
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class SASRecNet(nn.Module):
    """[B, L] item ids (-1 left padding) -> logits over the N items, at every position or only
    the last (`last_only`, for scoring)."""

    n_items: int
    cfg: SASRecConfig

    @nn.compact
    def __call__(self, seq, *, train: bool = False, last_only: bool = False):
        cfg = self.cfg
        valid = seq >= 0  # [B, L]
        # row N is the padding id; its embedding is zeroed below and its logit dropped
        embed = nn.Embed(self.n_items + 1, cfg.hidden, name="item",
                         embedding_init=nn.initializers.xavier_normal())
        pos = self.param("position", nn.initializers.xavier_normal(), (cfg.max_len, cfg.hidden))
        x = embed(jnp.where(valid, seq, self.n_items)) * math.sqrt(cfg.hidden)
        x = x + pos[cfg.max_len - seq.shape[1]:]  # left padded: the last item is position L-1
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x) * valid[..., None]
        # a pad query sees only pad keys; flax masks with a finite value, so no NaN
        mask = nn.combine_masks(nn.make_causal_mask(seq), nn.make_attention_mask(valid, valid))
        for _ in range(cfg.blocks):
            x = _Block(cfg.hidden, cfg.heads, cfg.dropout)(x, mask, train) * valid[..., None]
        h = nn.LayerNorm()(x)
        if last_only:
            h = h[:, -1]
        return embed.attend(h)[..., :self.n_items]


def _windows(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """[S, length] the last `length` items of each sequence, -1 left padded (kept as int32)."""
    out = np.full((len(seqs), length), -1, np.int32)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[row, length - len(s):] = s
    return out


def _sasrec_loss(net, params, seqs, key):
    """Mean next-item cross-entropy over positions with a target; seqs [B, L + 1]."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    logits = net.apply(params, inputs, train=True, rngs={"dropout": key})  # [B, L, N]
    has = (inputs >= 0) & (targets >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    return jnp.sum(ce * has) / jnp.maximum(jnp.sum(has), 1)


@functools.lru_cache(maxsize=8)
def _sasrec_fns(cfg: SASRecConfig, n_items: int, n_seqs: int):
    """(net, optimizer, jitted epoch) for these static sizes (cached: refits reuse them)."""
    net = SASRecNet(n_items, cfg)
    opt = optax.adam(cfg.learning_rate)

    def step(carry, batch):
        params, opt_state = carry
        seqs, key = batch
        loss, grads = jax.value_and_grad(functools.partial(_sasrec_loss, net))(params, seqs, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, key, data):
        k_order, k_drop = jax.random.split(key)
        idx = _wrapped_batches(k_order, n_seqs, cfg.batch_size)  # [S, B]
        keys = jax.random.split(k_drop, idx.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (data[idx], keys))
        return params, opt_state, losses.mean()

    return net, opt, epoch


@functools.lru_cache(maxsize=8)
def _sasrec_last_logits(cfg: SASRecConfig, n_items: int):
    """Jitted [B, L] windows -> [B, N] logits of the last position."""
    net = SASRecNet(n_items, cfg)
    return jax.jit(lambda params, seq: net.apply(params, seq, last_only=True))


@dataclasses.dataclass(frozen=True, eq=False)
class SASRec:
    """SASRec; see the module docstring. Defaults: `SASRecConfig`."""

    config: SASRecConfig
    params: Any  # flax variables of SASRecNet
    n_items: int
    best_epoch: int
    val_curve: tuple[tuple[int, float], ...]
    name: ClassVar[str] = "sasrec"

    @classmethod
    def fit(cls, ratings: Ratings, protocol: LeaveOneOut, *, seed: int = 0, **hyper) -> Self:
        cfg = _config(SASRecConfig, hyper)
        per_user = [s for s in histories(ratings, protocol.fit_rows) if len(s) >= 2]
        if not per_user:
            raise ValueError(f"{ratings!r}: no user has 2 fit ratings to learn a transition")
        data = jnp.asarray(_windows(per_user, cfg.max_len + 1))  # [S, L + 1]
        net, opt, epoch = _sasrec_fns(cfg, ratings.n_items, len(per_user))
        key, k_init = jax.random.split(jax.random.key(seed))
        params = net.init(k_init, data[:1, :-1])

        def evaluate(p):
            return validation_hr10(cls(cfg, p, ratings.n_items, 0, ()), protocol)

        best = _train(functools.partial(_run_with, epoch, data), evaluate, params,
                      opt.init(params), key, epochs=cfg.epochs, eval_every=cfg.eval_every,
                      patience=cfg.patience)
        return cls(cfg, best.params, ratings.n_items, best.epoch, tuple(best.curve))

    def scores(self, users: np.ndarray, histories: np.ndarray) -> np.ndarray:
        """[B, N] the last position's hidden state against each item embedding (users unused:
        the history is the user)."""
        last_logits = _sasrec_last_logits(self.config, self.n_items)
        seqs = _windows(list(np.asarray(histories, np.int32)), self.config.max_len)
        return _in_batches(lambda s: last_logits(self.params, s), seqs, self.n_items)


# ---------------------------------------------------------------------------------------------


_MODELS = {m.name: m for m in (Popularity, BPR, SASRec)}


def fit_baseline(name: str, ratings: Ratings, protocol: LeaveOneOut, *, seed: int = 0, **hyper):
    """Fit the baseline called `name` (one of `BASELINES`) with its settings `hyper`."""
    if name not in _MODELS:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    return _MODELS[name].fit(ratings, protocol, seed=seed, **hyper)

"""The SFT stage: next-item prediction on users' histories rendered as text.

An example cuts a user's history h (item indices, oldest first) at position j (1 <= j and
j + K <= len(h)):

    prompt     = render_prompts(codec, h[j - H : j], spec.prompt_len)   (H = sim.history_len)
    completion = render_slates(codec, h[j : j + K], spec.max_new_tokens)  (K = slate_size)

so the prompt is byte for byte the one a rollout renders for a user whose observed history is
h[:j] (the env shows its last H items; the prompt keeps the most recent of them that fit, at
least `rollout.history_items`), and the completion is the slate PPO would have to generate to
recommend the next K items: blocks joined by the slate separator, then EOS, right padded with
the codec's pad token (`completion_mask` False there). The loss is the NLL of the completion
tokens only.

Histories: SYNTHETIC_USERS + sft.eval_users of the synthetic world's simulated users
(`env.reset_batch`, a key from config.seed), or for sim.preset 'movielens' the real
chronological training histories (the leave-one-out train split, the rows the env was
calibrated on; item indices are the env's catalogue's). Held-out users (`sft.eval_users`) are
never trained on. Every example is built once (numpy cuts, one jitted render) and lives on
device; step i draws `sft.batch_size` of them with the key fold_in(stage key, i), so a resumed
run (or one continued with a larger sft.steps) draws the same batches as an uninterrupted one.

Work dir layout: DIR/checkpoints/sft/<step>, lines {"stage": "sft", "step": ...} in
DIR/metrics.jsonl, TensorBoard scalars under DIR/tb, DIR/sft_summary.json.

Shapes: E examples, B batch, P prompt tokens, R completion tokens, H history window,
K slate size, N catalogue items.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxrec.checkpoint import Checkpointer
from jaxrec.codec import (
    ItemCodec,
    decode_slate,
    history_mask,
    render_prompts,
    render_slates,
    slate_constraint,
)
from jaxrec.config import Config, ModelConfig, SFTConfig
from jaxrec.eval.offline import item_logits, next_item_logits
from jaxrec.generation import Greedy, generate, sequence_scores
from jaxrec.models import forward
from jaxrec.train.distributed import is_primary, primary_log
from jaxrec.train.placement import Placement
from jaxrec.train.report import TensorBoard
from jaxrec.train.setup import Setup, build_setup, load_ratings
from jaxrec.train.stages import metrics_before, metrics_writer, stop_requests, write_config

STAGE = "sft"
STREAM = 5 << 20  # fold_in tag of the stage's key (PPO: iterations < 1 << 20, salts 1-3 << 20)
SYNTHETIC_USERS = 4096  # simulated training users (sft.examples_per_user examples each)


# ---------------------------------------------------------------------------------------------
# Histories and examples (host side, once)


@dataclasses.dataclass(frozen=True)
class Histories:
    """Every user's history, oldest first, users one after another (host-side numpy)."""

    items: np.ndarray  # [T] int32 item indices
    start: np.ndarray  # [U] int64 where each user's items begin in `items`
    length: np.ndarray  # [U] int64 items per user


@struct.dataclass
class SFTExamples:
    """Prompts and target completions; a batch is the same dataclass with E = B."""

    prompt: jax.Array  # [E, P] int32, left padded, exactly as a rollout renders it
    prompt_valid: jax.Array  # [E, P] bool
    completion: jax.Array  # [E, R] int32, the next K items' slate text, pad_id after EOS
    completion_mask: jax.Array  # [E, R] bool, the completion's tokens (EOS included)
    history: jax.Array  # [E, H] int32, the items before the cut (-1 padded at the front)
    next_item: jax.Array  # [E] int32, the item right after the cut

    @property
    def size(self) -> int:
        return self.next_item.shape[0]


@struct.dataclass
class SequenceExamples:
    """Item-token mode: windows of a history rendered as one sequence (`item_token_codec`'s
    sequence template, `[BOS] prefix i_1 ; i_2 ; ... ; i_m ;`); every separator that is
    followed by an item is a next-item target, so a window of m items trains m - 1 of them."""

    tokens: jax.Array  # [E, S] int32, left padded
    valid: jax.Array  # [E, S] bool

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@struct.dataclass
class NextItemExamples:
    """Item-token mode, held out: a prompt and the one item that came next."""

    prompt: jax.Array  # [E, P] int32, left padded, exactly as a rollout renders it
    prompt_valid: jax.Array  # [E, P] bool
    history: jax.Array  # [E, H] int32, the items in the prompt (-1 padded at the front)
    next_item: jax.Array  # [E] int32

    @property
    def size(self) -> int:
        return self.next_item.shape[0]


@struct.dataclass
class PtxRows:
    """The supervised rows PPO-ptx draws from (`ppo.ptx_coef > 0`): the SFT stage's training
    examples as whole sequences, in PPO's `sft_tokens` / `sft_mask` / `sft_valid` layout."""

    tokens: jax.Array  # [E, T] int32
    valid: jax.Array  # [E, T] bool, False on padding
    mask: jax.Array  # [E, T] bool, the tokens whose NLL counts (the predicted items)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@struct.dataclass
class SFTData:
    train: SFTExamples | SequenceExamples  # training examples (text | item-token mode)
    eval: SFTExamples | NextItemExamples  # held-out examples


def histories_from_rows(rows: np.ndarray) -> Histories:
    """[U, H] int32 histories, -1 padding anywhere (kept entries stay in order) -> Histories."""
    rows = np.asarray(rows)
    present = rows >= 0  # [U, H]
    length = present.sum(axis=1).astype(np.int64)  # [U]
    return Histories(items=rows[present].astype(np.int32), start=np.cumsum(length) - length,
                     length=length)


def histories_from_lists(lists: list[np.ndarray]) -> Histories:
    """Per-user 1-D item arrays in time order -> Histories."""
    length = np.asarray([len(x) for x in lists], np.int64)
    items = np.concatenate([np.asarray(x, np.int32) for x in lists]) if lists else np.zeros(
        0, np.int32)
    return Histories(items=items, start=np.cumsum(length) - length, length=length)


def synthetic_histories(setup: Setup, n_users: int, key: jax.Array) -> Histories:
    """Fresh simulated users' histories (the env's observation: its last sim.history_len)."""
    return histories_from_rows(np.asarray(_observed(setup.env, setup.env_params, key, n_users)))


@functools.partial(jax.jit, static_argnames=("env", "n_users"))
def _observed(env, env_params, key: jax.Array, n_users: int) -> jax.Array:
    """[U, H] int32 histories of `n_users` fresh users."""
    _, users = env.reset_batch(key, n_users, env_params)
    return jax.vmap(env.observation, in_axes=(0, None))(users, env_params)


def movielens_histories(config: Config, with_validation: bool = False):
    """The real chronological histories of the training split the env was calibrated on.

    Item indices are the ratings table's dense ones, which are the env's catalogue indices
    (`jaxrec.train.setup.build_world` builds the world from the same table). With
    `with_validation`: (histories, [U] int32 each user's validation item, -1 where none).
    """
    from jaxrec.data import histories, leave_one_out

    ratings = load_ratings(config)
    split = leave_one_out(ratings)
    hist = histories_from_lists(histories(ratings, split.train))
    if not with_validation:
        return hist
    val = np.full(ratings.n_users, -1, np.int32)
    val[ratings.user[split.val]] = ratings.item[split.val]
    return hist, val


def users_with_examples(hist: Histories, slate_size: int) -> np.ndarray:
    """Users whose history holds 1 + K items (one of context, then a slate) [U'] int64."""
    return np.flatnonzero(hist.length >= 1 + slate_size)


def split_users(hist: Histories, slate_size: int, eval_users: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) user indices: a random `eval_users` of the users with an example, and
    the rest."""
    eligible = users_with_examples(hist, slate_size)
    if len(eligible) <= eval_users:
        longest = int(hist.length.max()) if len(hist.length) else 0
        raise ValueError(
            f"sft: {len(eligible)} of {len(hist.length)} users have the {1 + slate_size} "
            f"history items an example needs (1 of context + rollout.slate_size={slate_size}; "
            f"the longest history has {longest}), not more than sft.eval_users={eval_users}")
    order = rng.permutation(eligible)
    return np.sort(order[eval_users:]), np.sort(order[:eval_users])


def cut_examples(hist: Histories, users: np.ndarray, per_user: int, slate_size: int,
                 window: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cut positions, stratified: (windows [E, H] int32, slates [E, K] int32).

    A user with n items has c = n - K cuts j in [1, c]; they get m = min(per_user, c) distinct
    ones, j_k = 1 + floor((k + o) c / m) for k < m and one uniform offset o in [0, 1) (spacing
    c / m >= 1, so distinct, and spread over the whole history). The window holds the H items
    before j (-1 padded at the front), the slate the K items from j on.
    """
    n = hist.length[users]  # [U]
    c = n - slate_size  # [U] cuts per user (>= 1: users come from split_users)
    m = np.minimum(c, per_user)  # [U]
    offset = rng.random(len(users))  # [U]
    k = np.arange(per_user)  # [e]
    cut = 1 + np.floor((k[None, :] + offset[:, None]) * c[:, None] / m[:, None])  # [U, e]
    cut = np.minimum(cut, c[:, None])  # rounding must never reach past the last full slate
    keep = k[None, :] < m[:, None]  # [U, e]
    j = cut.astype(np.int64)[keep]  # [E]
    base = np.broadcast_to(hist.start[users][:, None], keep.shape)[keep]  # [E]
    pos = j[:, None] - window + np.arange(window)  # [E, H] positions in the user's history
    windows = np.where(pos >= 0, hist.items[base[:, None] + np.maximum(pos, 0)], -1)
    slates = hist.items[base[:, None] + j[:, None] + np.arange(slate_size)]  # [E, K]
    return windows.astype(np.int32), slates.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("prompt_len", "completion_len"))
def render_examples(codec: ItemCodec, windows: jax.Array, slates: jax.Array, prompt_len: int,
                    completion_len: int) -> SFTExamples:
    """windows [E, H], slates [E, K] -> SFTExamples (the rollout's prompt rendering)."""
    prompt, prompt_valid = render_prompts(codec, windows, prompt_len)  # [E, P]
    completion, completion_mask = render_slates(codec, slates, completion_len)  # [E, R]
    return SFTExamples(prompt=prompt, prompt_valid=prompt_valid, completion=completion,
                       completion_mask=completion_mask, history=windows,
                       next_item=slates[:, 0])


def sequence_windows(hist: Histories, users: np.ndarray, per_user: int,
                     window: int) -> np.ndarray:
    """[E, window + 1] int32 windows of the users' histories, newest first, -1 left padded.

    Window k of a user with n items holds items [n - 1 - (k + 1) W, n - k W) (clipped at 0):
    consecutive windows share one item, so each of the n - 1 transitions is a target exactly
    once, up to `per_user` windows (the most recent transitions) per user.
    """
    out = []
    for u in users:
        h = hist.items[hist.start[u]:hist.start[u] + hist.length[u]]
        n = len(h)
        for k in range(min(per_user, -(-(n - 1) // window))):
            piece = h[max(0, n - 1 - (k + 1) * window):n - k * window]
            row = np.full(window + 1, -1, np.int32)
            row[window + 1 - len(piece):] = piece
            out.append(row)
    return np.stack(out) if out else np.zeros((0, window + 1), np.int32)


def _last_items(hist: Histories, users: np.ndarray, window: int) -> np.ndarray:
    """[U, window] each user's most recent `window` items, -1 left padded (one gather, as
    `cut_examples` takes its windows)."""
    pos = hist.length[users][:, None] - window + np.arange(window)  # [U, W] within the user
    at = hist.start[users][:, None] + np.maximum(pos, 0)
    return np.where(pos >= 0, hist.items[np.minimum(at, max(len(hist.items) - 1, 0))],
                    -1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("prompt_len",))
def render_next_item(codec: ItemCodec, history: jax.Array, next_item: jax.Array,
                     prompt_len: int) -> NextItemExamples:
    prompt, valid = render_prompts(codec, history, prompt_len)
    return NextItemExamples(prompt=prompt, prompt_valid=valid, history=history,
                            next_item=next_item)


def build_sequence_data(config: Config, setup: Setup) -> SFTData:
    """Item-token mode (model.items: tokens): next-item prediction at every position.

    Training: `sequence_windows` of rollout.history_items + 1 items (up to
    sft.examples_per_user per user) of every training history. Held out, MovieLens: every
    user's validation item (the leave-one-out split's second to last rating) after their
    training history, so model selection reads the validation item and never the test item;
    synthetic world: the last item of sft.eval_users held-out simulated users.
    """
    sft, w = config.sft, config.rollout.history_items
    rng = np.random.default_rng([config.seed, STREAM])
    if config.sim.preset == "movielens":
        hist, val = movielens_histories(config, with_validation=True)
        train_users = np.flatnonzero(hist.length >= 2)
        held = np.flatnonzero(val >= 0)
        history, target = _last_items(hist, held, w), val[held]
    else:
        key = jax.random.fold_in(stage_key(config), 0)
        hist = synthetic_histories(setup, SYNTHETIC_USERS + sft.eval_users, key)
        train_users, held = split_users(hist, 1, sft.eval_users, rng)
        before = dataclasses.replace(hist, length=hist.length - 1)  # all but the last item
        history = _last_items(before, held, w)
        target = hist.items[hist.start[held] + hist.length[held] - 1]
    windows = sequence_windows(hist, train_users, sft.examples_per_user, w)
    tokens, valid = render_prompts(setup.codec, jnp.asarray(windows),
                                   setup.codec.prompt_len(w + 1))
    held_out = render_next_item(setup.codec, jnp.asarray(history),
                                jnp.asarray(target, jnp.int32), setup.spec.prompt_len)
    return SFTData(train=SequenceExamples(tokens=tokens, valid=valid), eval=held_out)


def build_sft_data(config: Config, setup: Setup) -> SFTData:
    """Training and held-out examples for this config's world (see the module docstring).

    The users are the MovieLens training split's, or SYNTHETIC_USERS + sft.eval_users fresh
    simulated ones (one draw from the stage's key); a random sft.eval_users of those with an
    example are held out. Nothing here depends on sft.steps, so a run continued with more
    steps trains on the same examples.
    """
    if setup.codec.item_token_offset >= 0:
        return build_sequence_data(config, setup)
    sft, k = config.sft, config.rollout.slate_size
    if config.sim.preset == "movielens":
        hist = movielens_histories(config)
    else:
        if config.sim.history_len < 1 + k:
            raise ValueError(
                f"sft: sim.history_len={config.sim.history_len} cannot hold the {1 + k} items "
                f"an example needs (1 of context + rollout.slate_size={k})")
        key = jax.random.fold_in(stage_key(config), 0)
        hist = synthetic_histories(setup, SYNTHETIC_USERS + sft.eval_users, key)
    rng = np.random.default_rng([config.seed, STREAM])
    out = []
    for users in split_users(hist, k, sft.eval_users, rng):
        windows, slates = cut_examples(hist, users, sft.examples_per_user, k,
                                       config.sim.history_len, rng)
        out.append(render_examples(setup.codec, jnp.asarray(windows), jnp.asarray(slates),
                                   setup.spec.prompt_len, setup.spec.max_new_tokens))
    return SFTData(train=out[0], eval=out[1])


def ptx_rows(examples: SFTExamples | SequenceExamples, codec: ItemCodec) -> PtxRows:
    """The training examples as PPO-ptx rows: text mode, prompt then completion with the
    completion's tokens counted; item-token mode, the sequence with every item that follows a
    separator counted (the targets of `sequence_nll`)."""
    if isinstance(examples, SequenceExamples):
        tokens, valid = examples.tokens, examples.valid
        item = (tokens >= codec.item_token_offset) & (
            tokens < codec.item_token_offset + codec.num_items)
        after_sep = jnp.pad(tokens[:, :-1] == codec.slate_sep_id, ((0, 0), (1, 0)))
        return PtxRows(tokens=tokens, valid=valid, mask=item & after_sep & valid)
    tokens = jnp.concatenate([examples.prompt, examples.completion], axis=1)
    valid = jnp.concatenate([examples.prompt_valid, examples.completion_mask], axis=1)
    mask = jnp.concatenate([jnp.zeros_like(examples.prompt_valid), examples.completion_mask],
                           axis=1)
    return PtxRows(tokens=tokens, valid=valid, mask=mask)


def draw_ptx(rows: PtxRows, key: jax.Array, n: int) -> PtxRows:
    """n rows drawn uniformly with replacement by `key` (each PPO iteration its own key)."""
    idx = jax.random.randint(key, (n,), 0, rows.size)
    return jax.tree.map(lambda x: x[idx], rows)


# ---------------------------------------------------------------------------------------------
# Loss, optimizer, step, evaluation (device)


@struct.dataclass
class SFTState:
    """What a step reads and writes (and a checkpoint holds)."""

    step: jax.Array  # [] int32, optimizer steps taken
    params: Any  # the policy's params (the same tree as Setup.params)
    opt_state: Any  # optax state of make_sft_optimizer


def learning_rate(lr: float, warmup_steps: int) -> optax.Schedule:
    """lr(t) = lr * min(1, (t + 1) / warmup_steps): linear warmup, then constant."""
    warmup = max(warmup_steps, 1)
    return lambda count: lr * jnp.minimum(1.0, (count + 1.0) / warmup)


def make_sft_optimizer(sft: SFTConfig) -> optax.GradientTransformation:
    """Global-norm clipping at sft.max_grad_norm, then AdamW (b1 0.9, b2 0.95, eps 1e-8) at
    `learning_rate(sft.lr, sft.warmup_steps)`.

    l2_mode 'decoupled': AdamW's weight decay = sft.l2, theta <- theta - lr(t) (adam(g) +
    l2 theta) (Loshchilov & Hutter): the penalty never reaches the gradient. l2_mode 'loss':
    weight decay 0 and the loss carries l2 * sum(theta^2) (see `sft_loss`), so its gradient
    2 l2 theta is clipped and Adam-normalised with the data term. The same settings give the
    same (cached) object, so the jitted step compiles once per setting.
    """
    decay = sft.l2 if sft.l2_mode == "decoupled" else 0.0
    return _optimizer(sft.lr, sft.warmup_steps, decay, sft.max_grad_norm)


@functools.lru_cache(maxsize=32)
def _optimizer(lr: float, warmup_steps: int, weight_decay: float,
               max_grad_norm: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate(lr, warmup_steps), b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=weight_decay),
    )


def init_sft_state(params: Any, tx: optax.GradientTransformation) -> SFTState:
    """Step 0: a copy of `params` (the state is donated, the caller's arrays stay valid)."""
    params = jax.tree.map(jnp.array, params)
    return SFTState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def completion_nll(cfg: ModelConfig, params: Any,
                   batch: SFTExamples) -> tuple[jax.Array, jax.Array]:
    """Per row: (sum over completion tokens of -log pi(y_t | x, y_<t) [B], tokens [B])."""
    r = batch.completion.shape[1]
    tokens = jnp.concatenate([batch.prompt, batch.completion], axis=1)  # [B, P + R]
    valid = jnp.concatenate([batch.prompt_valid, batch.completion_mask], axis=1)
    logps = sequence_scores(cfg, params, tokens, valid, window=r).logps[:, -r:]  # [B, R]
    mask = batch.completion_mask
    nll = -jnp.sum(jnp.where(mask, logps, 0.0), axis=1)  # [B]
    return nll, mask.sum(axis=1).astype(jnp.float32)


def sequence_nll(cfg: ModelConfig, codec: ItemCodec, params: Any, batch: SequenceExamples,
                 key: jax.Array | None = None,
                 item_dropout: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(summed -log p(next item | items before it) over every target [], targets []): the
    softmax runs over the catalogue's tokens only (`item_logits`).

    `item_dropout` p > 0 (with `key`): each item token is hidden from attention with
    probability p, as if the user had not watched it (later positions close the gap), while
    every target is still predicted: a regulariser for small data, where the model otherwise
    memorises each user's exact sequence.

    The sequence template is right aligned with two tokens per item, so the separator after
    the k-th most recent item sits at S - 1 - 2(k - 1) in every row: the queries are the
    separators at S - 3, S - 5, ..., their targets the item tokens one to the right.
    """
    s = batch.tokens.shape[1]
    w = (s - codec.head_tokens.shape[0]) // 2 - 1  # W: targets per row (window W + 1)
    query = s - 1 - 2 * jnp.arange(1, w + 1)  # [W]
    seen = batch.valid
    if item_dropout > 0:
        lo = codec.item_token_offset
        item = (batch.tokens >= lo) & (batch.tokens < lo + codec.num_items)
        seen = seen & ~(item & jax.random.bernoulli(key, item_dropout, batch.tokens.shape))
    hidden = forward(cfg, params, batch.tokens, seen, head="none").hidden[:, query]
    target = batch.tokens[:, query + 1] - codec.item_token_offset  # [B, W]
    has = batch.valid[:, query] & (batch.tokens[:, query] == codec.slate_sep_id)
    has &= (target >= 0) & (target < codec.num_items)
    logits = item_logits(cfg, params, hidden, codec)  # [B, W, N]
    picked = jnp.take_along_axis(logits, jnp.clip(target, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, W]
    return jnp.sum(jnp.where(has, nll, 0.0)), jnp.sum(has).astype(jnp.float32)


def param_sq(params: Any) -> jax.Array:
    """sum(theta^2) over every leaf (params or gradients), float32 []."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def sft_loss(params: Any, cfg: ModelConfig, batch: SFTExamples | SequenceExamples,
             l2_in_loss: float, codec: ItemCodec | None = None, key: jax.Array | None = None,
             item_dropout: float = 0.0) -> tuple[jax.Array, dict]:
    """L(theta) = sum_{b,t} m_bt (-log pi(y_bt | x_b, y_b,<t)) / sum_{b,t} m_bt
                  + l2_in_loss * sum(theta^2)

    with m the completion mask (prompt tokens carry no loss); l2_in_loss is sft.l2 in
    l2_mode 'loss' and 0 in 'decoupled'. Returns (L, {"nll", "param_sq"}). Item-token
    `SequenceExamples` (which need the `codec`) average `sequence_nll` over their targets,
    with sft.item_dropout (`item_dropout`, drawn from `key`).
    """
    if isinstance(batch, SequenceExamples):
        total, count = sequence_nll(cfg, codec, params, batch, key, item_dropout)
    else:
        nll, count = completion_nll(cfg, params, batch)  # [B], [B]
        total, count = nll.sum(), count.sum()
    mean_nll = total / jnp.maximum(count, 1.0)
    sq = param_sq(params)
    return mean_nll + l2_in_loss * sq, {"nll": mean_nll, "param_sq": sq}


@functools.partial(jax.jit, static_argnames=("cfg", "tx", "batch_size", "l2_in_loss", "rows",
                                             "item_dropout"),
                   donate_argnames="state")
def sft_step(state: SFTState, examples: SFTExamples | SequenceExamples, key: jax.Array, *,
             cfg: ModelConfig, tx: optax.GradientTransformation, batch_size: int,
             l2_in_loss: float, rows: jax.sharding.Sharding | None = None,
             codec: ItemCodec | None = None,
             item_dropout: float = 0.0) -> tuple[SFTState, dict[str, jax.Array]]:
    """One optimizer step on `batch_size` examples drawn (with replacement) by `key`.

    `l2_in_loss`: sft.l2 in l2_mode 'loss', else 0 (see `sft_loss`). `rows`: on a mesh, the
    drawn batch's rows are split this way (data parallel); the examples themselves sit whole
    on every device. The state is donated.
    """
    key_batch, key_drop = jax.random.split(key)
    idx = jax.random.randint(key_batch, (batch_size,), 0, examples.size)  # [B]
    batch = jax.tree.map(lambda x: x[idx], examples)
    if rows is not None:
        batch = jax.lax.with_sharding_constraint(batch, rows)
    (objective, aux), grads = jax.value_and_grad(sft_loss, has_aux=True)(
        state.params, cfg, batch, l2_in_loss, codec, key_drop, item_dropout)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "sft/loss": aux["nll"],
        "sft/objective": objective,
        "sft/grad_norm": jnp.sqrt(param_sq(grads)),
        "sft/param_norm": jnp.sqrt(aux["param_sq"]),
    }
    return SFTState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def first_items(cfg: ModelConfig, codec: ItemCodec, slate_size: int, params: Any,
                batch: SFTExamples, ban_history: bool) -> jax.Array:
    """Greedy catalogue-constrained decoding's first item per row [B] int32 (-1: none).

    Only the first item's block and its terminator are generated (block_len + 1 tokens).
    The constraint is the rollout's: K distinct real items, the history banned when
    `ban_history`.
    """
    banned = history_mask(codec, batch.history) if ban_history else None  # [B, N]
    constraint = slate_constraint(codec, slate_size, banned, cfg.vocab_size)
    out = generate(cfg, params, batch.prompt, batch.prompt_valid, jax.random.key(0),
                   sampler=Greedy(), max_new_tokens=codec.block_len + 1, constraint=constraint,
                   eos_id=int(codec.eos_id))
    items, _ = decode_slate(codec, out.tokens, out.mask, slate_size, banned)  # [B, K]
    return items[:, 0]


def _in_chunks(examples: Any, chunk: int) -> tuple[Any, jax.Array]:
    """Examples [E, ...] -> ([n_chunks, chunk, ...] padded with copies of the last row,
    [n_chunks, chunk] float32 weights: 1 on real rows, 0 on the padding), for lax.map."""
    e = examples.size
    n_chunks = -(-e // chunk)
    pad = n_chunks * chunk - e

    def chunked(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    weight = (jnp.arange(n_chunks * chunk) < e).astype(jnp.float32).reshape(n_chunks, chunk)
    return jax.tree.map(chunked, examples), weight


@functools.partial(jax.jit, static_argnames=("cfg", "slate_size", "ban_history", "chunk"))
def evaluate(params: Any, examples: SFTExamples, codec: ItemCodec, *, cfg: ModelConfig,
             slate_size: int, ban_history: bool, chunk: int) -> dict[str, jax.Array]:
    """Held-out {"sft/eval_loss": mean NLL per completion token, "sft/next_item_acc": fraction
    of examples whose greedy first item is the true next item}, over chunks of `chunk` rows
    (lax.map; the last chunk is padded and its padding weighs 0)."""
    e = examples.size
    chunks, weight = _in_chunks(examples, chunk)

    def one(xs):
        batch, w = xs
        nll, count = completion_nll(cfg, params, batch)  # [C], [C]
        hit = first_items(cfg, codec, slate_size, params, batch, ban_history) == batch.next_item
        return jnp.stack([(w * nll).sum(), (w * count).sum(), (w * hit).sum()])

    totals = jax.lax.map(one, (chunks, weight)).sum(axis=0)  # [3]
    return {"sft/eval_loss": totals[0] / jnp.maximum(totals[1], 1.0),
            "sft/next_item_acc": totals[2] / e}


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def evaluate_next_item(params: Any, examples: NextItemExamples, codec: ItemCodec, *,
                       cfg: ModelConfig, chunk: int) -> dict[str, jax.Array]:
    """Item-token mode, held out: {"sft/eval_loss": mean -log p(next item | prompt) over the
    catalogue, "sft/next_item_acc": the top item (history excluded) is the next one,
    "sft/eval_hr@10", "sft/eval_ndcg@10": the next item's rank among the items outside the
    history (ties count against it)}, over chunks of `chunk` rows."""
    e = examples.size
    chunks, weight = _in_chunks(examples, chunk)

    def one(xs):
        batch, w = xs
        logp = next_item_logits(cfg, params, codec, batch.prompt, batch.prompt_valid)  # [C, N]
        own = jnp.take_along_axis(logp, batch.next_item[:, None], axis=1)[:, 0]  # [C]
        seen = history_mask(codec, batch.history)  # [C, N]
        other = jnp.arange(logp.shape[1])[None, :] != batch.next_item[:, None]  # [C, N]
        rank = jnp.sum((logp >= own[:, None]) & ~seen & other, axis=1)  # [C] 0 = top
        hit = (rank < 10).astype(jnp.float32)
        ndcg = hit / jnp.log2(rank.astype(jnp.float32) + 2.0)
        return jnp.stack([(w * -own).sum(), (w * (rank == 0)).sum(), (w * hit).sum(),
                          (w * ndcg).sum()])

    totals = jax.lax.map(one, (chunks, weight)).sum(axis=0) / e
    return {"sft/eval_loss": totals[0], "sft/next_item_acc": totals[1],
            "sft/eval_hr@10": totals[2], "sft/eval_ndcg@10": totals[3]}


# ---------------------------------------------------------------------------------------------
# The host loop


def stage_key(config: Config) -> jax.Array:
    """The stage's root key; step i uses fold_in(fold_in(it, 1), i)."""
    return jax.random.fold_in(jax.random.key(config.seed), STREAM)


def _no_users() -> jax.Array:
    """What fills the Checkpointer's sim_state slot: SFT has no simulated users."""
    return jnp.zeros((), jnp.int32)


def _checkpointer(config: Config, workdir: pathlib.Path) -> Checkpointer:
    return Checkpointer(workdir / "checkpoints" / STAGE, keep=config.checkpoint.keep)


def _summary(lines: list[dict], step: int, extra: dict | None = None) -> dict:
    evals = [x for x in lines if x.get("stage") == STAGE and "sft/eval_loss" in x]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    return {
        "stage": STAGE,
        "steps": step,
        "eval_loss_first": first.get("sft/eval_loss"),
        "eval_loss_last": last.get("sft/eval_loss"),
        "next_item_acc_first": first.get("sft/next_item_acc"),
        "next_item_acc_last": last.get("sft/next_item_acc"),
        **(extra or {}),
    }


def _finished(workdir: pathlib.Path, step: int, log) -> dict:
    """The summary of a stage that already reached its last step."""
    path = workdir / "sft_summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("steps") != step:  # killed between the last checkpoint and the summary
        summary = _summary(metrics_before(workdir / "metrics.jsonl", STAGE, step), step)
        if is_primary():
            path.write_text(json.dumps(summary, indent=2))
    log(f"sft: already finished at step {step} in {workdir}")
    return summary


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _resume(ckpt: Checkpointer, latest: int | None, state: SFTState, key: jax.Array,
            no_users: jax.Array, sizes: dict, log) -> tuple[SFTState, jax.Array, int]:
    """(state, key, first step to run): the latest checkpoint's, or the given ones at 0."""
    if latest is None:
        return state, key, 0
    state, _, key, record = ckpt.restore(latest, state, no_users, key)
    if record.get("train_examples") != sizes["train_examples"]:
        raise ValueError(f"{ckpt.directory}/{latest} was written with "
                         f"{record.get('train_examples')} training examples, this config gives "
                         f"{sizes['train_examples']}: use a fresh workdir")
    log(f"resuming the sft stage at step {record['step']} from {ckpt.directory}")
    return state, key, int(record["step"])


def _eval_text(line: dict, steps: int) -> str:
    loss = f"  loss {line['sft/loss']:.3f}" if "sft/loss" in line else ""
    ranking = "".join(f"  {name} {line[f'sft/eval_{name}']:.4f}" for name in ("hr@10", "ndcg@10")
                      if f"sft/eval_{name}" in line)
    return (f"sft {line['step']}/{steps}{loss}  eval_loss {line['sft/eval_loss']:.3f}  "
            f"next_item_acc {line['sft/next_item_acc']:.3f}{ranking}")


def run_sft(config: Config, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    """Run (or resume) the SFT stage in `workdir`; returns the summary (also in
    DIR/sft_summary.json): stage, steps, eval_loss_first/last, next_item_acc_first/last (the
    first values are the starting params', step 0), train_examples, eval_examples.

    Rerunning resumes from the latest checkpoint under DIR/checkpoints/sft; a stage whose
    latest checkpoint has reached sft.steps returns its summary at once.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log, primary = primary_log(log), is_primary()  # several hosts: process 0 writes the files
    sft = config.sft
    ckpt = _checkpointer(config, workdir)
    latest = ckpt.latest_step()
    if latest is not None and latest >= sft.steps:
        ckpt.close()
        return _finished(workdir, latest, log)

    setup = build_setup(config)
    data = build_sft_data(config, setup)
    sizes = {"train_examples": data.train.size, "eval_examples": data.eval.size}
    tx = make_sft_optimizer(sft)
    placed = Placement(config, setup.model, config.sft.batch_size, "sft.batch_size")
    data = placed.host_whole(data)  # the examples, whole on every device
    no_users = placed.whole(_no_users)
    initial = placed.train_state(lambda p: init_sft_state(p, tx), setup.params, tx)
    state, key, start = _resume(ckpt, latest, initial, placed.whole(lambda: stage_key(config)),
                                no_users, sizes, log)
    write_config(config, workdir, log)  # the checkpoint fits this config
    step_fn = functools.partial(sft_step, cfg=setup.model, tx=tx, batch_size=sft.batch_size,
                                l2_in_loss=sft.l2 if sft.l2_mode == "loss" else 0.0,
                                rows=placed.rows, codec=setup.codec,
                                item_dropout=sft.item_dropout)
    if isinstance(data.eval, NextItemExamples):
        eval_fn = functools.partial(evaluate_next_item, examples=data.eval, codec=setup.codec,
                                    cfg=setup.model, chunk=min(64, data.eval.size))
    else:
        eval_fn = functools.partial(evaluate, examples=data.eval, codec=setup.codec,
                                    cfg=setup.model, slate_size=setup.spec.slate_size,
                                    ban_history=setup.spec.ban_history,
                                    chunk=min(sft.batch_size, data.eval.size))
    lr, steps_key = learning_rate(sft.lr, sft.warmup_steps), jax.random.fold_in(key, 1)
    metrics_path = workdir / "metrics.jsonl"
    lines = metrics_before(metrics_path, STAGE, start)
    board = TensorBoard(workdir, enabled=primary)
    interrupted = None
    try:
        with stop_requests() as stop, metrics_writer(metrics_path, primary) as out:
            out.writelines(json.dumps(x) + "\n" for x in lines)

            def emit(line: dict) -> None:
                out.write(json.dumps(line) + "\n")
                out.flush()
                board.write(line)
                lines.append(line)
                if "sft/eval_loss" in line:
                    log(_eval_text(line, sft.steps))

            if start == 0:
                emit({"stage": STAGE, "step": 0, **_scalars(eval_fn(state.params))})
            for i in range(start, sft.steps):
                state, metrics = step_fn(state, data.train, jax.random.fold_in(steps_key, i))
                line = {"stage": STAGE, "step": i + 1, **_scalars(metrics),
                        "sft/lr": float(lr(i))}
                if not math.isfinite(line["sft/objective"]):
                    raise FloatingPointError(f"sft: the loss at step {i + 1} is not finite "
                                             f"({line['sft/objective']}); lower sft.lr")
                final = i + 1 == sft.steps
                if (i + 1) % sft.eval_every == 0 or final:
                    line.update(_scalars(eval_fn(state.params)))
                emit(line)
                if (i + 1) % config.checkpoint.every == 0 or final or stop["signal"]:
                    ckpt.save(i + 1, state, no_users, key,
                              {"stage": STAGE, "step": i + 1, "done": final, **sizes})
                if stop["signal"] is not None and not final:
                    interrupted = signal.Signals(stop["signal"]).name
                    log(f"{interrupted}: saved sft step {i + 1}; rerun the command to resume")
                    break
        ckpt.wait()
    finally:
        ckpt.close()
        board.close()
    summary = _summary(lines, sft.steps, sizes)
    if interrupted:
        return {**summary, "interrupted": interrupted}
    if primary:
        (workdir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    show = lambda name: "n/a" if summary[name] is None else f"{summary[name]:.3f}"
    log(f"sft: held-out loss {show('eval_loss_first')} -> {show('eval_loss_last')}, next-item "
        f"accuracy {show('next_item_acc_first')} -> {show('next_item_acc_last')}")
    return summary


def load_sft_params(config: Config, workdir: str | pathlib.Path, like: Any = None) -> Any:
    """The SFT stage's final policy params (its latest checkpoint), for PPO to start from.

    `like`: params (or `jax.eval_shape` structs) of the policy's tree, e.g. Setup.params
    (default: build_setup(config).params); the result has that structure. A stage that has
    stopped before its last step (and before sft.steps) is a ValueError.
    """
    workdir = pathlib.Path(workdir)
    ckpt = _checkpointer(config, workdir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no SFT checkpoint in {ckpt.directory}: run the sft stage")
        if like is None:
            like = build_setup(config).params
        tx = make_sft_optimizer(config.sft)
        target = jax.eval_shape(lambda p: init_sft_state(p, tx), like)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              target)
        state, _, _, record = ckpt.restore(step, target, _no_users(), jax.random.key(0))
    finally:
        ckpt.close()
    if not record.get("done") and step < config.sft.steps:
        raise ValueError(f"the sft stage in {workdir} stopped at step {step} of "
                         f"sft.steps={config.sft.steps}: rerun it to finish")
    return state.params


__all__ = [
    "Histories",
    "SFTData",
    "SFTExamples",
    "SFTState",
    "NextItemExamples",
    "PtxRows",
    "SequenceExamples",
    "build_sft_data",
    "cut_examples",
    "draw_ptx",
    "ptx_rows",
    "evaluate",
    "first_items",
    "init_sft_state",
    "learning_rate",
    "load_sft_params",
    "make_sft_optimizer",
    "run_sft",
    "sft_loss",
    "sft_step",
    "split_users",
]

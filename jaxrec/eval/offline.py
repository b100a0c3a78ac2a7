"""Offline evaluation of an LM policy: item scores for ranking, and generative validity.

Shapes: U users, B users per call, P prompt tokens, C items scored per user, L the codec's
block length (tokens of the longest item), V vocabulary, K slate size.

In item-token mode (`codec.item_token_offset >= 0`, one token per item) an item's score is
log p(its token | prompt) under the softmax over the catalogue's tokens (`next_item_logits`):
one forward pass per user, the whole catalogue from one row of the head. Otherwise
an item's score for a user is log p(item's token block, then the terminator | prompt): the
summed log-probability of the tokens that name it as the first recommendation of a slate. The
terminator (the slate separator, or EOS for one-item slates) makes the scores a distribution
over whole items, so an item whose title is a prefix of another's is not favoured.

One prefill per user, then each of the user's C items is teacher-forced from that cache (the
cache rows are repeated C times): a user costs P + C x L tokens, not C x (P + L). The driver
pads users and items to fixed chunks, so the scorer compiles once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.codec import ItemCodec, decode_slate, history_mask, render_prompts, slate_constraint
from jaxrec.generation import Greedy, Temperature, generate
from jaxrec.models import (
    KVCache,
    ModelConfig,
    forward,
    forward_cached,
    init_cache,
    positions_from_valid,
    project_logits,
)


def terminator_of(codec: ItemCodec, slate_size: int) -> int:
    """The token that ends the first item of a slate of `slate_size`."""
    return int(codec.slate_sep_id if slate_size > 1 else codec.eos_id)


@functools.partial(jax.jit, static_argnums=(0, 5, 7))
def item_log_probs(
    cfg: ModelConfig,
    params,
    codec: ItemCodec,
    prompt: jax.Array,  # [B, P] int32, left padded
    prompt_valid: jax.Array,  # [B, P] bool
    terminator: int,
    items: jax.Array,  # [B, C] int32 catalogue ids
    length: int | None = None,  # L: block tokens fed (>= the longest item here; None: all)
) -> jax.Array:
    """[B, C] float32: log p(block of item, terminator | prompt) for each user's items."""
    b, p = prompt.shape
    c, blk = items.shape[1], length or codec.block_len
    s = p + blk
    key_valid = jnp.concatenate([prompt_valid, jnp.zeros((b, blk), jnp.bool_)], axis=1)
    positions = positions_from_valid(prompt_valid)  # [B, P]
    causal = jnp.arange(s)[None, :] <= jnp.arange(p)[:, None]  # [P, S]
    out = forward_cached(cfg, params, prompt, positions, causal[None] & key_valid[:, None, :],
                         init_cache(cfg, b, s), head="none", prefill=True, last_only=True)
    first_lp = jax.nn.log_softmax(project_logits(cfg, params, out.hidden)[:, 0])  # [B, V]

    blocks = codec.item_tokens[items][..., :blk]  # [B, C, L]
    lens = codec.item_len[items]  # [B, C]
    first = jnp.take_along_axis(first_lp, blocks[..., 0], axis=1)  # [B, C]

    # Teacher-force every block from its user's prompt cache: B * C rows.
    rows = lambda x: jnp.repeat(x, c, axis=0)  # [B, ...] -> [B * C, ...]
    cache = KVCache(layers=jax.tree.map(rows, out.cache.layers), index=out.cache.index)
    tokens = blocks.reshape(b * c, blk)
    j = jnp.arange(blk)
    pos = rows(positions[:, -1:]) + 1 + j[None, :]  # [B * C, L]
    own = j[None, :] <= j[:, None]  # [L, L] fed token j sees block tokens <= j
    mask = jnp.concatenate([jnp.broadcast_to(rows(prompt_valid)[:, None, :], (b * c, blk, p)),
                            jnp.broadcast_to(own, (b * c, blk, blk))], axis=2)  # [B*C, L, S]
    hidden = forward_cached(cfg, params, tokens, pos, mask, cache, head="none").hidden
    lp = jax.nn.log_softmax(project_logits(cfg, params, hidden))  # [B * C, L, V]

    n = lens.reshape(b * c, 1)  # [B * C, 1]
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # block token j + 1
    target = jnp.where(j[None, :] + 1 < n, nxt, jnp.where(j[None, :] + 1 == n, terminator, 0))
    picked = jnp.take_along_axis(lp, target[..., None], axis=2)[..., 0]  # [B * C, L]
    rest = jnp.sum(jnp.where(j[None, :] < n, picked, 0.0), axis=1)  # tokens 2.. and terminator
    return first + rest.reshape(b, c)


def item_logits(cfg: ModelConfig, params, hidden: jax.Array, codec: ItemCodec) -> jax.Array:
    """Item-token mode: hidden [..., D] -> [..., N] float32 logits of the catalogue's tokens
    only (the head's rows of items offset .. offset + N - 1; the rest of the vocabulary is
    never projected)."""
    lo, n = codec.item_token_offset, codec.num_items
    if lo < 0:
        raise ValueError("item_logits needs an item-token codec (model.items: tokens)")
    if cfg.tie_embeddings:
        rows = {"embed": jax.lax.dynamic_slice_in_dim(params["embed"], lo, n, axis=0)}
    else:
        kernel = params["lm_head"]["kernel"]  # [D, V]
        rows = {"lm_head": {**params["lm_head"],
                            "kernel": jax.lax.dynamic_slice_in_dim(kernel, lo, n, axis=1)}}
    shape = hidden.shape
    out = project_logits(cfg, rows, hidden.reshape(-1, 1, shape[-1]))  # [M, 1, N]
    return out.reshape(*shape[:-1], n)


@functools.partial(jax.jit, static_argnums=0)
def next_item_logits(cfg: ModelConfig, params, codec: ItemCodec, prompt: jax.Array,
                     prompt_valid: jax.Array) -> jax.Array:
    """Item-token mode: prompts [B, P] -> [B, N] float32 log p(item | prompt), a softmax over
    the catalogue's tokens at the prompt's last position (what the first slot of a slate is
    sampled from before the history is banned)."""
    hidden = forward(cfg, params, prompt, prompt_valid, head="none", keep_last=1).hidden
    return jax.nn.log_softmax(item_logits(cfg, params, hidden[:, 0], codec), axis=-1)


def _score_item_tokens(cfg, params, codec, histories, prompt_len, items, users_per_call):
    """score_items in item-token mode: one forward pass per user."""
    u = histories.shape[0]
    n_cols = codec.num_items if items is None else items.shape[1]
    out = np.empty((u, n_cols), np.float32)
    for lo, hi in _chunks(u, users_per_call):
        rows = np.arange(lo, lo + users_per_call).clip(max=u - 1)  # pad with the last user
        prompt, valid = render_prompts(codec, jnp.asarray(histories[rows]), prompt_len)
        scores = np.asarray(next_item_logits(cfg, params, codec, prompt, valid))  # [B, N]
        if items is not None:
            scores = np.take_along_axis(scores, np.asarray(items)[rows], axis=1)
        out[lo:hi] = scores[: hi - lo]
    return out


def _chunks(n: int, size: int):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _length_for(lens: np.ndarray, block_len: int) -> int:
    """Block tokens to feed for items of these lengths: their longest, rounded up to a
    multiple of 4 (fewer distinct shapes, so fewer compiles)."""
    return min(block_len, -(-int(lens.max()) // 4) * 4)


def _trimmed(prompt: jax.Array, valid: jax.Array, multiple: int = 32):
    """Left-padded prompts cut to the longest real one, rounded up to `multiple` columns:
    every block token attends to the prompt's keys, most of which are padding when titles
    are short (positions come from `valid`, so nothing else changes)."""
    p = prompt.shape[1]
    width = min(p, -(-int(np.asarray(valid).sum(axis=1).max()) // multiple) * multiple)
    return prompt[:, p - width:], valid[:, p - width:]


def score_items(
    cfg: ModelConfig,
    params,
    codec: ItemCodec,
    histories: np.ndarray,  # [U, H] int32 item ids, oldest first, -1 where absent
    prompt_len: int,
    slate_size: int,
    items: np.ndarray | None = None,  # [U, C] int32 per-user candidates; None: the catalogue
    *,
    users_per_call: int = 8,
    items_per_call: int = 256,
) -> np.ndarray:
    """[U, C] (or [U, N]) float32 item scores (see the module docstring), on device in fixed
    chunks of users x items; prompts rendered from the histories as in a rollout.

    For the whole catalogue, items are scored in order of block length, each chunk feeding
    only as many block tokens as its longest item needs (titles vary a lot in length: on
    ml-100k the longest takes 27 tokens, the mean 6), so padding costs little.
    """
    histories = np.asarray(histories, np.int32)
    if codec.item_token_offset >= 0:
        return _score_item_tokens(cfg, params, codec, histories, prompt_len, items,
                                  max(users_per_call, 64))
    u = histories.shape[0]
    lens = np.asarray(codec.item_len)
    full = items is None
    n_cols = codec.num_items if full else items.shape[1]
    per_call = min(items_per_call, n_cols)
    order = np.argsort(lens, kind="stable") if full else np.arange(n_cols)
    term = terminator_of(codec, slate_size)
    out = np.empty((u, n_cols), np.float32)
    for lo, hi in _chunks(u, users_per_call):
        rows = np.arange(lo, lo + users_per_call).clip(max=u - 1)  # pad with the last user
        prompt, valid = _trimmed(*render_prompts(codec, jnp.asarray(histories[rows]),
                                                 prompt_len))
        for c_lo, c_hi in _chunks(n_cols, per_call):
            cols = order[np.arange(c_lo, c_lo + per_call).clip(max=n_cols - 1)]  # pad the last
            chunk = (np.broadcast_to(cols, (len(rows), per_call)) if full
                     else np.asarray(items)[rows][:, cols])
            scores = item_log_probs(cfg, params, codec, prompt, valid, term,
                                    jnp.asarray(chunk, jnp.int32),
                                    _length_for(lens[chunk], codec.block_len))
            out[lo:hi, cols[: c_hi - c_lo]] = np.asarray(scores)[: hi - lo, : c_hi - c_lo]
    return out


def generative_validity(
    cfg: ModelConfig,
    params,
    codec: ItemCodec,
    histories: np.ndarray,  # [U, H] int32
    prompt_len: int,
    slate_size: int,
    key: jax.Array,
    *,
    constrained: bool,
    temperature: float = 1.0,
    users_per_call: int = 64,
) -> dict:
    """How often generated slates name real catalogue items.

    `item_valid_frac`: slate positions whose tokens spell a real item (any item: history items
    count as valid here); `slate_valid_frac`: slates of K valid, distinct items ending with EOS.
    Free generation shows what the LM learnt; with the constraint both must be exactly 1.
    """
    histories = np.asarray(histories, np.int32)
    u = histories.shape[0]
    sampler = Greedy() if temperature == 0 else Temperature(temperature)
    new_tokens = codec.slate_len(slate_size)
    valid_items, valid_slates = 0, 0
    for i, (lo, hi) in enumerate(_chunks(u, users_per_call)):
        rows = np.arange(lo, lo + users_per_call).clip(max=u - 1)
        item_ok, slate_ok = _generate_slates(
            cfg, params, codec, jnp.asarray(histories[rows]), jax.random.fold_in(key, i),
            prompt_len=prompt_len, slate_size=slate_size, sampler=sampler,
            new_tokens=new_tokens, constrained=constrained)
        valid_items += int(np.asarray(item_ok)[: hi - lo].sum())
        valid_slates += int(np.asarray(slate_ok)[: hi - lo].sum())
    return {
        "constrained": bool(constrained),
        "decoding": "greedy" if temperature == 0 else f"sampled (temperature {temperature:g})",
        "users": int(u),
        "item_valid_frac": valid_items / (u * slate_size),
        "slate_valid_frac": valid_slates / u,
    }


def generate_for_histories(cfg: ModelConfig, params, codec: ItemCodec, histories: jax.Array,
                           key: jax.Array, *, slate_size: int, prompt_len: int,
                           max_new_tokens: int, sampler, constrained: bool = True,
                           ban_history: bool = True):
    """(GenerationOutput, banned [B, N] bool or None): a slate generated for each history
    [B, H], as a rollout turn does it (prompts rendered on device, catalogue-constrained
    decoding with history items banned when `constrained`)."""
    prompt, valid = render_prompts(codec, histories, prompt_len)
    banned = history_mask(codec, histories) if ban_history else None
    constraint = None
    if constrained:
        constraint = slate_constraint(codec, slate_size, banned, cfg.vocab_size)
    out = generate(cfg, params, prompt, valid, key, sampler=sampler,
                   max_new_tokens=max_new_tokens, constraint=constraint,
                   eos_id=int(codec.eos_id))
    return out, banned


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "prompt_len", "slate_size", "sampler", "new_tokens", "constrained"))
def _generate_slates(cfg, params, codec, histories, key, *, prompt_len, slate_size, sampler,
                     new_tokens, constrained):
    """([B] valid items per slate, [B] whole slate valid) for one chunk of users."""
    out, _ = generate_for_histories(cfg, params, codec, histories, key, slate_size=slate_size,
                                    prompt_len=prompt_len, max_new_tokens=new_tokens,
                                    sampler=sampler, constrained=constrained)
    items, item_valid = decode_slate(codec, out.tokens, out.mask, slate_size, None)
    rows = jnp.arange(out.tokens.shape[0])
    last = out.tokens[rows, jnp.maximum(out.lengths - 1, 0)]
    ended = (out.lengths > 0) & (last == codec.eos_id)
    distinct = jnp.all(jnp.sort(items, axis=1)[:, 1:] != jnp.sort(items, axis=1)[:, :-1], axis=1)
    return item_valid.sum(axis=1), jnp.all(item_valid, axis=1) & distinct & ended


def recommend(
    cfg: ModelConfig,
    params,
    codec: ItemCodec,
    history: list[int] | np.ndarray,  # item ids, oldest first
    k: int,
    prompt_len: int,
    slate_size: int,
) -> list[tuple[int, float]]:
    """The top-k distinct catalogue items for one history by full-catalogue scoring, history
    items excluded: [(item, log-probability)], best first."""
    history = np.asarray(history, np.int32).reshape(1, -1)
    if history.size == 0:
        history = np.full((1, 1), -1, np.int32)
    scores = score_items(cfg, params, codec, history, prompt_len, slate_size,
                         users_per_call=1)[0].astype(np.float64)
    seen = history[history >= 0]
    scores[seen] = -math.inf
    k = min(int(k), int(np.isfinite(scores).sum()))
    top = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in top]

"""Items <-> tokens, on device: histories -> prompt tokens, generated tokens -> item ids.

Representation. Every item has a fixed block of tokens: the tokenisation of its text (the
title, plus a disambiguator where titles collide; see `item_texts`), or, in item-token mode,
one new vocabulary token per item (`add_item_tokens`, `item_token_codec`). Texts are built by
concatenating blocks, each encoded on its own, so rendering is a gather:

    prompt     = [BOS] prefix item_1 sep item_2 sep ... item_n suffix      (left padded to P)
    completion = item_1 ; item_2 ; ... ; item_K EOS                       (';' = slate_sep_id)

A completion ends every item block with a terminator token, the slate separator (one token)
after items 1..K-1 and EOS after item K, so even when one item's block is a prefix of
another's the text names exactly one item per slot.

The catalogue's blocks form a prefix tree (trie) stored as static-shaped arrays. Nodes are
numbered breadth first with each node's children sorted by token, so the children of node n
are the contiguous nodes [child_start[n], child_start[n + 1]) (a CSR layout without an edge
array: edge e leads to node e), and a child is found by a binary search over `node_token`.
The item whose block ends at node n is `node_end_item[n]` (its terminator edge, so every item
has a leaf). Items are ranked by the lexicographic order of their blocks, so the items below
any node are the ranks [node_lo[n], node_hi[n]): how many of them are still available (not
banned, not already in the slate) is two prefix-sum gathers and a K-way comparison, with no
per-row trie state. Per step, `SlateConstraint.allowed` scatters the usable children of each
row's node (at most `max_degree` of them) into a [B, V] mask.

Shapes: N items, L block length (longest block), M trie nodes, D max children of a node,
B batch, H history length, P prompt length, R completion length, K slate size, V vocabulary.
Host-side builders (`build_codec`, `codec_from_blocks`, `item_token_codec`) use numpy once;
everything else is jit-safe with static shapes.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.data.tokenizers import Tokenizer
from jaxrec.models import ModelConfig


@struct.dataclass
class ItemCodec:
    """The catalogue's token blocks, template tokens and prefix tree, as device arrays."""

    item_tokens: jax.Array  # [N, L] int32, each item's block, padded with pad_id
    item_len: jax.Array  # [N] int32, tokens in each block (>= 1)
    item_rank: jax.Array  # [N] int32, position of each item in the lexicographic order of blocks
    rank_item: jax.Array  # [N] int32, the item at each rank (inverse of item_rank)
    node_token: jax.Array  # [M] int32, token on the edge into each node (-1 at the root, node 0)
    child_start: jax.Array  # [M + 1] int32, node n's children: [child_start[n], child_start[n+1])
    node_end_item: jax.Array  # [M] int32, the item whose block ends at this node, or -1
    node_lo: jax.Array  # [M] int32, items below the node (its own included): ranks [lo, hi)
    node_hi: jax.Array  # [M] int32
    head_tokens: jax.Array  # [Hd] int32, BOS (if any) then the prompt prefix
    sep_tokens: jax.Array  # [S] int32, the separator between prompt items
    suffix_tokens: jax.Array  # [F] int32, after the last prompt item
    slate_sep_id: int = struct.field(pytree_node=False)  # terminator after items 1..K-1
    eos_id: int = struct.field(pytree_node=False)  # terminator after item K
    pad_id: int = struct.field(pytree_node=False)  # fills blocks, prompts and completions
    vocab_size: int = struct.field(pytree_node=False)  # every token id is < vocab_size
    max_degree: int = struct.field(pytree_node=False)  # D: most children of any node
    item_token_offset: int = struct.field(pytree_node=False)  # item i is token offset + i; -1: text

    @property
    def num_items(self) -> int:
        return self.item_tokens.shape[0]

    @property
    def block_len(self) -> int:
        return self.item_tokens.shape[1]

    @property
    def num_nodes(self) -> int:
        return self.node_token.shape[0]

    def slate_len(self, k: int) -> int:
        """Completion tokens that always hold a slate of k items (blocks + terminators)."""
        return k * (self.block_len + 1)

    def prompt_len(self, history: int) -> int:
        """Prompt tokens that always hold `history` items."""
        sizes = self.head_tokens.shape[0] + self.suffix_tokens.shape[0]
        return sizes + history * self.block_len + max(history - 1, 0) * self.sep_tokens.shape[0]


# ---------------------------------------------------------------------------------------------
# Host-side construction


def item_texts(
    titles: Sequence[str],
    years: Sequence[int | None] | None = None,
    ids: Sequence[int | str] | None = None,
) -> list[str]:
    """Item texts: the titles, with a disambiguator where two items share a title.

    Shared titles get " (year)" where that separates them from the others with that title,
    else " (#id)" (`ids` default to the item indices). MovieLens titles already end with the
    year, so its duplicates (same title, same year) get their ids.
    """
    titles = [str(t) for t in titles]
    n = len(titles)
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n or (years is not None and len(years) != n):
        raise ValueError(f"{n} titles but {len(ids)} ids / {len(years or [])} years")
    if len(set(map(str, ids))) != n:
        raise ValueError("item ids must be distinct")
    texts = list(titles)
    by_title = collections.defaultdict(list)
    for i, t in enumerate(titles):
        by_title[t].append(i)
    for group in by_title.values():
        if len(group) < 2:
            continue
        year_of = {i: None if years is None else years[i] for i in group}
        counts = collections.Counter(year_of.values())
        for i in group:
            y = year_of[i]
            texts[i] = (
                f"{titles[i]} ({y})" if y is not None and counts[y] == 1
                else f"{titles[i]} (#{ids[i]})"
            )
    # A text with a year may now equal another item's title: those fall back to their ids.
    seen = collections.Counter(texts)
    texts = [
        f"{titles[i]} (#{ids[i]})" if seen[t] > 1 and t != titles[i] else t
        for i, t in enumerate(texts)
    ]
    if len(set(texts)) != n:
        dup = [t for t, c in collections.Counter(texts).items() if c > 1][:5]
        raise ValueError(f"item texts are still not distinct after disambiguation: {dup}")
    return texts


def build_codec(
    titles: Sequence[str],
    tokenizer: Tokenizer,
    *,
    years: Sequence[int | None] | None = None,
    ids: Sequence[int | str] | None = None,
    prefix: str = "Watched:",
    separator: str = ";",
    suffix: str = ". Next:",
    item_prefix: str = " ",
    slate_separator: str | None = None,
    bos: bool = True,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> ItemCodec:
    """A codec from item titles and a tokenizer (host side, once).

    Each item's block is `tokenizer.encode(item_prefix + text)` with `text` from
    `item_texts(titles, years, ids)`. The prompt template is `prefix`, items joined by
    `separator`, then `suffix`, each encoded on its own; BOS leads when `bos` and the tokenizer
    has one. Slates join items with `slate_separator` (default: `separator`), which must encode
    to one token. `eos_id` / `pad_id` default to the tokenizer's (pad: EOS when it has none).
    For SentencePiece tokenizers that add a leading space themselves, pass item_prefix="".
    """
    texts = item_texts(titles, years, ids)
    blocks = [tokenizer.encode(item_prefix + t) for t in texts]
    # Different texts with the same tokens (a lossy tokenizer) would name two items: use ids.
    counts = collections.Counter(map(tuple, blocks))
    ids_ = list(range(len(texts))) if ids is None else list(ids)
    for i, b in enumerate(blocks):
        if counts[tuple(b)] > 1:
            blocks[i] = tokenizer.encode(f"{item_prefix}{texts[i]} (#{ids_[i]})")
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if eos < 0:
        raise ValueError("the tokenizer has no EOS token: pass eos_id")
    pad = (tokenizer.pad_id if tokenizer.pad_id >= 0 else eos) if pad_id is None else pad_id
    slate_sep = tokenizer.encode(separator if slate_separator is None else slate_separator)
    if len(slate_sep) != 1:
        raise ValueError(
            f"the slate separator must encode to exactly one token, got {slate_sep}: pass "
            "slate_separator= (e.g. ';' or '\\n')"
        )
    head = ([tokenizer.bos_id] if bos and tokenizer.bos_id >= 0 else []) + tokenizer.encode(prefix)
    return codec_from_blocks(
        blocks,
        head_tokens=head,
        sep_tokens=tokenizer.encode(separator),
        suffix_tokens=tokenizer.encode(suffix),
        slate_sep_id=slate_sep[0],
        eos_id=eos,
        pad_id=pad,
        vocab_size=tokenizer.vocab_size,
    )


def codec_from_blocks(
    blocks: Sequence[Sequence[int]],
    *,
    head_tokens: Sequence[int],
    sep_tokens: Sequence[int],
    suffix_tokens: Sequence[int],
    slate_sep_id: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int,
    item_token_offset: int = -1,
) -> ItemCodec:
    """A codec from per-item token blocks (host side): pads the blocks and builds the trie.

    Raises ValueError when two blocks are equal, a block is empty or holds EOS, or the slate
    separator would be ambiguous (an item's block followed by the separator token is also the
    start of another item's block).
    """
    blocks = [[int(t) for t in b] for b in blocks]
    n = len(blocks)
    if n == 0:
        raise ValueError("the catalogue is empty")
    if any(len(b) == 0 for b in blocks):
        raise ValueError(f"items {[i for i, b in enumerate(blocks) if not b][:5]} have no tokens")
    if len(set(map(tuple, blocks))) != n:
        raise ValueError("two items have the same token block")
    if any(eos_id in b for b in blocks):
        raise ValueError(f"an item block holds the EOS token {eos_id}")
    every = [t for b in blocks for t in b] + list(head_tokens) + list(sep_tokens)
    every += list(suffix_tokens) + [slate_sep_id, eos_id, pad_id]
    vocab_size = max(vocab_size, max(every) + 1)
    if min(every) < 0:
        raise ValueError("token ids must be >= 0")

    # Ranks: lexicographic order of blocks (a block sorts before the blocks it prefixes).
    order = sorted(range(n), key=lambda i: blocks[i])
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(n, dtype=np.int32)

    # The trie as nested dicts, then renumbered breadth first with children sorted by token.
    children: list[dict[int, int]] = [{}]
    end_item = [-1]
    for i, b in enumerate(blocks):
        node = 0
        for t in b:
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(children)
                children[node][t] = nxt
                children.append({})
                end_item.append(-1)
            node = nxt
        end_item[node] = i
    m = len(children)
    new_id = np.zeros(m, np.int64)
    bfs = [0]  # old ids in the new order
    node_token = [-1]
    parent = [-1]
    child_start = []
    for new, old in enumerate(bfs):  # bfs grows while it is walked
        child_start.append(len(bfs))
        for t in sorted(children[old]):
            new_id[children[old][t]] = len(bfs)
            bfs.append(children[old][t])
            node_token.append(t)
            parent.append(new)
    child_start.append(m)
    node_end_item = np.asarray([end_item[old] for old in bfs], np.int32)
    max_degree = max(len(c) for c in children)

    lo = np.full(m, n, np.int64)
    hi = np.zeros(m, np.int64)
    for i, b in enumerate(blocks):
        node = 0
        path = [0]
        for t in b:
            node = children[node][t]
            path.append(node)
        ids = new_id[path]
        lo[ids] = np.minimum(lo[ids], rank[i])
        hi[ids] = np.maximum(hi[ids], rank[i] + 1)
    # Each subtree's ranks must be contiguous: the availability counts rely on it.
    below = (node_end_item >= 0).astype(np.int64)
    for node in range(m - 1, 0, -1):  # children have larger ids than their parents
        below[parent[node]] += below[node]
    assert np.array_equal(hi - lo, below), "trie ranks are not contiguous"

    for old in bfs:
        if end_item[old] >= 0 and slate_sep_id in children[old]:
            longer = [i for i, b in enumerate(blocks) if b[: len(blocks[end_item[old]]) + 1]
                      == blocks[end_item[old]] + [slate_sep_id]][:3]
            raise ValueError(
                f"slate separator {slate_sep_id} is ambiguous: item {end_item[old]}'s block "
                f"followed by it starts items {longer}; choose another separator"
            )

    width = max(len(b) for b in blocks)
    tokens = np.full((n, width), pad_id, np.int32)
    for i, b in enumerate(blocks):
        tokens[i, : len(b)] = b

    def arr(x):
        return jnp.asarray(np.asarray(x, np.int32).reshape(-1))

    return ItemCodec(
        item_tokens=jnp.asarray(tokens),
        item_len=arr([len(b) for b in blocks]),
        item_rank=arr(rank),
        rank_item=arr(order),
        node_token=arr(node_token),
        child_start=arr(child_start),
        node_end_item=arr(node_end_item),
        node_lo=arr(lo),
        node_hi=arr(hi),
        head_tokens=arr(head_tokens),
        sep_tokens=arr(sep_tokens),
        suffix_tokens=arr(suffix_tokens),
        slate_sep_id=int(slate_sep_id),
        eos_id=int(eos_id),
        pad_id=int(pad_id),
        vocab_size=int(vocab_size),
        max_degree=int(max_degree),
        item_token_offset=int(item_token_offset),
    )


# ---------------------------------------------------------------------------------------------
# Item-token mode


def add_item_tokens(
    cfg: ModelConfig, params: dict, codec: ItemCodec
) -> tuple[ModelConfig, dict, int]:
    """Append one token per item to the model's vocabulary: (cfg, params, item_token_offset).

    Item i becomes token `item_token_offset + i` (offset = the old `cfg.vocab_size`). Its
    `embed` row (and, untied, its `lm_head/kernel` column) starts at the mean of the rows of
    the item's text tokens in `codec` (a text-mode codec). Pass the offset to
    `item_token_codec` for the codec of that mode.
    """
    if codec.item_token_offset >= 0:
        raise ValueError("add_item_tokens needs a text-mode codec (its blocks are the titles)")
    v = cfg.vocab_size
    if codec.vocab_size > v:
        raise ValueError(f"the codec's tokens reach {codec.vocab_size} > model vocab {v}")
    width = codec.block_len
    weights = (jnp.arange(width)[None, :] < codec.item_len[:, None]).astype(jnp.float32)
    weights = weights / codec.item_len[:, None].astype(jnp.float32)  # [N, L] mean over the block

    def mean_rows(table):  # table [V, D] -> [N, D]
        rows = table[codec.item_tokens].astype(jnp.float32)  # [N, L, D]
        return jnp.einsum("nl,nld->nd", weights, rows).astype(table.dtype)

    params = dict(params)
    params["embed"] = jnp.concatenate([params["embed"], mean_rows(params["embed"])], axis=0)
    if not cfg.tie_embeddings:
        kernel = params["lm_head"]["kernel"]  # [D, V]
        new = mean_rows(kernel.T).T  # [D, N]
        params["lm_head"] = dict(params["lm_head"], kernel=jnp.concatenate([kernel, new], 1))
    return cfg.replace(vocab_size=v + codec.num_items), params, v


def item_token_codec(codec: ItemCodec, item_token_offset: int, *,
                     sequence_template: bool = False) -> ItemCodec:
    """The codec in item-token mode: item i is the single token `item_token_offset + i`
    (block length 1, then its terminator).

    The prompt template is unchanged, or with `sequence_template` the history is written the
    way a slate is: every item followed by the slate separator, ending the prompt
    (`[BOS] prefix i_1 ; i_2 ; ... ; i_n ;`). A history and its continuation are then one
    sequence, so next-item prediction at every position of it (`jaxrec.train.sft`) trains the
    same distributions that decoding a slate after the prompt samples from.
    """
    n = codec.num_items
    sep = [codec.slate_sep_id] if sequence_template else np.asarray(codec.sep_tokens)
    suffix = [codec.slate_sep_id] if sequence_template else np.asarray(codec.suffix_tokens)
    return codec_from_blocks(
        [[item_token_offset + i] for i in range(n)],
        head_tokens=np.asarray(codec.head_tokens),
        sep_tokens=np.asarray(sep, np.int32),
        suffix_tokens=np.asarray(suffix, np.int32),
        slate_sep_id=codec.slate_sep_id,
        eos_id=codec.eos_id,
        pad_id=codec.pad_id,
        vocab_size=max(codec.vocab_size, item_token_offset + n),
        item_token_offset=item_token_offset,
    )


# ---------------------------------------------------------------------------------------------
# Rendering (device)


def _compact(items: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move the kept entries of each row to the front, in order: ([B, H] with -1 after, [B])."""
    b, h = items.shape
    slot = jnp.cumsum(keep, axis=1) - 1  # [B, H]
    slot = jnp.where(keep, slot, h)  # dropped entries write out of bounds
    rows = jnp.arange(b)[:, None]
    out = jnp.full((b, h), -1, jnp.int32).at[rows, slot].set(items, mode="drop")
    return out, keep.sum(axis=1).astype(jnp.int32)


def _segment_of(starts: jax.Array, pos: jax.Array) -> jax.Array:
    """For sorted starts [B, H] and positions [P]: index of the last start <= pos, [B, P]."""
    find = jax.vmap(lambda s: jnp.searchsorted(s, pos, side="right"))
    return find(starts).astype(jnp.int32) - 1


def render_prompts(
    codec: ItemCodec, histories: jax.Array, prompt_len: int
) -> tuple[jax.Array, jax.Array]:
    """Histories -> prompt tokens, left padded: (tokens [B, P] int32, valid [B, P] bool).

    histories: [B, H] int32 item ids, oldest first, -1 where absent (anywhere in the row).
    The prompt is head (BOS, prefix), the items joined by the separator, then the suffix.
    When they do not all fit, the most recent items that fit are kept (whole items only).
    """
    b, h = histories.shape
    p = int(prompt_len)
    hd, s, f = (x.shape[0] for x in (codec.head_tokens, codec.sep_tokens, codec.suffix_tokens))
    if hd + f > p:
        raise ValueError(f"prompt_len={p} cannot hold the template ({hd} + {f} tokens)")
    present = histories >= 0  # [B, H]
    item = jnp.where(present, histories, 0)
    cost = jnp.where(present, codec.item_len[item] + s, 0)  # [B, H] block + its separator
    after = jnp.cumsum(cost[:, ::-1], axis=1)[:, ::-1]  # [B, H] tokens of item j and all later
    keep = present & (after - s + hd + f <= p)  # most recent first: a suffix of the row
    items, n = _compact(histories.astype(jnp.int32), keep)  # [B, H], [B]
    lens = jnp.where(items >= 0, codec.item_len[jnp.maximum(items, 0)], 0)  # [B, H]
    seg = jnp.where(items >= 0, lens + s, 0)  # [B, H]
    body = seg.sum(axis=1) - jnp.where(n > 0, s, 0)  # [B] item tokens and separators
    base = p - f - body  # [B] where the first item starts
    starts = base[:, None] + jnp.cumsum(seg, axis=1) - seg  # [B, H]
    starts = jnp.where(items >= 0, starts, p + 1)  # absent slots sort last

    pos = jnp.arange(p, dtype=jnp.int32)  # [P]
    j = jnp.clip(_segment_of(starts, pos), 0, h - 1)  # [B, P] item slot of each position
    slot_item = jnp.take_along_axis(items, j, axis=1)  # [B, P]
    off = pos[None, :] - jnp.take_along_axis(starts, j, axis=1)  # [B, P] offset in the slot
    slot_len = jnp.take_along_axis(lens, j, axis=1)  # [B, P]
    in_block = off < slot_len
    block_tok = codec.item_tokens[
        jnp.maximum(slot_item, 0), jnp.clip(off, 0, codec.block_len - 1)
    ]  # [B, P]
    sep_tok = codec.sep_tokens[jnp.clip(off - slot_len, 0, max(s - 1, 0))] if s else block_tok
    body_tok = jnp.where(in_block, block_tok, sep_tok)  # [B, P]

    suffix_at = p - f
    head_at = base - hd  # [B]
    suf_tok = codec.suffix_tokens[jnp.clip(pos - suffix_at, 0, max(f - 1, 0))] if f else None
    head_tok = codec.head_tokens[jnp.clip(pos[None, :] - head_at[:, None], 0, max(hd - 1, 0))]
    tokens = body_tok
    if hd:
        tokens = jnp.where(pos[None, :] < base[:, None], head_tok, tokens)
    if f:
        tokens = jnp.where(pos[None, :] >= suffix_at, suf_tok[None, :], tokens)
    valid = pos[None, :] >= head_at[:, None]  # [B, P]
    tokens = jnp.where(valid, tokens, codec.pad_id).astype(jnp.int32)
    return tokens, valid


def render_slates(
    codec: ItemCodec, slates: jax.Array, length: int
) -> tuple[jax.Array, jax.Array]:
    """Slates -> completion tokens, right padded: (tokens [B, R] int32, mask [B, R] bool).

    slates: [B, K] int32 item ids (-1 entries are skipped). Each item's block is followed by
    the slate separator, the last by EOS; a completion longer than R is cut at R (use
    `codec.slate_len(K)` for R). The inverse of `decode_slate`; the targets of SFT.
    """
    b, k = slates.shape
    r = int(length)
    items, n = _compact(slates.astype(jnp.int32), slates >= 0)  # [B, K]
    lens = jnp.where(items >= 0, codec.item_len[jnp.maximum(items, 0)], 0)  # [B, K]
    seg = jnp.where(items >= 0, lens + 1, 0)  # block + terminator
    starts = jnp.cumsum(seg, axis=1) - seg  # [B, K]
    starts = jnp.where(items >= 0, starts, r + 1)
    total = seg.sum(axis=1)  # [B]
    pos = jnp.arange(r, dtype=jnp.int32)
    j = jnp.clip(_segment_of(starts, pos), 0, k - 1)  # [B, R]
    slot_item = jnp.take_along_axis(items, j, axis=1)
    off = pos[None, :] - jnp.take_along_axis(starts, j, axis=1)
    slot_len = jnp.take_along_axis(lens, j, axis=1)
    block_tok = codec.item_tokens[
        jnp.maximum(slot_item, 0), jnp.clip(off, 0, codec.block_len - 1)
    ]
    term = jnp.where(j == n[:, None] - 1, codec.eos_id, codec.slate_sep_id)  # [B, R]
    tokens = jnp.where(off < slot_len, block_tok, term)
    mask = pos[None, :] < total[:, None]
    return jnp.where(mask, tokens, codec.pad_id).astype(jnp.int32), mask


# ---------------------------------------------------------------------------------------------
# Trie walking (device)


def _child(codec: ItemCodec, node: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The child of `node` [B] along `token` [B]: (child [B] int32, found [B] bool).

    Binary search over the node's children, which are contiguous and sorted by token.
    """
    lo = codec.child_start[node]  # [B]
    end = codec.child_start[node + 1]  # [B]
    hi = end
    last = codec.num_nodes - 1
    for _ in range(max(1, math.ceil(math.log2(codec.max_degree + 1)))):  # lower bound
        active = lo < hi
        mid = (lo + hi) // 2
        right = codec.node_token[jnp.minimum(mid, last)] < token
        lo = jnp.where(active & right, mid + 1, lo)
        hi = jnp.where(active & ~right, mid, hi)
    found = (lo < end) & (codec.node_token[jnp.minimum(lo, last)] == token)
    return jnp.where(found, lo, 0).astype(jnp.int32), found


def decode_slate(
    codec: ItemCodec,
    tokens: jax.Array,
    mask: jax.Array,
    k: int,
    banned: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Completion tokens -> (items [B, K] int32, -1 where invalid; valid [B, K] bool).

    tokens, mask: [B, R] (mask False after a row's end). The trie is walked token by token;
    the slate separator or EOS closes a slot with the item whose block just ended. A slot is
    invalid when its tokens are not exactly some item's block (an unknown or non-canonical
    tokenisation), when it repeats an earlier item of the slate, when `banned` [B, N] bool
    marks it, or when the completion ends (EOS, mask, R) before K items. A separator always
    closes a slot, so a bad item leaves the later ones in place; items after the K-th and
    tokens after EOS are ignored.
    """
    b, _ = tokens.shape
    rows = jnp.arange(b)
    sep, eos = codec.slate_sep_id, codec.eos_id

    def step(carry, x):
        node, count, dead, done, items = carry
        tok, m = x  # [B], [B]
        live = m & ~done
        child, found = _child(codec, node, tok)
        advance = live & ~dead & found & (tok != eos)
        closes = live & ~advance & ((tok == sep) | (tok == eos))
        open_ = dead | (node != 0)  # the slot holds tokens
        record = closes & ((tok == sep) | open_)  # a bare EOS after a separator adds no slot
        ended = jnp.where(dead, -1, codec.node_end_item[node])  # [B]
        items = items.at[rows, jnp.where(record, count, k)].set(ended, mode="drop")
        count = count + record
        node = jnp.where(advance, child, jnp.where(closes, 0, node))
        dead = jnp.where(closes, False, dead | (live & ~advance))
        done = done | ~m | (live & (tok == eos))
        return (node, count, dead, done, items), None

    init = (
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), jnp.bool_),
        jnp.zeros((b,), jnp.bool_),
        jnp.full((b, k), -1, jnp.int32),
    )
    xs = (tokens.astype(jnp.int32).T, mask.astype(jnp.bool_).T)  # [R, B] each
    (_, _, _, _, items), _ = jax.lax.scan(step, init, xs)
    valid = items >= 0
    earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)  # [K, K] j < i
    repeat = jnp.any((items[:, :, None] == items[:, None, :]) & earlier & valid[:, None, :], -1)
    valid = valid & ~repeat
    if banned is not None:
        valid = valid & ~jnp.take_along_axis(banned, jnp.maximum(items, 0), axis=1)
    return jnp.where(valid, items, -1), valid


# ---------------------------------------------------------------------------------------------
# Catalogue-constrained decoding


@struct.dataclass
class SlateState:
    node: jax.Array  # [B] int32, trie node of the item being spelled (0: between items)
    count: jax.Array  # [B] int32, items completed so far
    chosen: jax.Array  # [B, K] int32, the completed items (-1 after count)
    banned_before: jax.Array  # [B, N + 1] int32, banned items among ranks [0, r)
    done: jax.Array  # [B] bool, the row emitted EOS


@struct.dataclass
class SlateConstraint:
    """Allowed tokens for spelling K distinct catalogue items (a generation TokenConstraint).

    At a trie node the allowed tokens are the children that lead to at least one item that is
    neither banned nor already in the slate, plus the terminator (slate separator, or EOS for
    the K-th item) when such an item ends at the node. After K items only EOS is allowed, and
    so is EOS when nothing else is (the catalogue ran out), so a row always ends.
    """

    codec: ItemCodec
    banned: jax.Array | None  # [B, N] bool, items never to recommend (e.g. the history), or None
    k: int = struct.field(pytree_node=False)  # items per slate
    vocab_size: int = struct.field(pytree_node=False)  # V of the model's logits (>= the codec's)

    def init(self, batch: int) -> SlateState:
        n = self.codec.num_items
        if self.banned is None:
            before = jnp.zeros((batch, n + 1), jnp.int32)
        else:
            if self.banned.shape != (batch, n):
                raise ValueError(f"banned has shape {self.banned.shape}, expected {(batch, n)}")
            ranked = self.banned[:, self.codec.rank_item].astype(jnp.int32)  # [B, N] rank order
            before = jnp.pad(jnp.cumsum(ranked, axis=1), ((0, 0), (1, 0)))  # [B, N + 1]
        return SlateState(
            node=jnp.zeros((batch,), jnp.int32),
            count=jnp.zeros((batch,), jnp.int32),
            chosen=jnp.full((batch, self.k), -1, jnp.int32),
            banned_before=before,
            done=jnp.zeros((batch,), jnp.bool_),
        )

    def _free(self, state: SlateState, lo: jax.Array, hi: jax.Array) -> jax.Array:
        """Available items among ranks [lo, hi): lo, hi [B, X] -> [B, X] int32."""
        c = self.codec
        banned = (jnp.take_along_axis(state.banned_before, hi, axis=1)
                  - jnp.take_along_axis(state.banned_before, lo, axis=1))
        chosen_rank = jnp.where(
            state.chosen >= 0, c.item_rank[jnp.maximum(state.chosen, 0)], c.num_items
        )[:, None, :]  # [B, 1, K]
        taken = ((chosen_rank >= lo[..., None]) & (chosen_rank < hi[..., None])).sum(-1)
        return hi - lo - banned - taken  # chosen items are never banned ones

    def allowed(self, state: SlateState) -> jax.Array:
        c = self.codec
        b = state.node.shape[0]
        v = self.vocab_size
        rows = jnp.arange(b)[:, None]
        start = c.child_start[state.node]  # [B]
        degree = c.child_start[state.node + 1] - start  # [B]
        slot = jnp.arange(c.max_degree, dtype=jnp.int32)
        child = jnp.minimum(start[:, None] + slot, c.num_nodes - 1)  # [B, D]
        usable = (slot < degree[:, None]) & (self._free(state, c.node_lo[child], c.node_hi[child])
                                             > 0)  # [B, D]
        tok = jnp.where(usable, c.node_token[child], v)  # [B, D], v: dropped
        mask = jnp.zeros((b, v), jnp.bool_).at[rows, tok].set(True, mode="drop")  # [B, V]

        end = c.node_end_item[state.node]  # [B]
        r = c.item_rank[jnp.maximum(end, 0)][:, None]  # [B, 1]
        can_end = (end >= 0) & (self._free(state, r, r + 1)[:, 0] > 0)
        term = jnp.where(state.count >= self.k - 1, c.eos_id, c.slate_sep_id)  # [B]
        mask = mask.at[rows[:, 0], jnp.where(can_end, term, v)].set(True, mode="drop")

        only_eos = jax.nn.one_hot(c.eos_id, v, dtype=jnp.bool_)[None, :]  # [1, V]
        stop = state.done | (state.count >= self.k) | ~jnp.any(mask, axis=1)  # [B]
        return jnp.where(stop[:, None], only_eos, mask)

    def update(self, state: SlateState, tokens: jax.Array) -> SlateState:
        c = self.codec
        b = state.node.shape[0]
        tokens = tokens.astype(jnp.int32)
        live = ~state.done & (state.count < self.k)
        child, found = _child(c, state.node, tokens)
        advance = live & found & (tokens != c.eos_id)
        end = c.node_end_item[state.node]
        closes = (live & ~advance & (end >= 0)
                  & ((tokens == c.slate_sep_id) | (tokens == c.eos_id)))
        chosen = state.chosen.at[jnp.arange(b), jnp.where(closes, state.count, self.k)].set(
            end, mode="drop"
        )
        return state.replace(
            node=jnp.where(advance, child, jnp.where(closes, 0, state.node)),
            count=state.count + closes,
            chosen=chosen,
            done=state.done | (tokens == c.eos_id),
        )


def slate_constraint(
    codec: ItemCodec,
    k: int,
    banned: jax.Array | None = None,
    vocab_size: int | None = None,
) -> SlateConstraint:
    """The TokenConstraint for slates of `k` distinct items, none of them `banned` [B, N].

    `vocab_size` is the model's (default: the codec's); it may exceed the tokenizer's.
    """
    v = codec.vocab_size if vocab_size is None else int(vocab_size)
    if v < codec.vocab_size:
        raise ValueError(f"vocab_size={v} is smaller than the codec's {codec.vocab_size}")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    return SlateConstraint(codec=codec, banned=banned, k=int(k), vocab_size=v)


def history_mask(codec: ItemCodec, histories: jax.Array) -> jax.Array:
    """Histories [B, H] (-1 padding) -> [B, N] bool, True for items in the history."""
    b, _ = histories.shape
    idx = jnp.where(histories >= 0, histories, codec.num_items)
    return jnp.zeros((b, codec.num_items), jnp.bool_).at[jnp.arange(b)[:, None], idx].set(
        True, mode="drop"
    )


__all__ = [
    "ItemCodec",
    "SlateConstraint",
    "SlateState",
    "add_item_tokens",
    "build_codec",
    "codec_from_blocks",
    "decode_slate",
    "history_mask",
    "item_texts",
    "item_token_codec",
    "render_prompts",
    "render_slates",
    "slate_constraint",
]

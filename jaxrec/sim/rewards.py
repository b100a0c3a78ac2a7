"""Reward presets: what one user's step earned, as pure functions of its outcome.

Every preset has the signature

    reward, terms = preset(response, slate, catalogue, history, weights, popularity=None)

over ONE user (callers vmap):

    response    Response of the step (clicked, item, watch_time, rating, liked)
    slate       [K] int32 catalogue ids shown; -1 (or any id outside [0, N)) is an invalid entry
    catalogue   Catalogue (features, topic, price, bid are used)
    history     [H] int32 the user's history BEFORE this step, -1 padded
    weights     RewardWeights (a pytree: changing a weight never recompiles)
    popularity  [N] float32 in [0, 1] or None (then every item counts as unpopular)

and returns `reward` [] float32 and `terms`, a dict of the UNWEIGHTED quantities (each [] float32)
that the weights multiply, for logging.

All presets share the same extras on top of their base term:

    reward = base + w_div * diversity + w_nov * novelty
                  - w_inv * n_invalid - w_dup * n_duplicate - w_seen * n_seen

    diversity   = #{valid pairs i < j with topic_i != topic_j} / max(1, #{valid pairs i < j})
    novelty     = c * [item not in history] * (1 - popularity[item])
    n_invalid   = #{slots k: slate_k outside [0, N)}
    n_duplicate = #{valid slots k: slate_k == slate_j for some j < k}
    n_seen      = #{valid slots k: slate_k in history}

with c = 1 if the user clicked. The three bases are documented on `content`, `products` and
`ads`. Weights default to zero except where `default_weights` says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.sim.core import Catalogue, Response

PRESETS = ("content", "products", "ads")


@struct.dataclass
class RewardWeights:
    """Reward weights; every field is a leaf, so they can change between calls without a
    recompile. Units follow the world: watch time in its length unit, price and bid in money."""

    click: float = 0.0  # every preset: per click
    watch: float = 0.0  # content: per unit of watch time
    like: float = 0.0  # content: per like
    conversion: float = 0.0  # products: per unit of price of a purchase (a liked click)
    bid: float = 0.0  # ads: per unit of bid of a click at or above the relevance floor
    relevance_floor: float = 0.0  # ads: relevance (cosine, in [-1, 1]) a click must reach to pay
    irrelevant: float = 0.0  # ads: penalty per click below the relevance floor
    diversity: float = 0.0  # bonus per unit of intra-slate topic diversity (in [0, 1])
    novelty: float = 0.0  # bonus per unit of novelty of the clicked item (in [0, 1])
    invalid: float = 0.0  # penalty per invalid slate entry
    duplicate: float = 0.0  # penalty per slate entry that repeats an earlier entry
    seen: float = 0.0  # penalty per slate entry already in the user's history


_DEFAULTS = {
    # Watch time dominates; a like adds a little (an explicit signal of satisfaction).
    "content": dict(watch=0.1, like=0.5),
    # Revenue: a purchase pays its price; 0.05 makes a typical 20-unit purchase worth 1.
    "products": dict(conversion=0.05),
    # Revenue per click at the bid, but only for ads relevant to the user.
    "ads": dict(bid=1.0, relevance_floor=0.25, irrelevant=0.5),
}
_COMMON = dict(invalid=1.0, duplicate=0.5)


def default_weights(preset: str, **changes: float) -> RewardWeights:
    """The preset's default weights, with `changes` (field=value) applied."""
    _check(preset)
    fields = {**_COMMON, **_DEFAULTS[preset], **changes}
    names = {f.name for f in dataclasses.fields(RewardWeights)}
    bad = sorted(set(fields) - names)
    if bad:
        raise ValueError(f"reward weights {bad} are unknown; choose from {sorted(names)}")
    return RewardWeights(**{k: float(v) for k, v in fields.items()})


def as_weights(preset: str, weights: RewardWeights | dict | None) -> RewardWeights:
    """RewardWeights from None (the preset's defaults), a dict of changes, or weights as is."""
    if weights is None:
        return default_weights(preset)
    if isinstance(weights, dict):
        return default_weights(preset, **weights)
    if isinstance(weights, RewardWeights):
        return weights
    raise TypeError(f"reward weights must be RewardWeights, a dict or None, not {type(weights)}")


# --- shared pieces ---------------------------------------------------------------------------


def slate_validity(slate: jax.Array, n_items: int) -> jax.Array:
    """[K] bool: entries that name a catalogue item."""
    return (slate >= 0) & (slate < n_items)


def in_history(items: jax.Array, history: jax.Array) -> jax.Array:
    """[...] bool: each id appears in history [H]; -1 (padding) never matches a valid id."""
    return jnp.any((items[..., None] == history) & (history >= 0), axis=-1)


def slate_view(slate: jax.Array, n_items: int, history: jax.Array):
    """A recommended slate [K] as a simulator reads it: (slate int32, valid, safe ids, seen).

    `safe` clips invalid entries into range for gathers (their utility must be masked by
    `valid`); `seen` marks items already in the user's history [H]."""
    slate = slate.astype(jnp.int32)
    return (slate, slate_validity(slate, n_items), jnp.clip(slate, 0, n_items - 1),
            in_history(slate, history))


def push_history(history: jax.Array, item: jax.Array, clicked: jax.Array) -> jax.Array:
    """[H] history, oldest first: on a click, drop the oldest and append `item`."""
    return jnp.where(clicked, jnp.roll(history, -1).at[-1].set(item), history)


def duplicates(slate: jax.Array, valid: jax.Array) -> jax.Array:
    """[K] bool: valid entries equal to some earlier valid entry of the slate."""
    k = slate.shape[0]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [K, K] j < i
    same = (slate[:, None] == slate[None, :]) & valid[:, None] & valid[None, :]
    return jnp.any(same & earlier, axis=-1)


def topic_diversity(slate: jax.Array, valid: jax.Array, topic: jax.Array) -> jax.Array:
    """Share of valid slate pairs (i < j) whose main topics differ; 0 with under two items."""
    k = slate.shape[0]
    t = topic[jnp.clip(slate, 0, topic.shape[0] - 1)]  # [K]
    pairs = jnp.triu(jnp.ones((k, k), bool), 1) & valid[:, None] & valid[None, :]  # [K, K]
    differ = pairs & (t[:, None] != t[None, :])
    return jnp.sum(differ).astype(jnp.float32) / jnp.maximum(jnp.sum(pairs), 1).astype(jnp.float32)


def relevance(item: jax.Array, history: jax.Array, features: jax.Array) -> jax.Array:
    """Cosine between an item's features and the mean features of the history's items.

    The history is what the policy sees too, so relevance is judged on observable taste.
    An empty history has no taste: relevance 0.
    """
    n = features.shape[0]
    valid = (history >= 0).astype(features.dtype)  # [H]
    hist = features[jnp.clip(history, 0, n - 1)] * valid[:, None]  # [H, F]
    taste = jnp.sum(hist, axis=0) / jnp.maximum(jnp.sum(valid), 1.0)  # [F]
    f = features[jnp.clip(item, 0, n - 1)]  # [F]
    denom = jnp.linalg.norm(f) * jnp.linalg.norm(taste)
    return jnp.where(denom > 0, jnp.dot(f, taste) / jnp.maximum(denom, 1e-12), 0.0)


def _extras(response, slate, catalogue, history, weights, popularity):
    """(bonus - penalty, terms) shared by every preset."""
    n = catalogue.size
    valid = slate_validity(slate, n)
    clicked = response.clicked.astype(jnp.float32)
    item = jnp.clip(response.item, 0, n - 1)
    pop = 0.0 if popularity is None else popularity[item]
    novel = (~in_history(response.item, history)).astype(jnp.float32)
    terms = {
        "diversity": topic_diversity(slate, valid, catalogue.topic),
        "novelty": clicked * novel * (1.0 - pop),
        "invalid": jnp.sum(~valid).astype(jnp.float32),
        "duplicate": jnp.sum(duplicates(slate, valid)).astype(jnp.float32),
        "seen": jnp.sum(valid & in_history(slate, history)).astype(jnp.float32),
    }
    value = (
        weights.diversity * terms["diversity"]
        + weights.novelty * terms["novelty"]
        - weights.invalid * terms["invalid"]
        - weights.duplicate * terms["duplicate"]
        - weights.seen * terms["seen"]
    )
    return value, terms


def _finish(base, base_terms, response, slate, catalogue, history, weights, popularity):
    extra, terms = _extras(response, slate, catalogue, history, weights, popularity)
    terms = {**base_terms, **terms, "base": base}
    terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
    return jnp.asarray(base + extra, jnp.float32), terms


# --- presets ---------------------------------------------------------------------------------


def content(
    response: Response,
    slate: jax.Array,
    catalogue: Catalogue,
    history: jax.Array,
    weights: RewardWeights,
    popularity: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Engagement (videos, articles, music): watch time first.

        base = w_click * c + w_watch * watch_time + w_like * liked

    plus the shared extras (module docstring).
    """
    c = response.clicked.astype(jnp.float32)
    liked = (response.clicked & response.liked).astype(jnp.float32)
    watch = c * response.watch_time
    base = weights.click * c + weights.watch * watch + weights.like * liked
    return _finish(base, {"click": c, "watch": watch, "like": liked},
                   response, slate, catalogue, history, weights, popularity)


def products(
    response: Response,
    slate: jax.Array,
    catalogue: Catalogue,
    history: jax.Array,
    weights: RewardWeights,
    popularity: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Commerce: conversions weighted by price.

        base = w_click * c + w_conversion * price[item] * bought,   bought = c * liked

    A simulated user has no separate purchase decision: a click is a product view and a
    like after it (rating at or above the world's like threshold) is the purchase.
    """
    c = response.clicked.astype(jnp.float32)
    bought = (response.clicked & response.liked).astype(jnp.float32)
    price = catalogue.price[jnp.clip(response.item, 0, catalogue.size - 1)]
    revenue = bought * price
    base = weights.click * c + weights.conversion * revenue
    return _finish(base, {"click": c, "conversion": bought, "revenue": revenue},
                   response, slate, catalogue, history, weights, popularity)


def ads(
    response: Response,
    slate: jax.Array,
    catalogue: Catalogue,
    history: jax.Array,
    weights: RewardWeights,
    popularity: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Ads: pay-per-click at the bid, only for ads relevant to the user.

        rel  = cos(features[item], mean_{h in history} features[h])    (0 for an empty history)
        ok   = rel >= relevance_floor
        base = w_click * c + c * (w_bid * bid[item] * ok - w_irrelevant * (1 - ok))

    A click on an irrelevant ad earns nothing and costs `irrelevant` (a clickbait or mis-click
    that erodes trust), so a policy cannot farm high bids by ignoring the user's taste.
    """
    c = response.clicked.astype(jnp.float32)
    item = jnp.clip(response.item, 0, catalogue.size - 1)
    rel = relevance(response.item, history, catalogue.features)
    ok = (rel >= weights.relevance_floor).astype(jnp.float32)
    paid = c * ok * catalogue.bid[item]
    base = weights.click * c + weights.bid * paid - weights.irrelevant * c * (1.0 - ok)
    terms = {"click": c, "relevance": c * rel, "paid_bid": paid, "irrelevant_click": c * (1 - ok)}
    return _finish(base, terms, response, slate, catalogue, history, weights, popularity)


RewardFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
_FNS: dict[str, RewardFn] = {"content": content, "products": products, "ads": ads}


def _check(preset: str) -> None:
    if preset not in _FNS:
        raise ValueError(f"reward preset {preset!r} is unknown; choose one of {list(PRESETS)}")


def reward_fn(preset: str) -> RewardFn:
    """The reward function named `preset` (content, products or ads)."""
    _check(preset)
    return _FNS[preset]

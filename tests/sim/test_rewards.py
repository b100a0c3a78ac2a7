"""Reward presets against hand-computed values: bases, bonuses and penalties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sim import rewards
from jaxrec.sim.core import Catalogue, Response

# Five items in a 2-d feature space; topics 0/1; prices and bids per item.
CAT = Catalogue(
    features=jnp.asarray([[1, 0], [0, 1], [1, 1], [0, 1], [1, -1]], jnp.float32),
    topic=jnp.asarray([0, 1, 0, 1, 0], jnp.int32),
    quality=jnp.zeros(5, jnp.float32),
    length=jnp.full(5, 10.0, jnp.float32),
    price=jnp.asarray([10, 20, 30, 40, 50], jnp.float32),
    bid=jnp.asarray([1.0, 2.0, 0.5, 3.0, 1.5], jnp.float32),
)
POP = jnp.asarray([0.0, 0.2, 0.4, 0.6, 0.8], jnp.float32)
HISTORY = jnp.asarray([-1, 0, 3], jnp.int32)  # items 0 and 3 consumed; mean feature [0.5, 0.5]
# Slot 1 repeats slot 0, item 3 is in the history, slot 3 is invalid.
SLATE = jnp.asarray([2, 2, 3, -1], jnp.int32)


def response(item, position=0, watch=12.0, rating=4.0, liked=True):
    clicked = item >= 0
    return Response(
        clicked=jnp.asarray(clicked),
        position=jnp.asarray(position if clicked else 4, jnp.int32),
        item=jnp.asarray(item, jnp.int32),
        watch_time=jnp.asarray(watch if clicked else 0.0, jnp.float32),
        rating=jnp.asarray(rating if clicked else 0.0, jnp.float32),
        liked=jnp.asarray(liked and clicked),
    )


# Jitted once per slate shape (eager ops would each compile on first use).
content, products, ads = (jax.jit(f) for f in (rewards.content, rewards.products, rewards.ads))

EXTRAS = dict(diversity=1.0, novelty=2.0, invalid=1.0, duplicate=0.5, seen=0.25)
# Shared extras for SLATE and a click on item 2 (not in the history, popularity 0.4):
#   diversity: valid slots 0,1,2 -> pairs (0,1) same topic, (0,2) and (1,2) differ -> 2/3
#   novelty:   1 * (1 - 0.4) = 0.6 -> 2.0 * 0.6 = 1.2
#   penalties: 1 invalid, 1 duplicate, 1 seen -> -(1.0 + 0.5 + 0.25) = -1.75
EXTRA_VALUE = 2 / 3 + 1.2 - 1.75


def test_shared_terms():
    _, terms = content(response(2), SLATE, CAT, HISTORY, rewards.RewardWeights(), POP)
    np.testing.assert_allclose(terms["diversity"], 2 / 3, rtol=1e-6)
    assert float(terms["novelty"]) == pytest.approx(0.6)
    assert (float(terms["invalid"]), float(terms["duplicate"]), float(terms["seen"])) == (1, 1, 1)


def test_content_hand_computed():
    w = rewards.RewardWeights(click=0.1, watch=0.1, like=0.5, **EXTRAS)
    r, terms = content(response(2), SLATE, CAT, HISTORY, w, POP)
    # base = 0.1 * 1 + 0.1 * 12 + 0.5 * 1 = 1.8
    assert float(terms["base"]) == pytest.approx(1.8)
    assert float(r) == pytest.approx(1.8 + EXTRA_VALUE, abs=1e-5)
    # No click: base 0 and novelty 0; diversity and penalties still count.
    r0, _ = content(response(-1), SLATE, CAT, HISTORY, w, POP)
    assert float(r0) == pytest.approx(2 / 3 - 1.75, abs=1e-5)


def test_products_hand_computed():
    w = rewards.RewardWeights(click=0.1, conversion=0.05)
    # A liked click on item 2 is a purchase at price 30: 0.1 + 0.05 * 30 = 1.6.
    r, terms = products(response(2), SLATE, CAT, HISTORY, w, POP)
    assert float(r) == pytest.approx(1.6)
    assert float(terms["revenue"]) == 30.0
    # A click without a like is a view, not a purchase: 0.1.
    r, _ = products(response(2, liked=False), SLATE, CAT, HISTORY, w, POP)
    assert float(r) == pytest.approx(0.1)


def test_ads_hand_computed():
    w = rewards.RewardWeights(bid=1.0, relevance_floor=0.25, irrelevant=0.5)
    # Item 2 [1, 1] vs taste [0.5, 0.5]: cosine 1 >= 0.25, pays its bid 0.5.
    r, terms = ads(response(2), SLATE, CAT, HISTORY, w, POP)
    assert float(terms["relevance"]) == pytest.approx(1.0)
    assert float(r) == pytest.approx(0.5)
    # Item 4 [1, -1] is orthogonal to the taste: cosine 0 < 0.25, earns -0.5 despite bid 1.5.
    r, terms = ads(response(4), jnp.asarray([4, 0, 1, 2]), CAT, HISTORY, w, POP)
    assert float(terms["relevance"]) == pytest.approx(0.0, abs=1e-6)
    assert float(r) == pytest.approx(-0.5)
    # Item 1 [0, 1]: cosine 0.7071 passes and pays 2.0.
    r, _ = ads(response(1), jnp.asarray([1, 0, 4, 2]), CAT, HISTORY, w, POP)
    assert float(r) == pytest.approx(2.0)
    # An empty history has no taste: relevance 0, so every click is below a positive floor.
    r, _ = ads(response(2), SLATE, CAT, jnp.full(3, -1, jnp.int32), w, POP)
    assert float(r) == pytest.approx(-0.5)


def test_novelty_of_a_seen_item_and_without_popularity():
    w = rewards.RewardWeights(novelty=1.0)
    r, _ = content(response(3), SLATE, CAT, HISTORY, w, POP)  # item 3 is in the history
    assert float(r) == 0.0
    r, _ = content(response(2), SLATE, CAT, HISTORY, w)  # no popularity: 1 - 0
    assert float(r) == 1.0


def test_penalties_count_out_of_range_and_repeats():
    w = rewards.RewardWeights(invalid=1.0, duplicate=1.0, seen=1.0)
    slate = jnp.asarray([7, -1, 0, 0, 0], jnp.int32)  # 2 invalid, 2 duplicates, 3 seen
    r, terms = content(response(-1), slate, CAT, HISTORY, w, POP)
    assert [float(terms[k]) for k in ("invalid", "duplicate", "seen")] == [2, 2, 3]
    assert float(r) == -7.0
    # Diversity: a slate of one topic, and one with fewer than two valid items, score 0.
    r, terms = content(response(-1), jnp.asarray([2, 4]), CAT, HISTORY, w, POP)
    assert float(terms["diversity"]) == 0.0 and float(r) == 0.0
    _, terms = content(response(-1), jnp.asarray([0, -1, -1]), CAT, HISTORY, w, POP)
    assert float(terms["diversity"]) == 0.0


def test_vmapped_rewards_match_rows():
    w = rewards.default_weights("content", diversity=0.3, novelty=0.2, seen=0.1)
    items = jnp.asarray([2, -1, 4, 1], jnp.int32)
    slates = jnp.asarray([[2, 2, 3, -1], [0, 1, 2, 3], [4, 0, 1, 2], [1, 1, 1, 1]], jnp.int32)
    resp = jax.tree.map(lambda *x: jnp.stack(x), *[response(int(i)) for i in items])
    batched, _ = jax.jit(jax.vmap(rewards.content, in_axes=(0, 0, None, None, None, None)))(
        resp, slates, CAT, HISTORY, w, POP
    )
    for b in range(4):
        one, _ = content(response(int(items[b])), slates[b], CAT, HISTORY, w, POP)
        assert float(batched[b]) == pytest.approx(float(one), abs=1e-6)


def test_weights_and_names_are_checked():
    assert rewards.default_weights("ads").relevance_floor == 0.25
    assert rewards.as_weights("content", {"like": 2.0}).like == 2.0
    with pytest.raises(ValueError, match="unknown"):
        rewards.default_weights("content", clicks=1.0)
    with pytest.raises(ValueError, match="choose one of"):
        rewards.reward_fn("revenue")

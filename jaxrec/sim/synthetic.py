"""The synthetic world: a seeded catalogue with titles and simulated users; the offline demo.

    env, params = make_env("synthetic", n_items=500, n_topics=10, slate_size=3, reward="content")
    obs, state = env.reset(key, params)          # obs: history [H] int32
    obs, state, reward, done, info = env.step(key, state, slate, params)
    env.titles                                   # host-side tuple of N unique titles

The catalogue (topics, features, quality, length, price, bid, popularity, titles) is made on the
host with numpy from `seed`, so the same seed gives the same world on any machine. A title is
"<Adjective> <Topic word> <Noun>" ("Midnight Jazz Stories"), so a language model can read an
item's topic from its title.

User model (one user; all randomness from the key):
- interests u in [-1, 1]^T over topics; an item's features f are a distribution over topics, so
  the affinity u . f lies in [-1, 1].
- the history [H] holds the ids of consumed items, oldest first and most recent last, padded
  with -1 at the FRONT. A fresh user's history is drawn from their interests: history_min to H
  distinct items, without replacement, p ~ exp(history_temperature * u . f + quality), from a
  random pool of history_pool distinct items (the whole catalogue when that is no larger). The
  pool keeps auto-reset cheap: `step` computes a reset for every user at every step, and a
  Gumbel top-k over all 500 items made that reset cost ~10x a step without it.
- choice: multinomial logit over the slate with a no-click option and a position bias:
      s_k = interest_weight * u . f_k + quality_weight * q_k - price_weight * log(1 + price_k)
            + seen_utility * [k in history]
  invalid slate entries (outside [0, N)) can never be chosen.
- response to a click on item i: satisfaction z = u . f_i + q_i + N(0, rating_noise^2);
  rating = clip(round(3 + rating_scale * z), 1, 5); liked = rating >= like_threshold;
  watch time = length_i * rating / 5 (a better-liked item is watched further), at most the
  remaining budget.
- interest evolution: a click moves every topic the item covers toward full interest,
  u <- u + drift * (f_i / max f_i) * (1 - u), so u stays in [-1, 1] and u . f_i grows.
- session: the time budget (minutes) loses step_cost per slate plus the watch time; patience
  loses 1 for a slate with no click and (3 - rating) / 2 for a disliked click, and regains
  patience_recovery for a like (capped at its start value). The session ends when the budget
  or patience reaches 0, or after max_steps slates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.sim import rewards
from jaxrec.sim.choice import choose_from_slate
from jaxrec.sim.core import (
    Catalogue,
    Environment,
    Response,
    below,
    normal_from_bits,
    open_uniform,
    register,
    unit_uniform,
)

NEG = -1e9  # utility of an invalid slate entry: never chosen, finite so softmax stays finite

TOPIC_WORDS = (
    "Space", "Ocean", "Jazz", "Kitchen", "Mystery", "Football", "Garden", "Robot", "Empire",
    "Mountain", "Desert", "Castle", "Dragon", "Forest", "Circus", "Galaxy", "Harbor", "Island",
    "Jungle", "Metro", "Piano", "River", "Safari", "Winter",
)
ADJECTIVES = (
    "Silent", "Golden", "Hidden", "Broken", "Midnight", "Crimson", "Electric", "Forgotten",
    "Lonely", "Wild", "Secret", "Frozen", "Burning", "Gentle", "Last", "Little", "Lost", "Lucky",
    "Magic", "Mighty", "Northern", "Quiet", "Rapid", "Royal", "Silver", "Small", "Strange",
    "Sunny", "Tiny", "Velvet", "Wandering", "Young", "Ancient", "Bright", "Clever", "Dark",
    "Early", "Final", "Great", "Happy",
)
NOUNS = (
    "Stories", "Diaries", "Tales", "Secrets", "Dreams", "Nights", "Games", "Letters", "Songs",
    "Lessons", "Journeys", "Legends", "Adventures", "Chronicles", "Echoes", "Friends", "Heroes",
    "Voices", "Shadows", "Days", "Rules", "Notes", "Hours", "Files", "Roads", "Maps", "Gifts",
    "Wishes", "Riddles", "Sketches",
)


@struct.dataclass
class SyntheticParams:
    """Everything numeric about the world and its users (a pytree; vmap with in_axes None)."""

    catalogue: Catalogue  # N items, F = T topic features
    popularity: jax.Array  # [N] float32 in [0, 1] (rank of a noisy quality)
    weights: rewards.RewardWeights
    position_bias: jax.Array  # [K] float32 added to each slot's utility
    no_click_logit: jax.Array  # [] float32 utility of not clicking
    interest_weight: jax.Array  # [] float32 utility per unit of affinity u . f
    quality_weight: jax.Array  # [] float32 utility per unit of quality
    price_weight: jax.Array  # [] float32 utility lost per unit of log(1 + price)
    seen_utility: jax.Array  # [] float32 utility added to an item already consumed (boredom)
    history_temperature: jax.Array  # [] float32 how sharply initial histories follow interests
    rating_noise: jax.Array  # [] float32 std of satisfaction noise
    rating_scale: jax.Array  # [] float32 rating points per unit of satisfaction
    like_threshold: jax.Array  # [] float32 a rating at or above this is a like
    drift: jax.Array  # [] float32 interest step toward a consumed item, in [0, 1]
    budget_min: jax.Array  # [] float32 minutes; a fresh user's budget ~ U[min, max)
    budget_max: jax.Array  # [] float32
    step_cost: jax.Array  # [] float32 minutes spent looking at one slate
    patience: jax.Array  # [] float32 start (and maximum) patience
    patience_recovery: jax.Array  # [] float32 patience regained per like
    max_steps: jax.Array  # [] int32 slates per session at most


@struct.dataclass
class SyntheticState:
    """One user's session."""

    interest: jax.Array  # [T] float32 in [-1, 1]
    history: jax.Array  # [H] int32 consumed ids, oldest first, -1 padding at the front
    budget: jax.Array  # [] float32 minutes left
    patience: jax.Array  # [] float32
    step: jax.Array  # [] int32 slates shown this session


@dataclasses.dataclass(frozen=True)
class SyntheticEnv(Environment):
    """Static settings (shapes and the reward preset); the titles ride along host-side."""

    slate_size: int = 3  # K
    history_len: int = 10  # H
    history_min: int = 5  # fewest items in a fresh user's history
    history_pool: int = 40  # random items a fresh history is drawn from (>= history_len)
    reward: str = "content"  # reward preset: content, products or ads
    n_items: int = 500  # N, the catalogue size (slates index the whole catalogue)
    # Host-side item titles (for the codec); excluded from equality so they never recompile.
    titles: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def num_candidates(self) -> int:
        """Slates choose among the whole catalogue (no candidate sampling)."""
        return self.n_items

    def observation(self, state: SyntheticState, params: SyntheticParams) -> jax.Array:
        """What the policy sees: the history [H] int32 (-1 padded at the front)."""
        return state.history

    def reset(self, key: jax.Array, params: SyntheticParams):
        cat = params.catalogue
        n, t = cat.features.shape
        h = self.history_len
        m = min(self.history_pool, n)
        # One draw of random words for everything (each jax.random call inlines a threefry).
        bits = jax.random.bits(key, (t + m + 4,), jnp.uint32)
        interest = 2.0 * unit_uniform(bits[:t]) - 1.0  # [T] uniform on [-1, 1)
        # The pool: a random arithmetic progression mod N with a stride coprime to N, so its
        # items are distinct without a check (topics are shuffled over ids, so it is a random
        # mix of topics).
        strides = np.asarray([d for d in range(1, n) if math.gcd(d, n) == 1] or [1], np.int32)
        start = below(bits[t], n)[0]
        stride = jnp.asarray(strides)[below(bits[t + 1], len(strides))[0]]
        pool = (start + stride * jnp.arange(m, dtype=jnp.int32)) % n  # [M] distinct ids
        # H distinct items of the pool by Gumbel top-k on the interest-driven logits.
        logits = (params.history_temperature * (cat.features[pool] @ interest)
                  + cat.quality[pool])  # [M]
        gumbel = -jnp.log(-jnp.log(open_uniform(bits[t + 2:t + 2 + m])))  # [M]
        drawn = pool[jax.lax.top_k(logits + gumbel, h)[1]].astype(jnp.int32)  # [H]
        length = self.history_min + below(bits[-2], h - self.history_min + 1)[0]
        history = jnp.where(jnp.arange(h) >= h - length, drawn, -1).astype(jnp.int32)
        budget = params.budget_min + unit_uniform(bits[-1]) * (
            params.budget_max - params.budget_min)
        state = SyntheticState(
            interest=interest,
            history=history,
            budget=budget,
            patience=jnp.asarray(params.patience, jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )
        return self.observation(state, params), state

    def step_env(self, key: jax.Array, state: SyntheticState, action: jax.Array,
                 params: SyntheticParams):
        bits = jax.random.bits(key, (2,), jnp.uint32)  # choice, rating noise
        cat = params.catalogue
        slate, valid, safe, seen = rewards.slate_view(action, cat.size, state.history)  # [K] each
        affinity = cat.features[safe] @ state.interest  # [K]
        utility = (
            params.interest_weight * affinity
            + params.quality_weight * cat.quality[safe]
            - params.price_weight * jnp.log1p(cat.price[safe])
            + params.seen_utility * seen
        )
        utility = jnp.where(valid, utility, NEG)
        position, clicked, slot = choose_from_slate(
            unit_uniform(bits[0]), utility, params.no_click_logit, params.position_bias)
        item = jnp.where(clicked, safe[slot], -1)

        # Response: satisfaction -> rating -> like and watch time.
        sat = affinity[slot] + cat.quality[safe[slot]]
        sat = sat + params.rating_noise * normal_from_bits(bits[1])
        rating = jnp.clip(jnp.round(3.0 + params.rating_scale * sat), 1.0, 5.0)
        watch = jnp.minimum(cat.length[safe[slot]] * rating / 5.0, jnp.maximum(state.budget, 0.0))
        response = Response(
            clicked=clicked,
            position=position,
            item=item.astype(jnp.int32),
            watch_time=jnp.where(clicked, watch, 0.0),
            rating=jnp.where(clicked, rating, 0.0),
            liked=clicked & (rating >= params.like_threshold),
        )
        reward, terms = rewards.reward_fn(self.reward)(
            response, slate, cat, state.history, params.weights, params.popularity
        )
        next_state = self._transition(state, response, params)
        done = (
            (next_state.budget <= 0.0)
            | (next_state.patience <= 0.0)
            | (next_state.step >= params.max_steps)
        )
        info = {"response": response, "terms": terms}
        return self.observation(next_state, params), next_state, reward, done, info

    def _transition(self, state: SyntheticState, response: Response,
                    params: SyntheticParams) -> SyntheticState:
        cat = params.catalogue
        c = response.clicked
        f = cat.features[jnp.clip(response.item, 0, cat.size - 1)]  # [T]
        # Drift toward the consumed item: each topic it covers moves toward full interest.
        toward = params.drift * f / jnp.maximum(jnp.max(f), 1e-6) * (1.0 - state.interest)
        interest = jnp.where(c, state.interest + toward, state.interest)
        history = rewards.push_history(state.history, response.item, c)
        budget = state.budget - params.step_cost - response.watch_time
        lost = jnp.where(c, jnp.maximum(3.0 - response.rating, 0.0) / 2.0, 1.0)
        gained = params.patience_recovery * response.liked
        patience = jnp.minimum(state.patience - lost + gained, params.patience)
        return SyntheticState(
            interest=interest,
            history=history.astype(jnp.int32),
            budget=budget,
            patience=patience,
            step=state.step + 1,
        )


# --- the world, made on the host ---------------------------------------------------------------


def topic_word(t: int) -> str:
    """The word that names topic t in titles (suffixed past the built-in list)."""
    word = TOPIC_WORDS[t % len(TOPIC_WORDS)]
    return word if t < len(TOPIC_WORDS) else f"{word}{t // len(TOPIC_WORDS) + 1}"


def synthetic_titles(topic: np.ndarray, seed: int) -> list[str]:
    """Unique titles "<Adjective> <Topic word> <Noun>" for items with main topics `topic` [N].

    Deterministic in (topic, seed): each topic's items draw distinct (adjective, noun) pairs;
    past the 1,200 pairs per topic a number is appended.
    """
    rng = np.random.default_rng([seed, 1])
    combos = len(ADJECTIVES) * len(NOUNS)
    titles = [""] * len(topic)
    for t in np.unique(topic):
        idx = np.flatnonzero(topic == t)
        order = np.concatenate([rng.permutation(combos) for _ in range(-(-len(idx) // combos))])
        for j, i in enumerate(idx):
            a, b = divmod(int(order[j]), len(NOUNS))
            suffix = "" if j < combos else f" {j // combos + 1}"
            titles[i] = f"{ADJECTIVES[a]} {topic_word(int(t))} {NOUNS[b]}{suffix}"
    return titles


def make_world(n_items: int = 500, n_topics: int = 10, seed: int = 0, topic_share: float = 0.7,
               quality_std: float = 0.5) -> tuple[Catalogue, np.ndarray, list[str]]:
    """(catalogue, popularity [N], titles) made with numpy from `seed`.

    Features are `topic_share` on the main topic plus the rest spread by a sparse Dirichlet, so
    items mostly belong to one topic but overlap a little. Lengths are minutes (log-normal around
    8), prices log-normal around 20, bids log-normal around 0.5; popularity is the rank of a
    noisy quality (popular items are mostly good, not always).
    """
    if n_items < 1 or n_topics < 1:
        raise ValueError(f"n_items and n_topics must be positive, got {n_items}, {n_topics}")
    rng = np.random.default_rng([seed, 0])
    topic = rng.permutation(np.arange(n_items) % n_topics).astype(np.int32)
    spread = rng.dirichlet(np.full(n_topics, 0.3), size=n_items) if n_topics > 1 else np.ones(
        (n_items, 1))
    features = topic_share * np.eye(n_topics)[topic] + (1.0 - topic_share) * spread
    quality = rng.normal(0.0, quality_std, n_items)
    length = np.clip(rng.lognormal(np.log(8.0), 0.6, n_items), 1.0, 60.0)
    price = np.round(np.clip(rng.lognormal(np.log(20.0), 0.8, n_items), 1.0, 500.0), 2)
    bid = np.round(np.clip(rng.lognormal(np.log(0.5), 0.5, n_items), 0.05, 5.0), 2)
    noisy = quality + rng.normal(0.0, quality_std, n_items)
    popularity = np.argsort(np.argsort(noisy)) / max(n_items - 1, 1)
    catalogue = Catalogue(
        features=jnp.asarray(features, jnp.float32),
        topic=jnp.asarray(topic, jnp.int32),
        quality=jnp.asarray(quality, jnp.float32),
        length=jnp.asarray(length, jnp.float32),
        price=jnp.asarray(price, jnp.float32),
        bid=jnp.asarray(bid, jnp.float32),
    )
    return catalogue, popularity.astype(np.float32), synthetic_titles(topic, seed)


# --- the preset ----------------------------------------------------------------------------------

_WORLD = dict(n_items=500, n_topics=10, seed=0, topic_share=0.7, quality_std=0.5)
_ENV = dict(slate_size=3, history_len=10, history_min=5, history_pool=40, reward="content",
            auto_reset=True)
_USER = dict(
    position_bias=0.2,  # slope: slot k loses 0.2 * k utility (attention fades down the slate)
    no_click_logit=1.0,
    interest_weight=3.0,
    quality_weight=1.0,
    price_weight=0.0,
    seen_utility=-1.0,
    history_temperature=3.0,
    rating_noise=0.3,
    rating_scale=2.0,
    like_threshold=4.0,
    drift=0.1,
    budget_min=30.0,
    budget_max=90.0,
    step_cost=0.5,
    patience=3.0,
    patience_recovery=0.5,
    max_steps=20,
)


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict, Any]:
    allowed = set(_WORLD) | set(_ENV) | set(_USER) | {"reward_weights"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"synthetic: unknown settings {bad}; choose from {sorted(allowed)}")
    pick = lambda d: {k: overrides.get(k, v) for k, v in d.items()}
    return pick(_WORLD), pick(_ENV), pick(_USER), overrides.get("reward_weights")


def position_bias_array(bias: Any, k: int) -> jnp.ndarray:
    """[K] float32 from a slope (slot k gets -slope * k) or an explicit [K] array."""
    arr = np.asarray(bias, np.float32)
    if arr.ndim == 0:
        return jnp.asarray(-float(arr) * np.arange(k), jnp.float32)
    if arr.shape != (k,):
        raise ValueError(f"position_bias must be a slope or have shape ({k},), got {arr.shape}")
    return jnp.asarray(arr, jnp.float32)


@register("synthetic")
def make_synthetic(**overrides: Any) -> tuple[SyntheticEnv, SyntheticParams]:
    """(env, params) for the synthetic world; any setting above can be overridden by keyword.

    World: n_items, n_topics, seed, topic_share, quality_std. Env: slate_size, history_len,
    history_min, history_pool, reward (content | products | ads), auto_reset. User model: the
    fields of SyntheticParams (position_bias as a slope or a [K] array). reward_weights:
    RewardWeights, or a dict of changes to the preset's defaults.
    """
    world, env_kw, user, weights = _split_overrides(overrides)
    if not 0 <= env_kw["history_min"] <= env_kw["history_len"] <= world["n_items"]:
        raise ValueError("synthetic: need 0 <= history_min <= history_len <= n_items")
    if env_kw["history_pool"] < env_kw["history_len"] or world["n_items"] >= 2**15:
        raise ValueError("synthetic: need history_pool >= history_len and n_items < 32768")
    rewards.reward_fn(env_kw["reward"])  # validates the name
    catalogue, popularity, titles = make_world(**world)
    env = SyntheticEnv(titles=tuple(titles), n_items=world["n_items"], **env_kw)
    scalars = {k: jnp.asarray(v, jnp.int32 if k == "max_steps" else jnp.float32)
               for k, v in user.items() if k != "position_bias"}
    params = SyntheticParams(
        catalogue=catalogue,
        popularity=jnp.asarray(popularity),
        weights=rewards.as_weights(env_kw["reward"], weights),
        position_bias=position_bias_array(user["position_bias"], env_kw["slate_size"]),
        **scalars,
    )
    return env, params

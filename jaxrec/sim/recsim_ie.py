"""RecSim's interest-evolution environment (`recsim-ie`), re-implemented as pure JAX functions.

    env, params = make_env("recsim-ie")
    obs, state = env.reset(key, params)        # obs.user [T] interests, obs.doc [C, T] candidates
    obs, state, reward, done, info = env.step(key, state, slate, params)   # slate [S] int32

It reproduces RecSim 0.2.4's `recsim.environments.interest_evolution.create_environment` with
the settings of RecSim's own examples ({num_candidates: 10, slate_size: 2, resample_documents:
True}); note that `create_environment` uses `UtilityModelVideoSampler` and
`UtilityModelUserSampler`, not the `IEv*` samplers defined beside them. `tests/sim/
test_recsim_ie.py` checks return, clicks, length and click rate against RecSim's own run
(`tests/reference/recsim_ie_stats.json`). T = 20 topics, C = 10 candidates, S = 2 slots.

Documents (UtilityModelVideoSampler.sample_document), C fresh ones before every step:
    c ~ U{0, ..., T-1}                     a topic cluster, uniformly
    f = e_c                                features: the one-hot of the cluster
    q ~ N(mu_c, 0.1^2),  mu = [linspace(-3, 0, 14), linspace(0, 3, 6)]
                                           quality: 70% "trashy" clusters, 30% "nutritious"
                                           (RecSim calls 0.1 a variance but passes it as the std)
    L = 4                                  every video lasts 4 minutes
Users (UtilityModelUserSampler.sample_user):
    u ~ U[-1, 1)^T,  B = 200               interests; a fixed time budget in minutes
Choice (IEvUserState.score_document, MultinomialProportionalChoiceModel, choose_item):
    s_k = u . f_k                          affinity of slot k (= u_c for a one-hot document)
    p_k = (s_k - m) / Z,  p_none = (n - m) / Z,  Z = sum_k (s_k - m) + (n - m)
                                           proportional choice; m = -1 (min_normalizer) makes
                                           every mass >= 0; n = 1 is the no-click mass
Response and reward (_generate_click_response, clicked_watchtime_reward):
    w = min(B, L) if clicked else 0        watch time, cut short by the budget; reward r = w
Interest update (IEvUserModel.update_state), on a click on document f only:
    a = -(y0 / x0) |u| + y0                step size, y0 = 0.3, x0 = 1: extreme interests move
                                           less (compute_alpha)
    D = a * f * (f - u)                    move toward the clicked topic (zero off that topic)
    p+ = ((u + 1) / 2) . f                 toward with probability (u_c + 1) / 2, else away
    u <- clip(u + D, -1, 1) if U < p+ else clip(u - D, -1, 1),  U ~ U[0, 1)
Budget (IEvUserModel.update_state):
    clicked:     B <- B - w + k w (g_u (u . f - m) + g_d q),  k = 0.9 / 3.4, g_u = 0, g_d = 1
                                           watching costs its time, good videos give some back
                                           (quality / 3.4 lies in about [-1, 1]); u is the
                                           interest before this step's update
    not clicked: B <- B - 0.5              the step penalty for a wasted slate
Termination (IEvUserModel.is_terminal):  done = B <= 0 after the step.

JAX form. Pure functions over ONE user; `step_batch` steps a whole batch from one key. The
state keeps each candidate's cluster only: quality is hidden from the policy and RecSim reads it
once, when the document is clicked, so drawing q ~ N(mu_c, 0.1^2) at click time gives every
observation, reward and transition the same distribution (RecSim's response observation also
reports the quality of unclicked slate documents; this does not). A slate entry is an index into
the current candidates; RecSim allows repeats within a slate and so does this; an entry outside
[0, C) (RecSim would raise) gets no mass, so it is never clicked. Randomness comes from keys only
(RecSim draws the choice and the interest coin from numpy's global generator). `step_batch`
draws every random number of a step for the whole batch at once (core.batch_bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.sim.core import (
    BATCH_RNG,
    Environment,
    Response,
    batch_bits,
    below,
    normal_from_bits,
    register,
    unit_uniform,
)


@struct.dataclass
class RecsimIEParams:
    """The constants of RecSim's interest-evolution model (a pytree; vmap with in_axes None)."""

    cluster_means: jax.Array  # [T] float32 mean document quality per topic cluster
    quality_std: jax.Array  # [] float32 std of quality around its cluster mean (0.1)
    video_length: jax.Array  # [] float32 minutes per video (4)
    time_budget: jax.Array  # [] float32 a fresh user's budget in minutes (200)
    step_penalty: jax.Array  # [] float32 minutes lost to a slate with no click (0.5)
    no_click_mass: jax.Array  # [] float32 score of not clicking (1)
    min_normalizer: jax.Array  # [] float32 subtracted from every score (-1)
    user_update_alpha: jax.Array  # [] float32 budget regained per minute per utility (0.9/3.4)
    user_quality_factor: jax.Array  # [] float32 weight of u . f in the received utility (0)
    document_quality_factor: jax.Array  # [] float32 weight of quality in it (1)
    alpha_x_intercept: jax.Array  # [] float32 |u| at which the interest step reaches 0 (1)
    alpha_y_intercept: jax.Array  # [] float32 the interest step at u = 0 (0.3)


@struct.dataclass
class RecsimIEState:
    """One user and the candidates currently offered to them."""

    interests: jax.Array  # [T] float32 in [-1, 1]
    budget: jax.Array  # [] float32 minutes left
    doc_cluster: jax.Array  # [C] int32 topic cluster of each current candidate


@struct.dataclass
class RecsimIEObs:
    """What the policy sees: RecSim's `user` and `doc` observations (fully observed user)."""

    user: jax.Array  # [T] float32 the user's interests
    doc: jax.Array  # [C, T] float32 one-hot topic of each candidate


@struct.dataclass
class StepDraws:
    """The random numbers one step consumes, so `step` and `step_batch` share `transition`."""

    u_choice: jax.Array  # [B] float32 in [0, 1): inverse-CDF draw of the choice
    u_flip: jax.Array  # [B] float32 in [0, 1): the interest update's coin
    z_quality: jax.Array  # [B] float32 standard normal: the clicked document's quality noise
    doc_cluster: jax.Array  # [B, C] int32 the next candidates' clusters


def utility_cluster_means(num_topics: int, min_utility: float = -3.0,
                          max_utility: float = 3.0) -> np.ndarray:
    """[T] mean quality per cluster, as UtilityModelVideoSampler.__init__ builds it."""
    trashy = np.linspace(min_utility, 0.0, int(num_topics * 0.7))
    nutritious = np.linspace(0.0, max_utility, int(num_topics * 0.3))
    means = np.concatenate((trashy, nutritious))
    if means.shape != (num_topics,):
        raise ValueError(
            f"recsim-ie: int(0.7 T) + int(0.3 T) must equal T = {num_topics} (RecSim indexes "
            f"cluster_means by cluster id); pass cluster_means explicitly"
        )
    return means


def topic_update(u_c: jax.Array, u_flip: jax.Array, params: RecsimIEParams) -> jax.Array:
    """The clicked topic's new interest (IEvUserModel.update_state with one-hot features f).

    RecSim's vector rule u <- clip(u +- a * f * (f - u), -1, 1), with a = -(y0/x0)|u| + y0
    (compute_alpha) and "+" when U < ((u + 1)/2) . f, moves only the topic c where f_c = 1:
    u_c <- clip(u_c +- a_c (1 - u_c), -1, 1), "+" with probability (u_c + 1) / 2. Extreme
    interests move less (a shrinks with |u_c|); liked topics tend to grow, disliked ones to sink.
    """
    y0 = params.alpha_y_intercept
    alpha = (-y0 / params.alpha_x_intercept) * jnp.abs(u_c) + y0
    sign = jnp.where(u_flip < (u_c + 1.0) / 2.0, 1.0, -1.0)
    return jnp.clip(u_c + sign * alpha * (1.0 - u_c), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RecsimIE(Environment):
    """Static shapes and the batched generator; the numbers live in RecsimIEParams."""

    num_topics: int = 20  # T (IEvVideo.NUM_FEATURES)
    num_candidates: int = 10  # C, resampled before every step
    slate_size: int = 2  # S
    batch_rng: str = "threefry"  # how step_batch draws its words (core.batch_bits)

    def observation(self, state: RecsimIEState, params: RecsimIEParams) -> RecsimIEObs:
        doc = (state.doc_cluster[:, None] == jnp.arange(self.num_topics)).astype(jnp.float32)
        return RecsimIEObs(user=state.interests, doc=doc)  # doc: [C, T]

    def reset(self, key: jax.Array, params: RecsimIEParams):
        """A fresh user (UtilityModelUserSampler.sample_user) and fresh candidates."""
        k_user, k_docs = jax.random.split(key)
        state = RecsimIEState(
            interests=jax.random.uniform(k_user, (self.num_topics,), jnp.float32, -1.0, 1.0),
            budget=jnp.asarray(params.time_budget, jnp.float32),
            doc_cluster=jax.random.randint(k_docs, (self.num_candidates,), 0, self.num_topics,
                                           jnp.int32),
        )
        return self.observation(state, params), state

    def step_env(self, key: jax.Array, state: RecsimIEState, action: jax.Array,
                 params: RecsimIEParams):
        k_choice, k_flip, k_quality, k_docs = jax.random.split(key, 4)
        draws = StepDraws(
            u_choice=jax.random.uniform(k_choice, (1,), jnp.float32),
            u_flip=jax.random.uniform(k_flip, (1,), jnp.float32),
            z_quality=jax.random.normal(k_quality, (1,), jnp.float32),
            doc_cluster=jax.random.randint(k_docs, (1, self.num_candidates), 0,
                                           self.num_topics, jnp.int32),
        )
        one = lambda tree: jax.tree.map(lambda a: a[None], tree)  # add B = 1
        out = self.transition(one(state), one(action), draws, params)
        next_state, reward, done, info = jax.tree.map(lambda a: a[0], out)
        return self.observation(next_state, params), next_state, reward, done, info

    def transition(self, state: RecsimIEState, action: jax.Array, draws: StepDraws,
                   params: RecsimIEParams):
        """One step of a batch given its random numbers: (next_state, reward, done, info).

        Every argument carries a leading batch axis B (`step_env` passes B = 1). No reset here.
        Written over [B] vectors with the S slots unrolled. The few per-user lookups are small
        gathers and the interest update a B-element scatter: on CPU these are cheaper than
        one-hot selects, whose [B, T] fusions XLA fills with recomputed per-user work.
        """
        s, c, t = self.slate_size, self.num_candidates, self.num_topics
        x = state.interests  # [B, T]
        b = x.shape[0]
        slate = action.astype(jnp.int32)  # [B, S] indices into the current candidates
        valid = (slate >= 0) & (slate < c)  # [B, S] an invalid entry is never clicked
        slate = jnp.clip(slate, 0, c - 1)
        cluster = jnp.take_along_axis(state.doc_cluster, slate, axis=1)  # [B, S] int32
        # IEvUserState.score_document: dot(interests, one-hot features) = u[cluster].
        scores = jnp.take_along_axis(x, cluster, axis=1)  # [B, S]
        # MultinomialProportionalChoiceModel.score_documents: masses s - m and n - m; then
        # choose_item: p = masses / their sum, drawn here by inverse CDF (choice.
        # choice_from_uniform of choice.proportional_probs, unrolled over the slots).
        masses = [jnp.where(valid[:, k], jnp.maximum(scores[:, k] - params.min_normalizer, 0.0),
                            0.0) for k in range(s)]
        masses.append(jnp.broadcast_to(params.no_click_mass - params.min_normalizer, (b,)))
        cdf = [masses[0]]
        for m in masses[1:]:
            cdf.append(cdf[-1] + m)
        threshold = draws.u_choice * cdf[-1]
        position = jnp.minimum(sum((ck <= threshold).astype(jnp.int32) for ck in cdf), s)  # [B]
        clicked = position < s
        # The clicked document: its cluster, u . f and candidate index (all [B]).
        chosen = [position == k for k in range(s)]
        c_click = sum(jnp.where(chosen[k], cluster[:, k], 0) for k in range(s))
        x_click = sum(jnp.where(chosen[k], scores[:, k], 0.0) for k in range(s))
        item = sum(jnp.where(chosen[k], slate[:, k], 0) for k in range(s))
        # UtilityModelVideoSampler: quality ~ N(cluster mean, 0.1), drawn when first read.
        quality = params.cluster_means[c_click] + params.quality_std * draws.z_quality
        # _generate_click_response: the video is watched to its end or the budget's.
        watch = jnp.where(clicked, jnp.minimum(state.budget, params.video_length), 0.0)
        # update_state, interests: only the clicked topic moves (its features are one-hot).
        x_new = topic_update(x_click, draws.u_flip, params)  # [B]
        column = jnp.where(clicked, c_click, t)  # t: out of range, dropped (no click)
        interests = x.at[jnp.arange(b), column].set(x_new, mode="drop", unique_indices=True,
                                                     indices_are_sorted=True)
        # update_state, budget: expected utility uses the interests before the update.
        received = (params.user_quality_factor * (x_click - params.min_normalizer)
                    + params.document_quality_factor * quality)
        budget_clicked = (state.budget - watch) + params.user_update_alpha * watch * received
        budget = jnp.where(clicked, budget_clicked, state.budget - params.step_penalty)
        next_state = RecsimIEState(interests=interests, budget=budget.astype(jnp.float32),
                                   doc_cluster=draws.doc_cluster)
        done = budget <= 0.0  # is_terminal
        reward = watch.astype(jnp.float32)  # clicked_watchtime_reward
        response = Response(
            clicked=clicked,
            position=position.astype(jnp.int32),
            item=jnp.where(clicked, item, -1).astype(jnp.int32),
            watch_time=reward,
            rating=jnp.zeros_like(reward),  # RecSim's IE user gives no rating
            liked=jnp.zeros_like(clicked),  # nor a like
        )
        info = {
            "response": response,  # item = index of the clicked candidate, -1 if none
            "cluster": jnp.where(clicked, c_click, -1).astype(jnp.int32),  # [B] clicked topic
            "quality": jnp.where(clicked, quality, 0.0),  # [B] clicked quality, 0 if none
        }
        return next_state, reward, done, info

    def step_batch(self, key: jax.Array, states: RecsimIEState, actions: jax.Array,
                   params: RecsimIEParams):
        """All B users from ONE key: one [W, B] draw of random words per step, no split per user.

        Same distribution as the vmapped per-user `step` (tests/sim/test_recsim_ie.py). Per user:
        one word for the choice, one for the interest coin, one for the quality noise and two
        candidate clusters per word (core.below). With auto_reset, the users whose episode ended
        get fresh interests: when at most `reset_rows(B)` ended (the usual case: about B / 84 per
        step under a random policy) only that many [T] rows are drawn and scattered in;
        otherwise all B rows are drawn and selected.
        """
        b = actions.shape[0]
        c, t = self.num_candidates, self.num_topics
        doc_words = (c + 1) // 2
        k_step, k_reset = jax.random.split(key)
        words = batch_bits(k_step, (3 + doc_words, b), self.batch_rng)  # [W, B] uint32
        first, rest = below(words[3:], t)  # [C/2, B] each
        second, _ = below(rest, t)
        clusters = jnp.stack([first, second], axis=1).reshape(2 * doc_words, b)  # [C+, B]
        draws = StepDraws(
            u_choice=unit_uniform(words[0]),  # [B]
            u_flip=unit_uniform(words[1]),
            z_quality=normal_from_bits(words[2]),
            doc_cluster=clusters[:c].T,  # [B, C] int32
        )
        next_state, reward, done, info = self.transition(states, actions, draws, params)
        if self.auto_reset:
            # A finished user is replaced by a fresh one; the fresh candidates serve both.
            interests = self._fresh_interests(k_reset, done, next_state.interests)
            next_state = RecsimIEState(
                interests=interests,
                budget=jnp.where(done, params.time_budget, next_state.budget).astype(
                    jnp.float32),
                doc_cluster=next_state.doc_cluster,
            )
        obs = jax.vmap(self.observation, in_axes=(0, None))(next_state, params)
        return obs, next_state, reward, done, info

    @staticmethod
    def reset_rows(batch: int) -> int:
        """How many fresh users one batched step draws when few episodes ended (static)."""
        return min(batch, max(16, batch // 16))

    def _fresh_interests(self, key: jax.Array, done: jax.Array, interests: jax.Array):
        """[B, T] interests with the rows where `done` replaced by fresh U[-1, 1)^T draws."""
        b, t = interests.shape
        m = self.reset_rows(b)

        def few(interests):  # draw m rows, scatter them into the ended users' rows
            rows = jnp.nonzero(done, size=m, fill_value=b)[0]  # [m] int32, b = unused
            fresh = 2.0 * unit_uniform(batch_bits(key, (m, t), self.batch_rng)) - 1.0
            return interests.at[rows].set(fresh, mode="drop")

        def many(interests):  # draw all B rows, select the ended ones
            fresh = 2.0 * unit_uniform(batch_bits(key, (b, t), self.batch_rng)) - 1.0
            return jnp.where(done[:, None], fresh, interests)

        if m == b:
            return many(interests)
        return jax.lax.cond(jnp.sum(done) <= m, few, many, interests)


# RecSim's defaults: UtilityModelUserSampler, UtilityModelVideoSampler and IEvUserModel.
_SHAPES = dict(num_topics=20, num_candidates=10, slate_size=2)
_ENV = dict(auto_reset=True, batch_rng="threefry")
_QUALITY = dict(min_utility=-3.0, max_utility=3.0)  # cluster means, unless given explicitly
_PARAMS = dict(
    quality_std=0.1,
    video_length=4.0,
    time_budget=200.0,
    step_penalty=0.5,
    no_click_mass=1.0,
    min_normalizer=-1.0,
    user_update_alpha=0.9 / 3.4,
    user_quality_factor=0.0,
    document_quality_factor=1.0,
    alpha_x_intercept=1.0,
    alpha_y_intercept=0.3,
)


@register("recsim-ie")
def make_recsim_ie(**overrides: Any) -> tuple[RecsimIE, RecsimIEParams]:
    """(env, params) for RecSim's interest evolution; every default above can be overridden.

    Shapes: num_topics, num_candidates, slate_size. Env: auto_reset, batch_rng. Quality:
    min_utility and max_utility (the cluster means' range) or cluster_means ([T]). User model:
    the scalar fields of RecsimIEParams.
    """
    allowed = set(_SHAPES) | set(_ENV) | set(_QUALITY) | set(_PARAMS) | {"cluster_means"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"recsim-ie: unknown settings {bad}; choose from {sorted(allowed)}")
    pick = lambda d: {k: overrides.get(k, v) for k, v in d.items()}
    shapes, env_kw, quality = pick(_SHAPES), pick(_ENV), pick(_QUALITY)
    if not 1 <= shapes["slate_size"] <= shapes["num_candidates"]:
        raise ValueError("recsim-ie: need 1 <= slate_size <= num_candidates")
    if not 1 <= shapes["num_topics"] < 2**15:
        raise ValueError("recsim-ie: num_topics must be in [1, 2^15)")
    if env_kw["batch_rng"] not in BATCH_RNG:
        raise ValueError(f"recsim-ie: batch_rng must be one of {BATCH_RNG}")
    means = overrides.get("cluster_means")
    if means is None:
        means = utility_cluster_means(shapes["num_topics"], **quality)
    means = np.asarray(means, np.float32)
    if means.shape != (shapes["num_topics"],):
        raise ValueError(f"recsim-ie: cluster_means must have shape ({shapes['num_topics']},)")
    params = RecsimIEParams(
        cluster_means=jnp.asarray(means, jnp.float32),
        **{k: jnp.asarray(v, jnp.float32) for k, v in pick(_PARAMS).items()},
    )
    return RecsimIE(**shapes, **env_kw), params

"""The reward-model stage: a Bradley-Terry scorer of PPO's (prompt, slate) sequences.

    summary = run_reward(config, workdir)           # train (or resume), normalise, checkpoint
    rm = load_reward_model(config, workdir)         # RewardModel: params, mean, std, model
    scores = reward_scores(rm, tokens, valid)       # [B] normalised scores, pure and jittable

Model. The policy's backbone with a scalar (value) head, initialised from the starting policy
(`init_value_params`: the backbone copied, the head at zero, so every score starts at 0). The
score of a sequence is the head's output at its last real token:

    r(x) = v_theta(x)[last t with valid_t]            x = prompt + completion, [T] tokens

laid out exactly as PPO scores its rollouts (left-padded prompt, right-padded completion).

Loss (Bradley-Terry): for pairs (x+, x-) where x+ is preferred,

    L = -sum_p w_p log sigmoid(r(x+_p) - r(x-_p)) / sum_p w_p

with w_p = 0 for pairs the labeller cannot order (equal utilities), 1 otherwise. AdamW with a
linear warm-up then a constant rate, global-norm clipping at 1.0, one jitted step (state
donated) whose batch is drawn on device from the key fold_in(key(seed), step).

Pairs (`reward.pairs`).
- 'ratings' (MovieLens sources): `preference_pairs` over the training split (leave_one_out):
  user u rated item a above item b. Pairs whose items are in u's simulated history (its last
  `sim.history_len` training items, what the MovieLens simulator starts u from and what PPO's
  prompt shows and bans) are dropped: PPO never scores a slate of already-seen items.
- 'simulator': fresh simulated users (env.reset_batch) and two distinct items outside the
  user's history; the preferred one has the higher deterministic utility under the simulator's
  user model (synthetic: interest_weight * u.f + quality_weight * q - price_weight *
  log(1 + price), the click model's slot utility; MovieLens: the predicted rating). That is
  what drives clicks and hence every reward preset; it ignores what only follows a click
  (e.g. the synthetic item's watch length), and no click is sampled, so labels are noise-free.
- 'auto': 'ratings' for MovieLens sources, 'simulator' otherwise.
Held-out pairs come from users never trained on: a random share of the real users (ratings,
or MovieLens simulator users), or for the synthetic world users drawn from their own key
stream (interests are continuous draws, so they never coincide with training users).

Sequences. The prompt is the user's history rendered by `render_prompts` with PPO's prompt
length (the most recent `rollout.history_items` items and more when they fit). PPO asks the
model to score whole slates of K items, so the compared item is placed in a slate: half the
pairs get a full K-item slate whose other K - 1 slots hold random items (outside the history,
never the compared ones) SHARED by both sides of the pair, with the compared item in a uniform
random slot; the other half a one-item completion (item, EOS). The shared fillers keep the
label exact for a slate (raising one slot's utility with the rest fixed raises the click
probability under a multinomial logit), and both formats cost the same: PPO's completion
format throughout, K = 1 included.

Normalisation. After training, `reward.normalize_samples` slates are sampled from the starting
policy with `rollout` (the run's spec: constrained decoding, temperature) and scored; their
mean and std are kept, so `reward_scores` = (r - mean) / std has mean 0 and std 1 on the
starting (SFT) policy's own outputs, the scale PPO's KL coefficient is tuned against.

Outputs in the work dir: DIR/metrics.jsonl lines {"stage": "reward", "step": i,
"reward_model/loss", "reward_model/acc", "reward_model/eval_loss", "reward_model/eval_acc",
...} (other stages' lines kept), TensorBoard scalars under DIR/tb, and Orbax checkpoints under
DIR/checkpoints/reward/<step> (every `eval_every` steps and at the end; the record holds the
step, `done`, the normalisation and the summary). A rerun resumes from the latest checkpoint;
a finished stage returns its summary at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxrec.codec import ItemCodec, history_mask, render_prompts, render_slates
from jaxrec.config import Config, ModelConfig, RewardConfig, dump_config
from jaxrec.models import forward, init_value_params
from jaxrec.rollout import RolloutSpec, rollout
from jaxrec.sim import Environment
from jaxrec.train.distributed import is_primary, primary_log
from jaxrec.train.placement import Placement
from jaxrec.train.setup import load_ratings
from jaxrec.train.stages import metrics_before, metrics_writer, stop_requests, write_config

PAIRS_PER_USER = 16  # preference_pairs per MovieLens user
TIE = 1e-6  # utilities closer than this give a pair of weight 0
FULL_SLATE_SHARE = 0.5  # pairs rendered as whole K-item slates (the rest: one-item completions)
EVAL_CHUNK = 256  # held-out pairs scored per jitted call
_TRAIN, _EVAL, _NORM = 1, 2, 3  # key streams folded into key(seed)


# --- the model and its scores ------------------------------------------------------------------


@struct.dataclass
class RewardModel:
    """A trained reward model: params of a value-head LM, and the normalisation of its score."""

    params: Any  # backbone + value_head [D] + value_bias []
    mean: jax.Array  # [] float32 mean raw score of the starting policy's samples
    std: jax.Array  # [] float32 their std
    model: ModelConfig = struct.field(pytree_node=False)


def raw_scores(model: ModelConfig, params: Any, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """tokens [B, T] int32, valid [B, T] bool -> [B] float32: the value head at each row's last
    real token (0 for a row with none)."""
    values = forward(model, params, tokens, valid, head="value").values  # [B, T] float32
    t = tokens.shape[1]
    last = jnp.max(jnp.where(valid, jnp.arange(t, dtype=jnp.int32), -1), axis=1)  # [B]
    picked = jnp.take_along_axis(values, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    return jnp.where(last >= 0, picked, 0.0).astype(jnp.float32)


def reward_scores(rm: RewardModel, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, T] tokens and valid mask -> [B] float32 normalised scores (r - mean) / std."""
    return (raw_scores(rm.model, rm.params, tokens, valid) - rm.mean) / rm.std


def with_reward_model(state, rm: RewardModel, frozen_dtype: str = "float32"):
    """A PPO TrainState carrying a copy of `rm` in `state.frozen["reward"]` (never trained; an
    argument of the jitted iteration, and part of the PPO checkpoint). A copy, because the
    iteration donates its state: `rm` itself stays usable. `frozen_dtype` 'bfloat16' stores
    its params in bfloat16 (its normalisation scalars stay float32)."""
    params = rm.params
    if frozen_dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    rm = rm.replace(params=jax.tree.map(jnp.copy, params), mean=jnp.copy(rm.mean),
                    std=jnp.copy(rm.std))
    return state.replace(frozen={**state.frozen, "reward": rm})


def bradley_terry(chosen: jax.Array, rejected: jax.Array, weight: jax.Array):
    """Scores [B] of the preferred and the other side, weights [B] -> (loss, accuracy).

    loss = -sum w log sigmoid(chosen - rejected) / sum w; accuracy counts a tie as half.
    """
    margin = chosen - rejected  # [B]
    total = jnp.maximum(jnp.sum(weight), 1e-9)
    loss = -jnp.sum(weight * jax.nn.log_sigmoid(margin)) / total
    hit = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    return loss, jnp.sum(weight * hit) / total


# --- pairs -------------------------------------------------------------------------------------


@struct.dataclass
class PairBatch:
    """Tokenised preference pairs, laid out as PPO lays out a rollout row."""

    chosen: jax.Array  # [B, T] int32 prompt + preferred completion
    chosen_valid: jax.Array  # [B, T] bool
    rejected: jax.Array  # [B, T] int32 prompt + other completion
    rejected_valid: jax.Array  # [B, T] bool
    weight: jax.Array  # [B] float32, 0 for pairs that cannot be ordered (and padding)


def pair_kind(config: Config) -> str:
    """'ratings' or 'simulator': `reward.pairs` with 'auto' resolved; one-line errors."""
    pairs, source = config.reward.pairs, config.data.source
    if pairs == "auto":
        return "simulator" if source == "synthetic" else "ratings"
    if pairs == "ratings" and source == "synthetic":
        raise ValueError("reward.pairs='ratings' needs a MovieLens data.source (ratings to "
                         "compare); use 'simulator' or 'auto' with data.source='synthetic'")
    return pairs


def item_utility(env: Environment, env_params: Any, states: Any, items: jax.Array) -> jax.Array:
    """[B, M] catalogue ids -> [B, M] float32: how much each user's model likes each item.

    Synthetic: the click model's slot utility without position and seen terms; MovieLens: the
    predicted rating under the user's current taste (the click logit is increasing in it).
    """
    from jaxrec.sim.movielens import MovieLensEnv
    from jaxrec.sim.synthetic import SyntheticEnv

    if isinstance(env, SyntheticEnv):
        cat, p = env_params.catalogue, env_params
        affinity = jnp.einsum("bmt,bt->bm", cat.features[items], states.interest)  # [B, M]
        return (p.interest_weight * affinity + p.quality_weight * cat.quality[items]
                - p.price_weight * jnp.log1p(cat.price[items]))
    if isinstance(env, MovieLensEnv):
        return jax.vmap(env.predicted_ratings, in_axes=(0, None, 0))(states, env_params, items)
    raise ValueError(f"reward.pairs='simulator' knows the synthetic and movielens user models, "
                     f"not {type(env).__name__}")


def _draw(key: jax.Array, excluded: jax.Array, m: int) -> jax.Array:
    """excluded [B, N] bool -> [B, m] int32 distinct items drawn uniformly from the rest."""
    gumbel = jax.random.gumbel(key, excluded.shape)  # [B, N]
    return jax.lax.top_k(jnp.where(excluded, -jnp.inf, gumbel), m)[1].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PairSampler:
    """Static description of where a batch of pairs comes from (hashable: part of a jit).

    `draw(data, key, n)` -> (histories [n, H], chosen [n], rejected [n], weight [n]); `data` is
    a pytree argument: the simulator's params ('simulator') or the pair table ('ratings').
    """

    kind: str  # 'simulator' | 'ratings'
    env: Environment

    def draw(self, data: Any, key: jax.Array, n: int, codec: ItemCodec):
        if self.kind == "ratings":
            idx = jax.random.randint(key, (n,), 0, data["user"].shape[0])
            return self.rows(data, idx)
        k_users, k_items = jax.random.split(key)
        _, states = self.env.reset_batch(k_users, n, data)
        histories = jax.vmap(self.env.observation, in_axes=(0, None))(states, data)  # [n, H]
        items = _draw(k_items, history_mask(codec, histories), 2)  # [n, 2]
        u = item_utility(self.env, data, states, items)  # [n, 2]
        first = u[:, 0] >= u[:, 1]
        chosen = jnp.where(first, items[:, 0], items[:, 1])
        rejected = jnp.where(first, items[:, 1], items[:, 0])
        weight = (jnp.abs(u[:, 0] - u[:, 1]) > TIE).astype(jnp.float32)
        return histories, chosen, rejected, weight

    @staticmethod
    def rows(data: dict, idx: jax.Array):
        """Rows `idx` of a pair table (ratings)."""
        histories = data["histories"][data["user"][idx]]  # [n, H]
        return histories, data["hi"][idx], data["lo"][idx], jnp.ones(idx.shape, jnp.float32)


def render_pairs(codec: ItemCodec, spec: RolloutSpec, histories: jax.Array, chosen: jax.Array,
                 rejected: jax.Array, weight: jax.Array, key: jax.Array) -> PairBatch:
    """Pairs -> PPO-layout token rows (module docstring: shared fillers, random slot, half the
    pairs one-item completions)."""
    n, k = chosen.shape[0], spec.slate_size
    k_fill, k_slot, k_full = jax.random.split(key, 3)
    rows = jnp.arange(n)
    excluded = history_mask(codec, histories)  # [n, N]
    excluded = excluded.at[rows, chosen].set(True).at[rows, rejected].set(True)
    slot = jax.random.randint(k_slot, (n,), 0, k)  # [n] where the compared item goes
    j = jnp.arange(k)[None, :]  # [1, K]
    if k > 1:
        fillers = _draw(k_fill, excluded, k - 1)  # [n, K-1], shared by both sides
        full = jax.random.bernoulli(k_full, FULL_SLATE_SHARE, (n,))  # [n] a whole slate or one item
        from_fill = jnp.take_along_axis(fillers, jnp.clip(jnp.where(j < slot[:, None], j, j - 1),
                                                          0, k - 2), axis=1)  # [n, K]
        others = jnp.where(full[:, None], from_fill, -1)
    else:
        others = jnp.full((n, k), -1, jnp.int32)
    prompt, prompt_valid = render_prompts(codec, histories, spec.prompt_len)  # [n, P]

    def sequence(item):
        slate = jnp.where(j == slot[:, None], item[:, None], others)  # [n, K], -1 skipped
        completion, mask = render_slates(codec, slate, spec.max_new_tokens)  # [n, R]
        return (jnp.concatenate([prompt, completion], axis=1),
                jnp.concatenate([prompt_valid, mask], axis=1))

    (ct, cv), (rt, rv) = sequence(chosen), sequence(rejected)
    return PairBatch(chosen=ct, chosen_valid=cv, rejected=rt, rejected_valid=rv,
                     weight=weight.astype(jnp.float32))


def _ratings_tables(config: Config, env_params: Any, ban: bool):
    """(train pair table, eval pair table, counts) from the MovieLens training split.

    Users are split at random (seed): held-out pairs come from users never trained on.
    """
    from jaxrec.data import leave_one_out, preference_pairs

    ratings = load_ratings(config)
    train_rows = leave_one_out(ratings).train
    pairs = preference_pairs(ratings, train_rows, pairs_per_user=PAIRS_PER_USER,
                             seed=config.seed)
    table = np.asarray(env_params.histories)  # [U, H] the simulator's (and PPO's) histories
    user, hi, lo = pairs.user, pairs.item_hi, pairs.item_lo
    if ban:  # PPO never recommends a history item: such pairs would teach a shortcut
        seen = ((table[user] == hi[:, None]) | (table[user] == lo[:, None])).any(axis=1)
        user, hi, lo = user[~seen], hi[~seen], lo[~seen]
    rng = np.random.default_rng([config.seed, 7])
    people = rng.permutation(np.unique(user))
    counts = np.bincount(user, minlength=table.shape[0])[people]
    n_eval_users = int(np.searchsorted(np.cumsum(counts), config.reward.eval_pairs)) + 1
    if n_eval_users >= len(people):
        raise ValueError(f"reward.eval_pairs={config.reward.eval_pairs} needs about as many "
                         f"pairs as the {len(people)} rated users give; lower it")
    held = np.isin(user, people[:n_eval_users])
    order = rng.permutation(np.flatnonzero(held))[:config.reward.eval_pairs]
    as_table = lambda rows: {"histories": jnp.asarray(table), "user": jnp.asarray(user[rows]),
                             "hi": jnp.asarray(hi[rows]), "lo": jnp.asarray(lo[rows])}
    train = np.flatnonzero(~held)
    return as_table(train), as_table(order), {"train_pairs": len(train),
                                             "eval_pairs": len(order),
                                             "eval_users": n_eval_users}


def _simulator_params(config: Config, env: Environment, env_params: Any):
    """(train params, eval params, counts): MovieLens users split at random into training and
    held-out starts; synthetic users need no split (continuous random interests)."""
    from jaxrec.sim.movielens import MovieLensEnv

    if not isinstance(env, MovieLensEnv):
        return env_params, env_params, {"eval_pairs": config.reward.eval_pairs}
    start = np.asarray(env_params.start_users)
    rng = np.random.default_rng([config.seed, 7])
    start = rng.permutation(start)
    n_eval = int(np.clip(config.reward.eval_pairs // 4, 1, len(start) // 2))
    if n_eval < 1 or len(start) - n_eval < 1:
        raise ValueError(f"reward: {len(start)} simulated users cannot be split into training "
                         "and held-out users")
    pick = lambda users: env_params.replace(start_users=jnp.asarray(users, jnp.int32))
    return pick(start[n_eval:]), pick(start[:n_eval]), {"eval_pairs": config.reward.eval_pairs,
                                                         "eval_users": n_eval}


# --- training ----------------------------------------------------------------------------------


@struct.dataclass
class RMState:
    """The reward model's training state."""

    step: jax.Array  # [] int32 optimizer steps taken
    params: Any  # backbone + value head
    opt_state: Any  # AdamW state
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


@functools.lru_cache(maxsize=16)
def make_optimizer(cfg: RewardConfig) -> optax.GradientTransformation:
    """Global-norm clipping at 1.0, then AdamW with a linear warm-up to `lr`, then constant.
    Cached: equal settings give the same object (so states' tree structures match)."""
    lr = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps > 0:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), lr], [cfg.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lr, weight_decay=cfg.weight_decay))


def init_state(cfg: RewardConfig, policy_params: Any) -> RMState:
    params = init_value_params(policy_params)
    tx = make_optimizer(cfg)
    return RMState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   tx=tx)


def _pair_scores(model: ModelConfig, params: Any, batch: PairBatch):
    """Both sides in one forward pass: ([B], [B])."""
    tokens = jnp.concatenate([batch.chosen, batch.rejected], axis=0)  # [2B, T]
    valid = jnp.concatenate([batch.chosen_valid, batch.rejected_valid], axis=0)
    r = raw_scores(model, params, tokens, valid)
    n = batch.chosen.shape[0]
    return r[:n], r[n:]


def train_step(state: RMState, codec: ItemCodec, data: Any, key: jax.Array, *,
               sampler: PairSampler, spec: RolloutSpec, model: ModelConfig, batch_size: int,
               rows: jax.sharding.Sharding | None = None):
    """One AdamW step on a batch drawn from `key`: (state, metrics). `rows`: on a mesh, how
    the drawn pairs are split over the devices (data parallel)."""
    k_pairs, k_render = jax.random.split(key)
    pairs = sampler.draw(data, k_pairs, batch_size, codec)
    batch = render_pairs(codec, spec, *pairs, k_render)
    if rows is not None:
        batch = jax.lax.with_sharding_constraint(batch, rows)

    def loss_fn(params):
        loss, acc = bradley_terry(*_pair_scores(model, params, batch), batch.weight)
        return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    metrics = {"reward_model/loss": loss, "reward_model/acc": acc,
               "reward_model/grad_norm": optax.tree.norm(grads)}
    return state, metrics


class RewardRun:
    """Everything the reward stage needs, built once from a Config (and its Setup)."""

    def __init__(self, config: Config, setup=None, policy_params=None):
        from jaxrec.train.setup import build_setup

        self.config = config
        self.kind = pair_kind(config)  # errors before the (slow) world is built
        setup = build_setup(config) if setup is None else setup
        self.placed = Placement(config, setup.model, config.reward.batch_size,
                                "reward.batch_size")
        # on a mesh, the world's arrays whole on every device (what the jitted steps read)
        setup = dataclasses.replace(setup, codec=self.placed.host_whole(setup.codec),
                                    env_params=self.placed.host_whole(setup.env_params))
        self.setup = setup
        self.model, self.spec, self.codec = setup.model, setup.spec, setup.codec
        self.policy_params = self.placed.host_whole(
            setup.params if policy_params is None else policy_params)
        n_items = setup.codec.num_items
        if n_items < config.sim.history_len + self.spec.slate_size + 1:
            raise ValueError(f"reward: {n_items} items cannot fill slates of "
                             f"{self.spec.slate_size} besides a {config.sim.history_len}-item "
                             "history and the compared pair")
        self.key = self.placed.whole(lambda: jax.random.key(config.seed))
        self.sampler = PairSampler(kind=self.kind, env=setup.env)

    # built lazily: loading a finished model needs none of this
    def prepare(self):
        cfg, setup = self.config, self.setup
        if self.kind == "ratings":
            self.train_data, self.eval_data, self.counts = _ratings_tables(
                cfg, setup.env_params, self.spec.ban_history)
            self.train_data, self.eval_data = self.placed.host_whole(
                (self.train_data, self.eval_data))
            pairs = PairSampler.rows(self.eval_data, jnp.arange(self.counts["eval_pairs"]))
        else:
            self.train_data, self.eval_data, self.counts = _simulator_params(
                cfg, setup.env, setup.env_params)
            self.train_data, self.eval_data = self.placed.host_whole(
                (self.train_data, self.eval_data))
            pairs = _jit_draw(self.sampler, self.eval_data, jax.random.fold_in(self.key, _EVAL),
                              cfg.reward.eval_pairs, self.codec)
        self.eval_batch = _jit_render(self.codec, self.spec, *pairs,
                                      jax.random.fold_in(self.key, _EVAL + 100))
        return self

    def step(self, state: RMState, i: int):
        return _jit_train_step(state, self.codec, self.train_data,
                               jax.random.fold_in(jax.random.fold_in(self.key, _TRAIN), i),
                               sampler=self.sampler, spec=self.spec, model=self.model,
                               batch_size=self.config.reward.batch_size, rows=self.placed.rows)

    def evaluate(self, params) -> dict[str, float]:
        """Held-out loss and pairwise accuracy (pairs of weight 0 excluded)."""
        batch = self.eval_batch
        n = batch.weight.shape[0]
        chunk = min(n, EVAL_CHUNK)
        pad = -n % chunk
        padded = jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), batch)
        sums = np.zeros(3)
        for s in range(0, n + pad, chunk):
            part = jax.tree.map(lambda x, s=s: x[s:s + chunk], padded)
            sums += np.asarray(_eval_sums(self.model, params, part), np.float64)
        w = max(sums[2], 1e-9)
        return {"reward_model/eval_loss": float(sums[0] / w),
                "reward_model/eval_acc": float(sums[1] / w)}

    def normalisation(self, params) -> tuple[float, float]:
        """Mean and std of the raw scores of `normalize_samples` slates sampled from the
        starting policy (the run's rollout spec), on fresh simulated users."""
        total = self.config.reward.normalize_samples
        chunks = policy_samples(self.setup, self.policy_params, jax.random.fold_in(self.key, _NORM),
                                total, self.config.rollout.users)
        scores = [np.asarray(_jit_raw_scores(self.model, params, t, v)) for t, v in chunks]
        r = np.concatenate(scores)[:total].astype(np.float64)
        return float(r.mean()), float(max(r.std(), 1e-6))

    def placeholders(self) -> tuple[Any, jax.Array]:
        """(a placeholder simulator state, key): what a checkpoint holds besides the state."""
        return {"none": self.placed.whole(lambda: jnp.zeros((), jnp.int32))}, self.key

    def initial(self) -> tuple[RMState, Any, jax.Array]:
        """(state, a placeholder simulator state, key) at step 0."""
        init = functools.partial(init_state, self.config.reward)
        state = self.placed.train_state(init, self.policy_params,
                                        make_optimizer(self.config.reward))
        return (state, *self.placeholders())


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model, params, batch: PairBatch):
    chosen, rejected = _pair_scores(model, params, batch)
    margin = chosen - rejected
    hit = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    w = batch.weight
    return jnp.stack([-jnp.sum(w * jax.nn.log_sigmoid(margin)), jnp.sum(w * hit), jnp.sum(w)])


# Module-level jits: every run of the same shapes (a resumed run, a test) reuses the compile.
_jit_raw_scores = jax.jit(raw_scores, static_argnums=0)
_jit_train_step = jax.jit(train_step, donate_argnums=0,
                          static_argnames=("sampler", "spec", "model", "batch_size", "rows"))
_jit_draw = jax.jit(lambda sampler, data, key, n, codec: sampler.draw(data, key, n, codec),
                    static_argnums=(0, 3))
_jit_render = jax.jit(render_pairs, static_argnums=(1,))


def policy_samples(setup, params: Any, key: jax.Array, n: int, chunk: int):
    """At least `n` sequences (prompt + completion) sampled by `rollout` from the policy
    `params` for fresh simulated users, in batches of min(chunk, n) rows (PPO's `rollout.users`
    bounds the memory): a list of (tokens [C, T] int32, valid [C, T] bool)."""
    rows = min(chunk, n)
    out = []
    for c in range(-(-n // rows)):
        k_users, k_ro = jax.random.split(jax.random.fold_in(key, c))
        _, states = setup.env.reset_batch(k_users, rows, setup.env_params)
        ro = policy_rollout(setup, params, states, k_ro)
        out.append((jnp.concatenate([ro.prompt, ro.completion], axis=1),
                    jnp.concatenate([ro.prompt_valid, ro.completion_mask], axis=1)))
    return out


@functools.lru_cache(maxsize=8)
def _sampler(model: ModelConfig, env: Environment, spec: RolloutSpec):
    """Jitted (params, codec, env_params, users, key) -> Rollout (the next users dropped)."""
    return jax.jit(lambda params, codec, env_params, users, key: rollout(
        model, params, codec, env, env_params, users, key, spec)[0])


def policy_rollout(setup, params: Any, users: Any, key: jax.Array):
    """`rollout` of the setup's world and spec for `users`, compiled once per shape."""
    return _sampler(setup.model, setup.env, setup.spec)(params, setup.codec, setup.env_params,
                                                       users, key)


# --- the stage ---------------------------------------------------------------------------------


def _checkpointer(config: Config, workdir: pathlib.Path):
    from jaxrec.checkpoint import Checkpointer

    return Checkpointer(workdir / "checkpoints" / "reward", keep=config.checkpoint.keep)


def run_reward(config: Config, workdir: str | pathlib.Path, log=print,
               policy_params: Any = None, setup=None) -> dict[str, Any]:
    """Train (or resume) the reward model in `workdir`; returns the summary.

    `policy_params`: the policy the model starts from and is normalised against (e.g. the SFT
    stage's); default the setup's starting params. `setup`: a prebuilt `build_setup(config)`.
    """
    from jaxrec.train.report import TensorBoard

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log, primary = primary_log(log), is_primary()  # several hosts: process 0 writes the files
    rc = config.reward
    run = RewardRun(config, setup=setup, policy_params=policy_params)
    state, sim_state, key = run.initial()
    ckpt = _checkpointer(config, workdir)
    try:
        start, record = 0, {}
        if ckpt.latest_step() is not None:
            state, sim_state, key, record = ckpt.restore(None, state, sim_state, key)
            start = int(record["step"])
            if record.get("done") and start == rc.steps:
                log(f"reward: the stage is finished ({ckpt.directory}/{start})")
                return record["summary"]
            if start > rc.steps or (start == rc.steps and not record.get("done")):
                raise ValueError(f"reward: the checkpoint at step {start} in {ckpt.directory} does "
                                 f"not fit reward.steps={rc.steps}; use a fresh work dir")
            log(f"resuming the reward stage at step {start} from {ckpt.directory}")
        write_config(config, workdir, log)  # the checkpoint fits this config
        run.prepare()
        resolved = dump_config(config)
        metrics_path = workdir / "metrics.jsonl"
        kept = metrics_before(metrics_path, "reward", start)
        board = TensorBoard(workdir, enabled=primary)
        ours = [x for x in kept if x.get("stage") == "reward"]
        interrupted = None
        with stop_requests() as stop, metrics_writer(metrics_path, primary) as out:
            for line in kept:
                out.write(json.dumps(line) + "\n")

            def emit(line):
                ours.append(line)
                out.write(json.dumps(line) + "\n")
                out.flush()
                board.write(line)

            if start == 0:
                first = {"stage": "reward", "step": 0, **run.evaluate(state.params)}
                emit(first)
                log(f"reward 0/{rc.steps}  eval acc {first['reward_model/eval_acc']:.3f}  "
                    f"eval loss {first['reward_model/eval_loss']:.4f}")
            for i in range(start, rc.steps):
                state, metrics = run.step(state, i)
                line = {"stage": "reward", "step": i + 1,
                        **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                if not np.isfinite(line["reward_model/loss"]):
                    raise FloatingPointError(f"reward: the loss at step {i + 1} is not finite")
                final = i + 1 == rc.steps
                if (i + 1) % rc.eval_every == 0 or final:
                    line.update(run.evaluate(state.params))
                    log(f"reward {i + 1}/{rc.steps}  loss {line['reward_model/loss']:.4f}  "
                        f"eval acc {line['reward_model/eval_acc']:.3f}  "
                        f"eval loss {line['reward_model/eval_loss']:.4f}")
                stopping = stop["signal"] is not None and not final
                if not final and ((i + 1) % rc.eval_every == 0 or stopping):
                    ckpt.save(i + 1, state, sim_state, key,
                              {"step": i + 1, "done": False, "mean": None, "std": None,
                               "config": resolved})
                emit(line)
                if stopping:
                    interrupted = signal.Signals(stop["signal"]).name
                    log(f"{interrupted}: saved reward step {i + 1}; rerun the command to resume")
                    break
        board.close()
        if interrupted:
            ckpt.wait()
            return {"stage": "reward", "steps": rc.steps, "interrupted": interrupted}
        mean, std = run.normalisation(state.params)
        if std < 1e-4:
            log(f"note: the reward model scores the starting policy's samples almost alike (std "
                f"{std:.2g}); its normalised scores amplify tiny differences")
        evals = [x for x in ours if "reward_model/eval_acc" in x]
        summary = {
            "stage": "reward",
            "pairs": run.kind,
            "steps": rc.steps,
            **run.counts,
            "eval_acc_first": evals[0]["reward_model/eval_acc"] if evals else None,
            "eval_acc_last": evals[-1]["reward_model/eval_acc"] if evals else None,
            "eval_loss_first": evals[0]["reward_model/eval_loss"] if evals else None,
            "eval_loss_last": evals[-1]["reward_model/eval_loss"] if evals else None,
            "norm_mean": mean,
            "norm_std": std,
        }
        ckpt.save(rc.steps, state, sim_state, key,
                  {"step": rc.steps, "done": True, "mean": mean, "std": std, "config": resolved,
                   "summary": summary})
        ckpt.wait()
    finally:
        ckpt.close()
    log(f"reward: held-out pairwise accuracy {summary['eval_acc_first']:.3f} -> "
        f"{summary['eval_acc_last']:.3f}; scores of the starting policy: mean {mean:.4f}, "
        f"std {std:.4f} (normalised to 0 / 1)")
    return summary


def load_reward_model(config: Config, workdir: str | pathlib.Path, setup=None,
                      policy_params: Any = None) -> RewardModel:
    """The finished reward stage's model from DIR/checkpoints/reward (one-line errors)."""
    workdir = pathlib.Path(workdir)
    ckpt = _checkpointer(config, workdir)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no reward model in {ckpt.directory}: run the 'reward' "
                                    "stage first (stages: [reward, ppo])")
        run = RewardRun(config, setup=setup, policy_params=policy_params)
        target = jax.eval_shape(lambda: init_state(config.reward, run.policy_params))
        state, _, _, record = ckpt.restore(None, target, *run.placeholders())
    finally:
        ckpt.close()
    if not record.get("done"):
        raise ValueError(f"the reward stage in {ckpt.directory} stopped at step "
                         f"{record['step']}: rerun it to finish before PPO uses it")
    return RewardModel(params=state.params, mean=jnp.asarray(record["mean"], jnp.float32),
                       std=jnp.asarray(record["std"], jnp.float32), model=run.model)


__all__ = [
    "PairBatch",
    "PairSampler",
    "RMState",
    "RewardModel",
    "RewardRun",
    "bradley_terry",
    "init_state",
    "item_utility",
    "load_reward_model",
    "make_optimizer",
    "pair_kind",
    "policy_rollout",
    "policy_samples",
    "raw_scores",
    "render_pairs",
    "reward_scores",
    "run_reward",
    "train_step",
    "with_reward_model",
]

"""The one RLHF iteration, compiled once:

    iteration(state, sim_state, key) -> (state, sim_state, metrics)

    rollout        histories -> prompts [B, P] -> constrained generation [B, R] -> slates [B, K]
                   -> simulator step (reward [B], next users); with rollout turns N > 1, N
                   such turns in one sequence per user, each prompt re-rendered from the
                   updated history (jaxrec.rollout.Session)
    score          teacher-forced on tokens [B, L = N (P + R)]: policy log-probs at the
                   sampling temperature, reference log-probs, values
    shape          score_bn = reward_bn + penalties (invalid item, missing EOS), optionally
                   normalised / clipped, placed on turn n's last action token; reward is the
                   simulator's reward, a reward model's normalised score of the tokens, or
                   the mix (1 - w) * simulator + w * model (`reward_source`)
                   r_t = score_t - beta * KL_t on the action tokens
    GAE            advantages and returns over the action tokens (prompt tokens of later
                   turns pass the carry through, so credit flows across turns)
    ppo_step       E epochs x M minibatches (see jaxrec.train.step)
    KL controller  beta <- adaptive or fixed update with the batch's mean KL per sequence

Only scalars leave the jit (`metrics`). State and user states are donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrec.codec import ItemCodec
from jaxrec.config import PPOConfig
from jaxrec.generation import sequence_scores
from jaxrec.ppo import (
    adaptive_kl_update,
    apply_penalties,
    clip_scores,
    fixed_kl_update,
    gae,
    last_token_positions,
    normalize_scores,
    place_scores,
    shape_rewards,
)
from jaxrec.rollout import Rollout, RolloutSpec, Session, rollout, rollout_session
from jaxrec.sim import Environment
from jaxrec.train.reward_model import RewardModel, reward_scores
from jaxrec.train.sft import draw_ptx
from jaxrec.train.state import TrainState
from jaxrec.train.step import PPOBatch, _values, ppo_step

REWARD_SOURCES = ("simulator", "model", "mix")
PTX_SALT = 7  # fold_in tag of the PPO-ptx draw (the rollout and update keys are split apart)


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """How a slate's simulator reward becomes the sequence score PPO maximises."""

    invalid_penalty: float = -1.0  # added when any slot of the slate names no valid item
    missing_eos_penalty: float = -1.0  # added when the completion did not end with EOS
    normalize: bool = False  # batch-normalise scores to mean 0, std 1
    clip: float | None = None  # clip scores to [-clip, clip] (after normalising)
    whiten_rewards: bool = False  # whiten the shaped per-token rewards (mean kept)


def score_spec(config: PPOConfig) -> ScoreSpec:
    """The ScoreSpec a config's ppo section sets."""
    return ScoreSpec(invalid_penalty=config.invalid_penalty,
                     missing_eos_penalty=config.missing_eos_penalty,
                     normalize=config.normalize_scores, clip=config.score_clip,
                     whiten_rewards=config.whiten_rewards)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def session_of(ro: Rollout) -> Session:
    """A single-turn rollout as a one-turn Session: [prompt | completion] per row."""
    tokens = jnp.concatenate([ro.prompt, ro.completion], axis=1)  # [B, P + R]
    valid = jnp.concatenate([ro.prompt_valid, ro.completion_mask], axis=1)
    action = jnp.concatenate([jnp.zeros_like(ro.prompt_valid), ro.completion_mask], axis=1)
    last = last_token_positions(action)  # [B]
    return Session(
        tokens=tokens, valid=valid, action=action, allowed=ro.allowed,
        behaviour_logp=jnp.concatenate([jnp.zeros(ro.prompt.shape, jnp.float32),
                                        jnp.where(ro.completion_mask, ro.behaviour_logp, 0.0)],
                                       axis=1),
        last_action=jnp.where(action.any(axis=1), last, -1)[:, None],
        reward=ro.reward[:, None], items=ro.items[:, None], item_valid=ro.item_valid[:, None],
        has_eos=ro.has_eos[:, None], done=ro.done[:, None], clicked=ro.clicked[:, None],
        active=jnp.ones_like(ro.done)[:, None],
    )


def _sequence_rewards(state: TrainState, ro: Session, tokens, valid,
                      reward_model: RewardModel | None, source: str, mix: float):
    """[B, T] the score each turn earns before penalties, and its metrics.

    'simulator': the rollout's reward; 'model': the reward model's normalised score of the
    prompt + completion tokens; 'mix': (1 - mix) * simulator + mix * model. The reward model
    is read from `state.frozen["reward"]` when the state carries one (an argument of the jitted
    iteration, so big models are never baked into the program as constants), else the one
    given to `build_iteration` (closed over: fine for small models and tests).
    """
    if source == "simulator":
        return ro.reward, {}
    rm = state.frozen["reward"] if "reward" in state.frozen else reward_model
    model = jax.lax.stop_gradient(reward_scores(rm, tokens, valid))[:, None]  # [B, 1]
    scores = model if source == "model" else (1.0 - mix) * ro.reward + mix * model
    return scores, {"reward/model_mean": model.mean()}


def _ppo_batch(state: TrainState, ro: Session, spec: RolloutSpec, score: ScoreSpec,
               config: PPOConfig, reward_model: RewardModel | None = None,
               reward_source: str = "simulator", reward_mix: float = 0.5):
    cfg = state.model
    tokens, valid, action = ro.tokens, ro.valid, ro.action  # [B, L] each
    temperature = config.temperature  # the sampling one (build_iteration checks)
    window = config.action_window
    policy = None  # a teacher-forced pass of the policy, when its log-probs or values are used
    if config.old_logp == "rescore" or config.shared_value:
        policy = sequence_scores(cfg, state.policy_params(), tokens, valid, temperature=temperature,
                                 shared_value=config.shared_value, window=window,
                                 allowed=ro.allowed)
    values = (policy.values if config.shared_value
              else _values(cfg, state.value_params(), tokens, valid, window))
    # 'sampler': the decoder's log-probs are under the same distribution (temperature, allowed
    # tokens) as the teacher-forced pass, up to the cached decode's rounding
    old_logp = (policy.logps if config.old_logp == "rescore"
                else jnp.where(action, ro.behaviour_logp, 0.0))
    old_logp = jax.lax.stop_gradient(old_logp)
    ref_logp = sequence_scores(cfg, state.ref_params, tokens, valid,
                               temperature=temperature, window=window, allowed=ro.allowed).logps

    base, reward_metrics = _sequence_rewards(state, ro, tokens, valid, reward_model,
                                             reward_source, reward_mix)
    scores = apply_penalties(  # [B, T] one score per turn
        base, has_eos=ro.has_eos, valid=jnp.all(ro.item_valid, axis=-1),
        missing_eos_penalty=score.missing_eos_penalty, invalid_penalty=score.invalid_penalty,
    )
    if score.normalize:
        scores = normalize_scores(scores, mask=ro.active, clip=score.clip)
    else:
        scores = clip_scores(scores, score.clip)
    scores = jnp.where(ro.active, scores, 0.0)
    # each turn's score on its last action token; uncounted turns (-1) are dropped
    token_scores = place_scores(scores, ro.last_action, tokens.shape[1])
    rewards, metrics = shape_rewards(token_scores, old_logp, ref_logp, action, state.kl.coef,
                                     kl_kind=config.kl_kind, whiten=score.whiten_rewards)
    advantages, returns = gae(rewards, values, action, config.gamma, config.lam)
    zero = lambda x: jnp.where(action, x, 0.0)
    batch = PPOBatch(
        tokens=tokens, valid=valid, action_mask=action, old_logp=zero(old_logp),
        ref_logp=zero(ref_logp), old_values=zero(values), advantages=advantages,
        returns=returns, allowed=ro.allowed,
    )
    metrics["reward/score_mean"] = _masked_mean(scores, ro.active)
    metrics.update(reward_metrics)
    return batch, metrics


def build_iteration(
    config: PPOConfig,
    spec: RolloutSpec,
    env: Environment,
    env_params: Any,
    codec: ItemCodec,
    score: ScoreSpec = ScoreSpec(),  # noqa: B008 (frozen dataclass)
    *,
    jit: bool = True,
    reward_model: RewardModel | None = None,
    reward_source: str = "simulator",
    reward_mix: float = 0.5,
):
    """The iteration for one world (simulator, catalogue codec) and one set of settings.

    Returns `iteration(state, sim_state, key) -> (state, sim_state, metrics)`; jitted with the
    state and user states donated unless `jit=False` (to vmap it over seeds, for instance).
    A single turn's actions are the completion, the last R tokens of each row, so the
    vocabulary log-probs are computed there only (`action_window` = R unless set).

    PPO-ptx: with `config.ptx_coef > 0` and `state.frozen["ptx"]` holding `PtxRows` (the SFT
    training examples, `with_ptx_rows`), every iteration draws as many of them as it has
    rollout rows and adds ptx_coef times their NLL to the policy loss.

    `reward_source` 'model' or 'mix' scores each sequence with a reward model (see
    `_sequence_rewards`; `reward_mix` is the model's weight in 'mix'): pass it as
    `reward_model`, and put it in `state.frozen["reward"]` (`with_reward_model`) so its params
    are an argument of the jitted iteration rather than constants of the program.
    """
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source={reward_source!r} is not allowed; choose one of "
                         f"{REWARD_SOURCES}")
    if reward_source != "simulator" and reward_model is None:
        raise ValueError(f"reward_source={reward_source!r} needs a reward_model (run the "
                         "'reward' stage, then load_reward_model)")
    if not 0.0 <= reward_mix <= 1.0:
        raise ValueError(f"reward_mix={reward_mix} must be in [0, 1]")
    if spec.turns > 1 and reward_source != "simulator":
        raise ValueError(f"reward_source={reward_source!r} scores whole single-turn sequences; "
                         f"with rollout.turns={spec.turns} use 'simulator'")
    if spec.temperature > 0 and config.temperature != spec.temperature:
        raise ValueError(
            f"ppo.temperature={config.temperature} must equal the rollout's temperature "
            f"{spec.temperature}: the behaviour, reference and updated log-probs are all of the "
            "sampling distribution")
    # actions: the completion (one turn), or everything after the first prompt (a session)
    window = spec.session_len - spec.prompt_len
    if config.action_window is None:
        config = config.replace(action_window=window)
    if spec.constrained and config.action_window != window:
        raise ValueError(
            f"ppo.action_window={config.action_window} must be {window} (the tokens after the "
            "first prompt) with constrained decoding (its masks cover exactly those)"
        )

    seg = spec.prompt_len + spec.max_new_tokens

    def iteration(state: TrainState, sim_state: Any, key: jax.Array):
        key_rollout, key_update = jax.random.split(key)
        policy = state.policy_params()
        if spec.turns == 1:
            ro, sim_state = rollout(state.model, policy, codec, env, env_params, sim_state,
                                    key_rollout, spec)
            ro = session_of(ro)
        else:
            ro, sim_state = rollout_session(state.model, policy, codec, env, env_params,
                                            sim_state, key_rollout, spec)
        batch, metrics = _ppo_batch(state, ro, spec, score, config, reward_model,
                                    reward_source, reward_mix)
        if "ptx" in state.frozen and config.ptx_coef > 0:  # PPO-ptx: fresh SFT rows each time
            rows = draw_ptx(state.frozen["ptx"], jax.random.fold_in(key, PTX_SALT),
                            ro.tokens.shape[0])
            batch = batch.replace(sft_tokens=rows.tokens, sft_mask=rows.mask,
                                  sft_valid=rows.valid)
        state, ppo_metrics = ppo_step(state, batch, key_update, config)
        rows = ro.reward.shape[0]
        if config.kl_adaptive:
            kl = adaptive_kl_update(state.kl, metrics["kl/ref"], rows, config.kl_target,
                                    config.kl_horizon)
        else:
            kl = fixed_kl_update(state.kl, metrics["kl/ref"], rows)
        state = state.replace(kl=kl)
        turn = lambda x: _masked_mean(x.astype(jnp.float32), ro.active)  # over counted turns
        lengths = jnp.stack([ro.action[:, t * seg:(t + 1) * seg].sum(-1)
                             for t in range(spec.turns)], axis=1)  # [B, T]
        metrics.update(ppo_metrics)
        metrics.update({
            "reward/mean": turn(ro.reward),
            "reward/session_return": jnp.mean(jnp.sum(jnp.where(ro.active, ro.reward, 0), 1)),
            "gen/invalid_item_frac": turn(jnp.mean(~ro.item_valid, axis=-1)),  # per slot
            "gen/missing_eos_frac": turn(~ro.has_eos),
            "gen/length_mean": turn(lengths),
            "sim/click_rate": turn(ro.clicked),
            "sim/session_end_frac": turn(ro.done),
            "sim/turns_mean": jnp.mean(jnp.sum(ro.active, axis=1).astype(jnp.float32)),
            "kl/coef_next": kl.coef,
        })
        return state, sim_state, metrics

    return jax.jit(iteration, donate_argnums=(0, 1)) if jit else iteration

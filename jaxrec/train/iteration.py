"""The one RLHF iteration, compiled once:

    iteration(state, sim_state, key) -> (state, sim_state, metrics)

    rollout        histories -> prompts [B, P] -> constrained generation [B, R] -> slates [B, K]
                   -> simulator step (reward [B], next users)
    score          teacher-forced on tokens [B, T = P + R]: policy log-probs at the sampling
                   temperature, reference log-probs, values
    shape          score_b = reward_b + penalties (invalid item, missing EOS), optionally
                   normalised / clipped, placed on the last action token; reward_b is the
                   simulator's reward, a reward model's normalised score of the tokens, or
                   the mix (1 - w) * simulator + w * model (`reward_source`)
                   r_t = score_t - beta * KL_t on the action tokens
    GAE            advantages and returns over the action tokens
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
from jaxrec.rollout import Rollout, RolloutSpec, rollout
from jaxrec.sim import Environment
from jaxrec.train.reward_model import RewardModel, reward_scores
from jaxrec.train.state import TrainState
from jaxrec.train.step import PPOBatch, _values, ppo_step

REWARD_SOURCES = ("simulator", "model", "mix")


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """How a slate's simulator reward becomes the sequence score PPO maximises."""

    invalid_penalty: float = -1.0  # added when any slot of the slate names no valid item
    missing_eos_penalty: float = -1.0  # added when the completion did not end with EOS
    normalize: bool = False  # batch-normalise scores to mean 0, std 1
    clip: float | None = None  # clip scores to [-clip, clip] (after normalising)
    whiten_rewards: bool = False  # whiten the shaped per-token rewards (mean kept)


def _sequence_rewards(state: TrainState, ro: Rollout, tokens, valid,
                      reward_model: RewardModel | None, source: str, mix: float):
    """[B] the score each sequence earns before penalties, and its metrics.

    'simulator': the rollout's reward; 'model': the reward model's normalised score of the
    prompt + completion tokens; 'mix': (1 - mix) * simulator + mix * model. The reward model
    is read from `state.frozen["reward"]` when the state carries one (an argument of the jitted
    iteration, so big models are never baked into the program as constants), else the one
    given to `build_iteration` (closed over: fine for small models and tests).
    """
    if source == "simulator":
        return ro.reward, {}
    rm = state.frozen["reward"] if "reward" in state.frozen else reward_model
    model = jax.lax.stop_gradient(reward_scores(rm, tokens, valid))  # [B]
    scores = model if source == "model" else (1.0 - mix) * ro.reward + mix * model
    return scores, {"reward/model_mean": model.mean()}


def _ppo_batch(state: TrainState, ro: Rollout, spec: RolloutSpec, score: ScoreSpec,
               config: PPOConfig, reward_model: RewardModel | None = None,
               reward_source: str = "simulator", reward_mix: float = 0.5):
    cfg = state.model
    tokens = jnp.concatenate([ro.prompt, ro.completion], axis=1)  # [B, T]
    valid = jnp.concatenate([ro.prompt_valid, ro.completion_mask], axis=1)
    action = jnp.concatenate([jnp.zeros_like(ro.prompt_valid), ro.completion_mask], axis=1)
    temperature = spec.temperature if spec.temperature > 0 else 1.0
    window = config.action_window
    policy = sequence_scores(cfg, state.policy, tokens, valid, temperature=temperature,
                             shared_value=config.shared_value, window=window,
                             allowed=ro.allowed)
    values = policy.values if config.shared_value else _values(cfg, state.value, tokens, valid)
    ref_logp = sequence_scores(cfg, state.frozen["ref"], tokens, valid,
                               temperature=temperature, window=window, allowed=ro.allowed).logps
    old_logp = jax.lax.stop_gradient(policy.logps)

    base, reward_metrics = _sequence_rewards(state, ro, tokens, valid, reward_model,
                                             reward_source, reward_mix)
    scores = apply_penalties(
        base, has_eos=ro.has_eos, valid=jnp.all(ro.item_valid, axis=-1),
        missing_eos_penalty=score.missing_eos_penalty, invalid_penalty=score.invalid_penalty,
    )
    if score.normalize:
        scores = normalize_scores(scores, clip=score.clip)
    else:
        scores = clip_scores(scores, score.clip)
    last = last_token_positions(action)  # [B]
    token_scores = place_scores(scores[:, None], last[:, None], tokens.shape[1])
    rewards, metrics = shape_rewards(token_scores, old_logp, ref_logp, action, state.kl.coef,
                                     kl_kind=config.kl_kind, whiten=score.whiten_rewards)
    advantages, returns = gae(rewards, values, action, config.gamma, config.lam)
    zero = lambda x: jnp.where(action, x, 0.0)
    batch = PPOBatch(
        tokens=tokens, valid=valid, action_mask=action, old_logp=zero(old_logp),
        ref_logp=zero(ref_logp), old_values=zero(values), advantages=advantages,
        returns=returns, allowed=ro.allowed,
    )
    metrics["reward/score_mean"] = scores.mean()
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
    if config.action_window is None:
        config = config.replace(action_window=spec.max_new_tokens)
    if spec.constrained and config.action_window != spec.max_new_tokens:
        raise ValueError(
            f"ppo.action_window={config.action_window} must equal the completion length "
            f"{spec.max_new_tokens} with constrained decoding (its masks cover the completion)"
        )

    def iteration(state: TrainState, sim_state: Any, key: jax.Array):
        key_rollout, key_update = jax.random.split(key)
        ro, sim_state = rollout(state.model, state.policy, codec, env, env_params, sim_state,
                                key_rollout, spec)
        batch, metrics = _ppo_batch(state, ro, spec, score, config, reward_model,
                                    reward_source, reward_mix)
        state, ppo_metrics = ppo_step(state, batch, key_update, config)
        rows = ro.reward.shape[0]
        if config.kl_adaptive:
            kl = adaptive_kl_update(state.kl, metrics["kl/ref"], rows, config.kl_target,
                                    config.kl_horizon)
        else:
            kl = fixed_kl_update(state.kl, metrics["kl/ref"], rows)
        state = state.replace(kl=kl)
        f32 = lambda x: jnp.mean(x.astype(jnp.float32))
        metrics.update(ppo_metrics)
        metrics.update({
            "reward/mean": f32(ro.reward),
            "gen/invalid_item_frac": f32(~ro.item_valid),
            "gen/missing_eos_frac": f32(~ro.has_eos),
            "gen/length_mean": f32(ro.completion_mask.sum(-1)),
            "sim/click_rate": f32(ro.clicked),
            "sim/session_end_frac": f32(ro.done),
            "kl/coef_next": kl.coef,
        })
        return state, sim_state, metrics

    return jax.jit(iteration, donate_argnums=(0, 1)) if jit else iteration

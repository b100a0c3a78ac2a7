"""The pure PPO update: `state, metrics = ppo_step(state, batch, key, config)`.

Shapes: B rollout rows, T tokens per row (prompt and completion, left padded), M minibatches,
E epochs, V vocab. Per-token arrays are aligned with token positions: entry t is about token t,
predicted from the state after tokens < t.

For each epoch e (a `lax.scan`) the rows are shuffled (within `shuffle_blocks` contiguous
blocks, or within the device's rows inside shard_map) and cut into M minibatches (a `lax.scan`);
for each minibatch, with m the action mask and N = sum(m) over the whole minibatch (all devices;
with `grad_accum` k, N is the count over the k minibatches of one optimizer step divided by k,
so the averaged gradient is that of sum / count over all k, whatever their token counts):

    rho_t   = exp(log pi_theta(a_t) - log pi_old(a_t))                    ratio
    A_t     <- (A_t - mean_m A) / std_m A                                 whitening (optional)
    L_pg    = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps_lo, 1+eps_hi)) / N
              (dual clip c, for A_t < 0: min(., -c A_t))
    L_ent   = sum_t m_t H_t / N                                           entropy
    L_ptx   = -sum_t m'_t log pi_theta(y_t) / N'                          PPO-ptx, SFT tokens
    L_pi    = L_pg - c_ent L_ent + alpha L_ptx     (+ c_vf L_V with a shared trunk)
    V_clip  = V_old + clip(V_phi - V_old, -c_v, c_v)
    L_V     = 1/2 sum_t m_t max((V_phi - R_t)^2, (V_clip - R_t)^2) / N
    theta   <- AdamW(clip_by_global_norm(grad L_pi)),  phi <- AdamW(clip(grad L_V))

Inside `jax.shard_map` over `config.data_axis`, each device holds B / D rows; N is a psum of
the local counts, so the local losses add up to the global token mean, and the gradient with
respect to the replicated params arrives summed over devices (shard_map's check_vma): it is
already the gradient of the global loss, and no further pmean is applied. The metrics are
global too (means over every device's tokens), and averaged over the minibatches whose update
was applied (a non-finite one is skipped and counted in ppo/skipped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrec.config import PPOConfig
from jaxrec.generation import sequence_scores
from jaxrec.models import forward, project_values
from jaxrec.ppo import entropy_bonus, policy_loss, ptx_loss, value_loss
from jaxrec.ppo.stats import masked_count, masked_sum
from jaxrec.train.state import TrainState


@struct.dataclass
class PPOBatch:
    tokens: jax.Array  # [B, T] int32 prompt + completion
    valid: jax.Array  # [B, T] bool, False on padding
    action_mask: jax.Array  # [B, T] bool, the policy's own tokens
    old_logp: jax.Array  # [B, T] float32 behaviour log-probs (0 off the actions)
    ref_logp: jax.Array  # [B, T] float32 reference log-probs
    old_values: jax.Array  # [B, T] float32 values at rollout time
    advantages: jax.Array  # [B, T] float32 GAE advantages
    returns: jax.Array  # [B, T] float32 GAE returns
    allowed: jax.Array | None = None  # [B, W, V] bool, constrained decoding's allowed tokens
    #                                   on the action window (needs config.action_window = W)
    sft_tokens: jax.Array | None = None  # [Bs, Ts] int32 supervised rows for PPO-ptx
    sft_mask: jax.Array | None = None  # [Bs, Ts] bool, tokens whose NLL counts (not the prompt)
    sft_valid: jax.Array | None = None  # [Bs, Ts] bool, False on padding (None: no padding)


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def _global_moments(x, mask, axis):
    """(mean, unbiased variance) of x over every device's unmasked entries. Two passes:
    E[x^2] - mean^2 loses the variance to cancellation when the mean is large."""
    n = _psum(masked_count(mask), axis)
    mean = _psum(masked_sum(x, mask), axis) / jnp.maximum(n, 1.0)
    var = _psum(masked_sum(jnp.square(x - mean), mask), axis) / jnp.maximum(n - 1.0, 1.0)
    return mean, var


def _global_whiten(x, mask, axis, eps=1e-8):
    """Whiten with mean and variance over every device's unmasked entries."""
    mean, var = _global_moments(x, mask, axis)
    return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def _values(cfg, value_params, tokens, valid, window: int | None = None):
    """[B, T] V(state before token t) from a separate value network; with `window` W, for the
    last W tokens only (0 before them: PPO reads values on the actions alone), the last block
    running on the last W + 1 positions only."""
    t = tokens.shape[1]
    w = t - 1 if window is None else min(int(window), t - 1)
    hidden = forward(cfg, value_params, tokens, valid, head="none", keep_last=w + 1).hidden
    values = project_values(value_params, hidden[:, :w])  # [B, W]
    return jnp.where(valid, jnp.pad(values, ((0, 0), (t - w, 0))), 0.0)


def _minibatch_indices(key, rows, config: PPOConfig):
    """[M, rows / M] row indices: one permutation shared by `blocks` contiguous blocks."""
    blocks = config.shuffle_blocks if config.data_axis is None else 1
    if rows % (blocks * config.minibatches):
        raise ValueError(
            f"batch rows {rows} must divide into shuffle_blocks={blocks} x "
            f"minibatches={config.minibatches}"
        )
    per_block = rows // blocks
    perm = jax.random.permutation(key, per_block).reshape(config.minibatches, -1)  # [M, b]
    offsets = jnp.arange(blocks) * per_block  # [blocks]
    idx = perm[:, None, :] + offsets[None, :, None]  # [M, blocks, b]
    return idx.reshape(config.minibatches, -1)


def _policy_objective(policy, state: TrainState, mb: PPOBatch, sft, adv, den, sft_den,
                      config):
    cfg = state.model
    policy = state.policy_params(policy)  # differentiable in the trainable part (LoRA: adapters)
    scores = sequence_scores(
        cfg, policy, mb.tokens, mb.valid, temperature=config.temperature,
        shared_value=config.shared_value, window=config.action_window, allowed=mb.allowed,
    )
    mask = mb.action_mask
    pg, metrics = policy_loss(
        scores.logps, mb.old_logp, adv, mask, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, den=den,
    )
    ent, m_ent = entropy_bonus(scores.entropy, mask, den)
    loss = pg - config.ent_coef * ent
    metrics = {**metrics, **m_ent}
    if config.shared_value:
        vf, m_vf = value_loss(scores.values, mb.old_values, mb.returns, mask,
                              clip=config.value_clip, den=den)
        loss = loss + config.vf_coef * vf
        metrics.update(m_vf)
    if sft is not None and config.ptx_coef > 0:
        sft_tokens, sft_mask, sft_valid = sft
        sft_scores = sequence_scores(cfg, policy, sft_tokens, sft_valid)
        nll, m_ptx = ptx_loss(sft_scores.logps, sft_mask, sft_den)
        loss = loss + config.ptx_coef * nll
        metrics.update(m_ptx)
    metrics["ppo/policy_total_loss"] = loss
    return loss, metrics


def _value_objective(value, state: TrainState, mb: PPOBatch, den, config):
    values = _values(state.model, state.value_params(value), mb.tokens, mb.valid,
                     config.action_window)
    return value_loss(values, mb.old_values, mb.returns, mb.action_mask,
                      clip=config.value_clip, den=den)


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _sft_rows(batch: PPOBatch, m, config: PPOConfig):
    """Minibatch m's slice of the PPO-ptx rows: (tokens, mask, valid), each [Bs/M, Ts]."""
    n = batch.sft_tokens.shape[0] // config.minibatches
    valid = (jnp.ones(batch.sft_tokens.shape, jnp.bool_) if batch.sft_valid is None
             else batch.sft_valid)
    return tuple(jax.lax.dynamic_slice_in_dim(x, m * n, n, axis=0)
                 for x in (batch.sft_tokens, batch.sft_mask, valid))


def _denominators(counts, config: PPOConfig):
    """[M] per-minibatch token counts (this device) -> [M] loss denominators: the global count
    over the minibatch's accumulation group of `grad_accum` consecutive minibatches, divided
    by grad_accum (optax.MultiSteps averages the group's gradients)."""
    k = config.grad_accum
    group = _psum(counts, config.data_axis).reshape(-1, k).sum(axis=1)  # [M / k]
    return jnp.repeat(jnp.maximum(group, 1.0) / k, k)  # [M]


def _minibatch_update(state: TrainState, batch: PPOBatch, idx, m, den, sft_den,
                      config: PPOConfig):
    """One optimizer step (policy, and value unless shared) on the rows `idx`; `den` and
    `sft_den` are the loss denominators (see `_denominators`)."""
    axis = config.data_axis
    take = lambda x: None if x is None else jnp.take(x, idx, axis=0)
    mb = PPOBatch(**{f.name: take(getattr(batch, f.name)) for f in _PER_ROW_FIELDS})
    sft = None if batch.sft_tokens is None else _sft_rows(batch, m, config)
    mask = mb.action_mask
    adv = _global_whiten(mb.advantages, mask, axis) if config.whiten_advantages else mb.advantages

    grad_fn = jax.grad(_policy_objective, has_aux=True)
    p_grads, metrics = grad_fn(state.policy, state, mb, sft, adv, den, sft_den, config)
    metrics["ppo/policy_grad_norm"] = optax.tree.norm(p_grads)
    finite = jnp.isfinite(metrics["ppo/policy_grad_norm"])
    v_grads = None
    if not config.shared_value:
        v_grads, m_vf = jax.grad(_value_objective, has_aux=True)(state.value, state, mb, den,
                                                                 config)
        metrics.update(m_vf)
        metrics["ppo/value_grad_norm"] = optax.tree.norm(v_grads)
        finite &= jnp.isfinite(metrics["ppo/value_grad_norm"])

    # NaN/Inf guard: a minibatch whose gradient norms are not finite leaves the params and
    # optimizer states as they were (the norms are of the summed gradients, so every device
    # of a data-parallel step takes the same decision); it is counted in ppo/skipped. A cond
    # rather than a select: the optimizer runs only when it is needed, with no extra pass.
    def update(trained):
        policy, policy_opt, value, value_opt = trained
        policy, policy_opt = _apply(state.policy_tx, p_grads, policy_opt, policy)
        if v_grads is not None:
            value, value_opt = _apply(state.value_tx, v_grads, value_opt, value)
        return policy, policy_opt, value, value_opt

    trained = (state.policy, state.policy_opt, state.value, state.value_opt)
    policy, policy_opt, value, value_opt = jax.lax.cond(finite, update, lambda t: t, trained)
    state = state.replace(
        policy=policy, value=value, policy_opt=policy_opt, value_opt=value_opt,
        step=state.step + finite.astype(jnp.int32),
    )
    metrics["ppo/skipped"] = 1.0 - finite.astype(jnp.float32)
    if axis is not None:
        metrics = _global_metrics(metrics, mb, sft, axis)
    return state, metrics


def _global_metrics(metrics: dict, mb: PPOBatch, sft, axis) -> dict:
    """Per-device metrics -> global ones. Losses already carry the global denominator (sum
    them); gradient norms are of the already-summed gradients (equal everywhere); per-token
    means are re-weighted by each device's token count (the PPO-ptx NLL by its SFT token
    count), so they equal the global means; the two variances are recomputed globally."""
    mask = mb.action_mask
    weighted = lambda value, w: jax.lax.psum(value * w, axis) / jnp.maximum(
        jax.lax.psum(w, axis), 1.0)
    local = masked_count(mask)
    out = {}
    for name, value in metrics.items():
        if name.endswith("loss"):
            out[name] = jax.lax.psum(value, axis)
        elif name.endswith("grad_norm") or name == "ppo/skipped":
            out[name] = jax.lax.pmean(value, axis)
        elif name == "ppo/ptx_nll":
            out[name] = weighted(value, masked_count(sft[1]))
        else:
            out[name] = weighted(value, local)
    if "ppo/ratio_var" in metrics:  # E[r^2] - E[r]^2, from each device's mean and variance
        second = metrics["ppo/ratio_var"] + jnp.square(metrics["ppo/ratio_mean"])
        out["ppo/ratio_var"] = weighted(second, local) - jnp.square(out["ppo/ratio_mean"])
    if "ppo/explained_variance" in metrics:
        _, var_returns = _global_moments(mb.returns, mask, axis)
        _, var_error = _global_moments(mb.returns - mb.old_values, mask, axis)
        out["ppo/explained_variance"] = 1.0 - var_error / jnp.maximum(var_returns, 1e-8)
    return out


_PER_ROW_FIELDS = [
    f for f in PPOBatch.__dataclass_fields__.values() if not f.name.startswith("sft_")
]


def ppo_step(state: TrainState, batch: PPOBatch, key: jax.Array, config: PPOConfig):
    """E epochs x M shuffled minibatches of clipped PPO updates (see the module docstring).

    Pure: jit it (config static), vmap it over seeds, or call it inside `jax.shard_map` with
    `config.data_axis` naming the mesh axis the batch is split over. Returns the new state and
    scalar metrics averaged over the minibatches whose update was applied.
    """
    rows, mbs = batch.tokens.shape[0], jnp.arange(config.minibatches)
    sft_den = None
    if batch.sft_tokens is not None:  # the same SFT rows every epoch
        counts = jax.vmap(lambda m: masked_count(_sft_rows(batch, m, config)[1]))(mbs)
        sft_den = _denominators(counts, config)  # [M]

    def epoch(state, key_e):
        idx = _minibatch_indices(key_e, rows, config)  # [M, rows / M]
        den = _denominators(masked_count(batch.action_mask[idx], axis=(1, 2)), config)

        def minibatch(state, xs):
            i, m, d, sd = xs
            return _minibatch_update(state, batch, i, m, d, sd, config)

        return jax.lax.scan(minibatch, state, (idx, mbs, den, sft_den))

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, config.epochs))
    return state, _applied_mean(metrics)


def _applied_mean(metrics: dict) -> dict:
    """[E, M] per-minibatch metrics -> their means over the minibatches whose update was
    applied (NaN if none was); ppo/skipped stays the fraction skipped."""
    applied = 1.0 - metrics["ppo/skipped"]
    n = jnp.sum(applied)
    mean = lambda x: jnp.where(n > 0, jnp.sum(jnp.where(applied > 0, x, 0.0)) / n, jnp.nan)
    return {k: jnp.mean(v) if k == "ppo/skipped" else mean(v) for k, v in metrics.items()}

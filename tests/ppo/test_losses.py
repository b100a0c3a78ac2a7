"""PPO losses against a numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ppo import entropy_bonus, policy_loss, ptx_loss, value_loss


def _np_policy(logp, old, adv, mask, lo, hi, dual):
    ratio = np.exp(logp - old)
    a = -adv * ratio
    b = -adv * np.clip(ratio, 1 - lo, 1 + hi)
    per = np.maximum(a, b)
    if dual is not None:
        per = np.where(adv < 0, np.minimum(per, -adv * dual), per)
    return (per * mask).sum() / mask.sum(), ((b > a) * mask).sum() / mask.sum()


@pytest.mark.parametrize("lo, hi, dual", [(0.2, 0.2, None), (0.1, 0.3, None), (0.2, 0.28, 3.0)])
def test_policy_loss_matches_numpy(lo, hi, dual):
    rng = np.random.default_rng(0)
    logp = rng.normal(-1, 0.5, (8, 12))
    old = logp + rng.normal(0, 0.4, (8, 12))
    adv = rng.normal(0, 1, (8, 12))
    mask = rng.random((8, 12)) < 0.7
    loss, metrics = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                jnp.asarray(mask), clip_low=lo, clip_high=hi, dual_clip=dual)
    ref_loss, ref_clip = _np_policy(logp, old, adv, mask, lo, hi, dual)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(metrics["ppo/clipfrac"]) == pytest.approx(ref_clip, rel=1e-5)


def test_approx_kl_is_an_unbiased_estimate_of_kl_old_to_new():
    """Tokens are sampled from the old policy: mean((rho - 1) - log rho) -> KL(old || new)."""
    rng = np.random.default_rng(0)
    old_p, new_p = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    actions = rng.choice(3, size=(400, 500), p=old_p)
    logp, old = np.log(new_p)[actions], np.log(old_p)[actions]
    _, metrics = policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.zeros(actions.shape),
                             jnp.ones(actions.shape, bool))
    true_kl = float(np.sum(old_p * np.log(old_p / new_p)))  # 0.275
    assert float(metrics["ppo/approx_kl"]) == pytest.approx(true_kl, rel=0.01)


def test_dual_clip_bounds_negative_advantage_losses():
    # ratio = e^3 ~ 20, A = -1: plain clipping gives 20; dual clip 3 caps it at 3.
    args = (jnp.array([[0.0]]), jnp.array([[-3.0]]), jnp.array([[-1.0]]), jnp.ones((1, 1), bool))
    assert float(policy_loss(*args)[0]) == pytest.approx(np.exp(3.0), rel=1e-5)
    assert float(policy_loss(*args, dual_clip=3.0)[0]) == pytest.approx(3.0)


def test_policy_gradient_is_zero_where_clipped():
    import jax

    adv = jnp.array([[1.0, 1.0]])
    old = jnp.array([[0.0, 0.0]])
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, jnp.ones((1, 2), bool))[0])(
        jnp.array([[0.5, 0.0]])  # ratio e^0.5 > 1.2: clipped, no gradient
    )
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) < 0.0


def test_value_loss_matches_numpy():
    rng = np.random.default_rng(1)
    v, old, ret = (rng.normal(size=(4, 6)) for _ in range(3))
    mask = rng.random((4, 6)) < 0.8
    loss, m = value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(ret), jnp.asarray(mask),
                         clip=0.2)
    v_clip = old + np.clip(v - old, -0.2, 0.2)
    per = np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    assert float(loss) == pytest.approx(0.5 * (per * mask).sum() / mask.sum(), rel=1e-5)
    unclipped, _ = value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(ret),
                              jnp.asarray(mask), clip=None)
    assert float(unclipped) == pytest.approx(0.5 * (((v - ret) ** 2) * mask).sum() / mask.sum(),
                                             rel=1e-5)
    ev = 1 - np.var((ret - old)[mask], ddof=1) / np.var(ret[mask], ddof=1)
    assert float(m["ppo/explained_variance"]) == pytest.approx(ev, rel=1e-4)
    frac = ((np.abs(v - old) > 0.2) & ((v_clip - ret) ** 2 > (v - ret) ** 2))[mask].mean()
    assert float(m["ppo/value_clipfrac"]) == pytest.approx(frac, rel=1e-5)


def test_value_clipfrac_ignores_rounding_inside_the_range():
    """Inside the clip range old + (V - old) equals V only up to rounding: not a clip."""
    rng = np.random.default_rng(5)
    # |V - old| < 0.18 everywhere, but V and old of different magnitudes and signs: V - old
    # rounds, and old + (V - old) differs from V in the last bit for about a third of them
    old, v = (jnp.asarray(rng.uniform(-0.09, 0.09, (64, 64)), jnp.float32) for _ in range(2))
    assert float(jnp.mean(old + (v - old) != v)) > 0.1
    ret = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
    _, m = value_loss(v, old, ret, jnp.ones((64, 64), bool), clip=0.2)
    assert float(m["ppo/value_clipfrac"]) == 0.0


def test_explicit_denominator_gives_exact_global_means():
    """Two shards with different token counts: local sums over the global count add up."""
    rng = np.random.default_rng(2)
    logp, old, adv = (jnp.asarray(rng.normal(size=(2, 5))) for _ in range(3))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    whole, _ = policy_loss(logp, old, adv, mask)
    den = mask.sum().astype(jnp.float32)
    parts = [policy_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1],
                         den=den)[0] for i in range(2)]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def test_entropy_and_ptx():
    ent, _ = entropy_bonus(jnp.array([[1.0, 3.0]]), jnp.array([[True, True]]))
    assert float(ent) == 2.0
    nll, _ = ptx_loss(jnp.array([[-1.0, -2.0, -9.0]]), jnp.array([[True, True, False]]))
    assert float(nll) == pytest.approx(1.5)

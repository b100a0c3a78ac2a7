"""The sharded PPO step on 8 CPU devices equals the single-device step; FSDP splits params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import PPOConfig
from jaxrec.models import gpt2_config, init_params
from jaxrec.train import PPOBatch, create_train_state, ppo_step
from jaxrec.train.mesh import (
    bytes_per_device,
    make_mesh,
    named,
    param_specs,
    shard_state,
    sharded_ppo_step,
    state_specs,
)

CFG = gpt2_config(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=32)
# GPT-2's key bias has an exactly-zero gradient (softmax ignores a shift shared by all keys);
# Adam turns float noise in it into +-lr steps unless eps dominates that noise (~1e-9).
PPO = PPOConfig(epochs=2, minibatches=2, policy_lr=1e-3, value_lr=1e-3, max_grad_norm=1.0,
                adam_eps=1e-6)


def _batch(seed, rows=16, length=10):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length)).astype(np.int32)
    valid = np.ones((rows, length), bool)
    valid[: rows // 2, :2] = False  # left padding on half the rows
    action = np.zeros((rows, length), bool)
    action[:, 6:] = True
    action[1, 8:] = False  # an early EOS
    f = lambda *s: rng.normal(size=(rows, length)).astype(np.float32)
    old_logp = np.where(action, -np.log(CFG.vocab_size) + 0.1 * f(), 0.0).astype(np.float32)
    return PPOBatch(
        tokens=jnp.asarray(tokens), valid=jnp.asarray(valid), action_mask=jnp.asarray(action),
        old_logp=jnp.asarray(old_logp), ref_logp=jnp.asarray(old_logp),
        old_values=jnp.asarray(np.where(action, 0.1 * f(), 0)),
        advantages=jnp.asarray(np.where(action, f(), 0)),
        returns=jnp.asarray(np.where(action, f(), 0)),
    )


def _assert_same_params(want, got):
    """Equal up to the summation order, except the key bias: its gradient is zero in exact
    arithmetic, so what moves it is Adam acting on rounding noise d, at most lr * d / eps =
    1e3 d per step (d < 1e-8: 1e-5 per step, 1.2e-4 over the test's 12 steps; 2.7e-6 was
    seen). It is compared at that bound; every other param at 1e-5."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                            strict=True):
        noise_only = jax.tree_util.keystr(path).endswith("['k']['bias']")
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1.2e-4 if noise_only else 1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def _new_state():
    return create_train_state(CFG, PPO, init_params(CFG, jax.random.key(0)))


@pytest.mark.parametrize("data, fsdp, tensor", [(8, 1, 1), (2, 4, 1), (4, 1, 2)])
def test_sharded_step_equals_single_device_step(data, fsdp, tensor):
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    reference = _new_state()
    ref_step = jax.jit(ppo_step, static_argnums=3)
    ref_cfg = PPO.replace(shuffle_blocks=data)  # the same minibatches as `data` groups

    sharded = shard_state(mesh, _new_state)
    step = sharded_ppo_step(mesh, PPO, sharded, _batch(0))
    for i in range(3):  # three consecutive steps
        batch, key = _batch(i), jax.random.key(10 + i)
        reference, ref_metrics = ref_step(reference, batch, key, ref_cfg)
        sharded, metrics = step(sharded, batch, key)
        _assert_same_params(reference.policy, sharded.policy)
        _assert_same_params(reference.value, sharded.value)
        assert set(metrics) == set(ref_metrics)
        for name in ref_metrics:  # every metric is global: the same as one device's
            assert float(metrics[name]) == pytest.approx(float(ref_metrics[name]), abs=1e-5,
                                                         rel=1e-4), name
    assert int(sharded.step) == int(reference.step) == 3 * PPO.epochs * PPO.minibatches
    # The params really moved (the comparison is not between two untouched states).
    start = init_params(CFG, jax.random.key(0))
    assert not np.allclose(start["embed"], np.asarray(sharded.policy["embed"]))


def test_sharded_ptx_metrics_weigh_each_device_by_its_sft_tokens():
    """PPO-ptx rows split over devices with unequal SFT masks: the NLL is the global mean."""
    mesh = make_mesh(data=8, fsdp=1, tensor=1)
    cfg = PPO.replace(minibatches=1, epochs=1, ptx_coef=0.5)
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 9, 16)  # SFT tokens that count: 1-8 per row
    batch = _batch(0).replace(
        sft_tokens=jnp.asarray(rng.integers(0, CFG.vocab_size, (16, 9)), jnp.int32),
        sft_mask=jnp.asarray(np.arange(9)[None] >= 9 - lengths[:, None]))
    new = lambda: create_train_state(CFG, cfg, init_params(CFG, jax.random.key(0)))
    ref_state, ref = jax.jit(ppo_step, static_argnums=3)(new(), batch, jax.random.key(1),
                                                         cfg.replace(shuffle_blocks=8))
    sharded = shard_state(mesh, new)
    state, metrics = sharded_ppo_step(mesh, cfg, sharded, batch)(sharded, batch,
                                                                 jax.random.key(1))
    for name in ("ppo/ptx_nll", "ppo/policy_total_loss", "ppo/explained_variance",
                 "ppo/ratio_var"):
        assert float(metrics[name]) == pytest.approx(float(ref[name]), abs=1e-5, rel=1e-4)
    np.testing.assert_allclose(np.asarray(state.policy["embed"]),
                               np.asarray(ref_state.policy["embed"]), atol=1e-5)


def test_sharded_bfloat16_step_sums_custom_gradients_over_devices():
    """bf16 compute runs dense layers and norms through custom VJPs: inside shard_map their
    replicated params' gradients must still arrive summed over devices."""
    cfg = CFG.replace(dtype="bfloat16")
    new_state = lambda: create_train_state(cfg, PPO, init_params(cfg, jax.random.key(0)))
    mesh = make_mesh(data=8)
    batch, key = _batch(0), jax.random.key(10)
    reference, ref_metrics = jax.jit(ppo_step, static_argnums=3)(
        new_state(), batch, key, PPO.replace(shuffle_blocks=8))
    sharded = shard_state(mesh, new_state)
    sharded, metrics = sharded_ppo_step(mesh, PPO, sharded, batch)(sharded, batch, key)
    for name in ("ppo/policy_grad_norm", "ppo/value_grad_norm", "ppo/policy_loss"):
        assert float(metrics[name]) == pytest.approx(float(ref_metrics[name]), rel=1e-3)
    for a, b in zip(jax.tree.leaves(reference.policy), jax.tree.leaves(sharded.policy),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_fsdp8_puts_an_eighth_of_the_params_on_each_device():
    mesh = make_mesh(data=1, fsdp=8)
    state = shard_state(mesh, _new_state)
    per_device = bytes_per_device(state.policy)
    total = sum(x.nbytes for x in jax.tree.leaves(state.policy))
    assert len(per_device) == 8
    for nbytes in per_device.values():  # biases over heads stay whole: "about" 1/8
        assert nbytes < total / 8 * 1.25, (nbytes, total)
    spec = param_specs(CFG, state.policy)["block_0"]["mlp"]["up"]["kernel"]
    assert tuple(spec) == ("fsdp", "tensor")


def test_state_specs_cover_optimizer_state():
    state = _new_state()
    specs = state_specs(state)
    shardings = named(make_mesh(data=8), specs)  # must build for every leaf
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match="data=3 x fsdp=2 x tensor=1 needs 6 devices"):
        make_mesh(data=3, fsdp=2)
    assert make_mesh(data=-1, tensor=2).shape == {"data": 4, "fsdp": 1, "tensor": 2}

"""Orbax checkpoints of the whole run state: exact round trip, keep N, clear mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.checkpoint import Checkpointer
from jaxrec.config import PPOConfig
from jaxrec.models import init_params, llama_config
from jaxrec.sim import make_env
from jaxrec.train import create_train_state
from jaxrec.train.mesh import make_mesh, shard_state

CFG = llama_config(vocab_size=40, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=1,
                   max_len=16)
PPO = PPOConfig(epochs=1, minibatches=1, kl_coef=0.2)


def _run_state(cfg=CFG, seed=0):
    state = create_train_state(cfg, PPO, init_params(cfg, jax.random.key(seed)))
    env, params = make_env("synthetic", n_items=30, n_topics=3, history_len=4, history_min=2)
    _, users = env.reset_batch(jax.random.key(seed + 1), 4, params)
    return state, users, jax.random.key(seed + 2)


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_the_newest(tmp_path):
    state, users, key = _run_state()
    state = state.replace(step=jnp.asarray(7, jnp.int32), kl=state.kl.replace(coef=jnp.float32(.3)))
    ckpt = Checkpointer(tmp_path / "ppo", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, users, key, {"iteration": step, "config": "seed: 0\n"})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3

    fresh_state, fresh_users, fresh_key = _run_state(seed=5)  # a different starting point
    abstract = jax.eval_shape(lambda: fresh_state)
    got_state, got_users, got_key, record = ckpt.restore(None, abstract, fresh_users, fresh_key)
    _equal(got_state, state)
    _equal(got_users, users)
    assert bool(jnp.all(jax.random.key_data(got_key) == jax.random.key_data(key)))
    assert record == {"iteration": 3, "config": "seed: 0\n"}
    assert int(got_state.step) == 7 and float(got_state.kl.coef) == pytest.approx(0.3)
    assert got_state.policy_tx is fresh_state.policy_tx  # static fields come from the target
    ckpt.close()


def test_restores_into_the_mesh_shardings(tmp_path):
    state, users, key = _run_state()
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    ckpt.save(1, state, users, key, {})
    mesh = make_mesh(data=1, fsdp=8)
    sharded = shard_state(mesh, lambda: _run_state()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
                          sharded)
    got, _, _, _ = ckpt.restore(1, target, users, key)
    kernel = got.policy["block_0"]["mlp"]["up"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state.policy["block_0"]["mlp"]
                                                                  ["up"]["kernel"]))


def test_shape_mismatch_is_a_clear_error(tmp_path):
    state, users, key = _run_state()
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    ckpt.save(1, state, users, key, {})
    bigger, _, _ = _run_state(CFG.replace(d_model=32, d_ff=64))
    pattern = r"/1: \['state'\]\S+ has shape \(\d+(, \d+)*\), the config gives \(\d+(, \d+)*\)$"
    with pytest.raises(ValueError, match=pattern):
        ckpt.restore(1, bigger, users, key)


def test_non_finite_params_are_never_written(tmp_path):
    state, users, key = _run_state()
    bad = state.replace(policy={**state.policy, "embed": state.policy["embed"].at[0, 0].set(
        jnp.nan)})
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    with pytest.raises(FloatingPointError, match="embed.*not finite"):
        ckpt.save(1, bad, users, key, {})
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(None, state, users, key)


def _saved(tmp_path):
    state, users, key = _run_state()
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    ckpt.save(1, state, users, key, {"iteration": 1})
    ckpt.close()
    return state, users, key


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    state, users, key = _saved(tmp_path)
    data = tmp_path / "ppo" / "1" / "arrays" / "ocdbt.process_0" / "d"
    largest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    with pytest.raises(ValueError, match=rf"^checkpoint {tmp_path}/ppo/1 is unreadable \(corrupt "
                                         r"or truncated\): ") as e:
        ckpt.restore(None, state, users, key)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_checkpoint_without_metadata_is_incomplete(tmp_path):
    state, users, key = _saved(tmp_path)
    (tmp_path / "ppo" / "1" / "arrays" / "_METADATA").unlink()
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    with pytest.raises(ValueError, match=rf"^checkpoint {tmp_path}/ppo/1 is incomplete: "
                                         r"arrays/_METADATA is missing") as e:
        ckpt.restore(None, state, users, key)
    assert "\n" not in str(e.value) and "differs" not in str(e.value)


def test_model_mismatch_keeps_its_message(tmp_path):
    state, users, key = _saved(tmp_path)
    ckpt = Checkpointer(tmp_path / "ppo", keep=1, asynchronous=False)
    fewer = state.replace(policy={k: v for k, v in state.policy.items() if k != "final_norm"})
    with pytest.raises(ValueError, match=r"/1 has array \['state'\]\['policy'\]\['final_norm'\]"
                                         r"\S* that the config has no place for: the config's "
                                         "model or optimizer differs"):
        ckpt.restore(1, fewer, users, key)
    more = state.replace(policy={**state.policy, "extra": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"/1 has no array \['state'\]\['policy'\]\['extra'\]: "
                                         "the config's model or optimizer differs"):
        ckpt.restore(1, more, users, key)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint .*/ppo/7 \(steps there: \[1\]\)"):
        ckpt.restore(7, state, users, key)

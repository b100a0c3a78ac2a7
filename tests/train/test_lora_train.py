"""PPO with LoRA: the base is the reference, only adapters train, optimizer state is the
adapters', and the export merges them into a folder transformers loads with our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.cli import main
from jaxrec.config import LoRAConfig, PPOConfig, load_config
from jaxrec.generation import sequence_scores
from jaxrec.models import gpt2_config, init_params, logits, lora
from jaxrec.train import create_train_state, ppo_step
from jaxrec.train.mesh import make_mesh, shard_state, sharded_ppo_step

CFG = gpt2_config(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=32)
PPO = PPOConfig(epochs=2, minibatches=2, policy_lr=1e-2, value_lr=1e-2)
ADAPTERS = LoRAConfig(rank=4, alpha=8.0)


def _batch(seed=0, rows=8, length=10):
    from tests.train.test_sharding import _batch as sharding_batch

    return sharding_batch(seed, rows, length)


def _state(frozen_dtype="float32", config=PPO):
    return create_train_state(CFG, config, init_params(CFG, jax.random.key(0)),
                              adapters=ADAPTERS, key=jax.random.key(7),
                              frozen_dtype=frozen_dtype)


def test_the_reference_is_the_base_and_a_fresh_policy_equals_it():
    base = init_params(CFG, jax.random.key(0))
    state = _state()
    assert set(state.frozen) == {"base"}  # one frozen copy: no separate reference
    b = _batch()
    ref = sequence_scores(CFG, state.ref_params, b.tokens, b.valid).logps
    plain = sequence_scores(CFG, base, b.tokens, b.valid).logps
    policy = sequence_scores(CFG, state.policy_params(), b.tokens, b.valid).logps
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(plain))


def test_only_adapters_train_and_the_optimizer_holds_only_their_moments():
    state = _state()
    n_adapter = lora.count_adapter_params(state.policy)
    n_full = sum(x.size for x in jax.tree.leaves(state.frozen["base"]))
    assert 0 < n_adapter < n_full / 4
    # AdamW's mu and nu: two adapter-sized copies, nothing of the base
    moments = optax.tree_map_params(state.policy_tx, lambda p: p.size, state.policy_opt,
                                    transform_non_params=lambda _: 0)
    assert sum(jax.tree.leaves(moments)) == 2 * n_adapter

    before = jax.tree.map(np.asarray, state)
    after, metrics = jax.jit(ppo_step, static_argnums=3)(state, _batch(), jax.random.key(1), PPO)
    assert float(metrics["ppo/skipped"]) == 0.0
    for a, b in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base never moves
    b_old = before.policy["block_0"]["attn"]["q"]["lora_b"]
    b_new = np.asarray(after.policy["block_0"]["attn"]["q"]["lora_b"])
    assert not np.allclose(b_old, b_new)  # the adapters do
    assert not np.allclose(before.value["block_1"]["mlp"]["up"]["lora_b"],
                           np.asarray(after.value["block_1"]["mlp"]["up"]["lora_b"]))
    assert not np.allclose(before.value["value_head"], np.asarray(after.value["value_head"]))


def test_bfloat16_storage_halves_the_frozen_bytes():
    f32, bf16 = _state(), _state("bfloat16")
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes(bf16.frozen) * 2 == nbytes(f32.frozen)
    assert {x.dtype for x in jax.tree.leaves(bf16.policy)} == {jnp.dtype(jnp.float32)}
    after, metrics = jax.jit(ppo_step, static_argnums=3)(bf16, _batch(), jax.random.key(1), PPO)
    assert np.isfinite(float(metrics["ppo/policy_loss"]))


# Sharded and single-device gradients differ in the last bits (another summation order), and
# Adam divides by sqrt(v) + eps: at lr 1e-2 and eps 1e-8 an adapter element with a tiny gradient
# turned that into 1.9e-5 after 4 steps on an AVX2-only EPYC. At lr 1e-3 and eps 1e-6 a rounding
# difference d in a gradient moves a param by at most lr * d / eps = 1e3 d per step: 9e-7 after
# the 4 steps on AVX2, 2e-7 with XLA held to SSE4.2 (another vector width), both well inside 1e-5.
MESH_PPO = PPO.replace(policy_lr=1e-3, value_lr=1e-3, adam_eps=1e-6)


def test_lora_step_on_a_mesh_equals_one_device():
    """data=4 x fsdp=2: the adapters (specs from their kernels) update as on one device."""
    mesh = make_mesh(data=4, fsdp=2)
    start = _state(config=MESH_PPO)
    new = lambda: _state(config=MESH_PPO)
    single = jax.jit(ppo_step, static_argnums=3)(new(), _batch(rows=16), jax.random.key(1),
                                                  MESH_PPO.replace(shuffle_blocks=4))[0]
    sharded = shard_state(mesh, new)
    step = sharded_ppo_step(mesh, MESH_PPO, sharded, _batch(rows=16))
    sharded = step(sharded, _batch(rows=16), jax.random.key(1))[0]
    moved = 0.0
    for a, b, s in zip(jax.tree.leaves(single.policy), jax.tree.leaves(sharded.policy),
                       jax.tree.leaves(start.policy), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(s)).max()))
    assert moved > 1e-3  # the adapters moved by far more than the tolerance


def test_create_train_state_refuses_lora_with_own_value_or_reference():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="pass neither value_params nor ref_params"):
        create_train_state(CFG, PPO, params, ref_params=params, adapters=ADAPTERS,
                           key=jax.random.key(0))


TINY = ["rollout.users=8", "ppo.minibatches=2", "ppo.epochs=1", "sim.n_items=30",
        "sim.n_topics=3", "rollout.history_items=2", "model.d_model=32", "model.n_layers=1",
        "ppo.iterations=2", "monitor.eval_every=0", "lora.rank=4", "ppo.policy_lr=0.01",
        "model.frozen_dtype=bfloat16"]


def test_lora_run_exports_merged_weights_transformers_loads(tmp_path):
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    from jaxrec.train.export import _latest_policy
    from jaxrec.train.setup import build_setup

    workdir, out = tmp_path / "run", tmp_path / "exported"
    argv = ["ppo", "--workdir", str(workdir)]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0

    config = load_config(workdir / "config.yaml")
    setup = build_setup(config)
    merged = _latest_policy(workdir, config, setup, "ppo")[1]
    assert not any("lora_a" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(merged))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = [int(t) for t in np.asarray(setup.codec.item_tokens[3])[:4]]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    mine = np.asarray(logits(setup.model.replace(dtype="float32"), merged, jnp.asarray([ids])))
    np.testing.assert_allclose(theirs, mine[0], atol=2e-4, rtol=1e-4)
    base = np.asarray(logits(setup.model.replace(dtype="float32"),
                             jax.tree.map(lambda x: x.astype(jnp.bfloat16), setup.params),
                             jnp.asarray([ids])))
    assert np.abs(mine - base).max() > 1e-3  # the trained adapters are in the export

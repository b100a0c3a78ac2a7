"""Placement without a mesh: everything committed to the one device, so jitted steps compile
once even when a restored checkpoint (committed) meets freshly made arrays."""

import jax
import jax.numpy as jnp

from jaxrec.config import Config
from jaxrec.models import llama_config
from jaxrec.train.placement import Placement


def test_without_a_mesh_a_step_fed_its_own_outputs_compiles_once():
    model = llama_config(vocab_size=32, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32,
                         n_layers=1, max_len=8)
    placed = Placement(Config(), model, batch_size=4, batch_key="sft.batch_size")
    assert placed.mesh is None
    restored = jax.device_put({"w": jnp.ones((3,))}, jax.local_devices()[0])  # committed
    state = placed.train_state(lambda p: {"params": p, "step": jnp.zeros((), jnp.int32)},
                               restored, tx=None)
    key = placed.whole(lambda: jax.random.key(0))
    data = placed.host_whole({"x": jnp.arange(4.0)})

    @jax.jit
    def step(state, key, data):
        return {"params": {"w": state["params"]["w"] + data["x"].sum()},
                "step": state["step"] + 1}, jax.random.split(key)[0]

    for _ in range(3):
        state, key = step(state, key, data)
    assert step._cache_size() == 1 and int(state["step"]) == 3

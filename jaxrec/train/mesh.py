"""Device meshes, logical-axis rules and the sharded PPO step. Only train/ knows meshes.

Mesh axes: 'data' (data parallel: the batch is split, params replicated), 'fsdp' (params and
optimizer state split along the embedding dimension, the batch split too), 'tensor' (heads,
MLP columns and the vocabulary split). The models only name logical axes; `LOGICAL_RULES`
maps them here, at the jit boundary.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.config import PPOConfig
from jaxrec.models import logical_axes
from jaxrec.train.state import TrainState
from jaxrec.train.step import PPOBatch, ppo_step

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated)
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))}: at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{math.prod(sizes)} devices, {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def _logical_to_mesh(spec: P) -> P:
    return nn.logical_to_mesh_axes(spec, LOGICAL_RULES)


def param_specs(model_cfg, params) -> Any:
    """PartitionSpecs (mesh axes) for a param tree of this model (policy, value or ref)."""
    names = logical_axes(model_cfg, head="both")  # covers the lm and value heads
    flat_names = {jax.tree_util.keystr(path): spec for path, spec in
                  jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda x: isinstance(x, P))}

    def spec_for(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in ("lora_a", "lora_b"):  # a LoRA factor follows its kernel's in / out axes
            return _logical_to_mesh(_adapter_axes(flat_names, path, name, leaf.ndim))
        logical = flat_names.get(jax.tree_util.keystr(path))
        if logical is None:
            raise ValueError(f"param {jax.tree_util.keystr(path)} has no logical axes")
        return _logical_to_mesh(logical)

    return jax.tree_util.tree_map_with_path(spec_for, params)


def _adapter_axes(flat_names: dict, path, name: str, ndim: int) -> P:
    """Logical axes of A [*In, r] (the kernel's input axes, rank whole) or B [r, *Out]."""
    kernel = flat_names.get(jax.tree_util.keystr((*path[:-1], jax.tree_util.DictKey("kernel"))))
    if kernel is None:
        raise ValueError(f"adapter {jax.tree_util.keystr(path)} sits on no known kernel")
    axes = tuple(kernel)
    if name == "lora_a":
        return P(*axes[: ndim - 1], None)
    return P(None, *axes[len(axes) - (ndim - 1):])


def opt_specs(tx, opt_state, specs):
    """Optimizer-state specs: param-shaped leaves follow their param, the rest replicate."""
    return optax.tree_map_params(
        tx, lambda _, spec: spec, opt_state, specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P),
    )


def _frozen_specs(model_cfg, tree):
    """Specs of a frozen entry: reference params, the reward model (its own params; its
    normalisation scalars whole), or PPO-ptx's rows."""
    from jaxrec.train.reward_model import RewardModel
    from jaxrec.train.sft import PtxRows

    if isinstance(tree, RewardModel):
        return tree.replace(params=param_specs(tree.model, tree.params), mean=P(), std=P())
    if isinstance(tree, PtxRows):  # PPO-ptx's pool of SFT rows, whole on every device
        return jax.tree.map(lambda _: P(), tree)
    return param_specs(model_cfg, tree)


def state_specs(state: TrainState) -> TrainState:
    """A TrainState of PartitionSpecs matching `state` (concrete or abstract)."""
    pol = param_specs(state.model, state.policy)
    val = param_specs(state.model, state.value) if state.value else {}
    return state.replace(
        step=P(),
        policy=pol,
        value=val,
        frozen={name: _frozen_specs(state.model, tree) for name, tree in state.frozen.items()},
        policy_opt=opt_specs(state.policy_tx, state.policy_opt, pol),
        value_opt=opt_specs(state.value_tx, state.value_opt, val),
        kl=jax.tree.map(lambda _: P(), state.kl),
    )


def batch_specs(batch: PPOBatch) -> PPOBatch:
    """Rows split over ('data', 'fsdp'); everything else whole."""
    rows = _logical_to_mesh(P("batch"))
    return jax.tree.map(lambda _: rows, batch)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def shard_state(mesh: Mesh, make_state, *args) -> TrainState:
    """Initialise a TrainState directly into its shardings: eval_shape -> specs -> a jitted
    init with out_shardings (no full copy ever sits on one device)."""
    abstract = jax.eval_shape(make_state, *args)
    shardings = named(mesh, state_specs(abstract))
    return jax.jit(make_state, out_shardings=shardings)(*args)


def sharded_ppo_step(mesh: Mesh, config: PPOConfig, state: TrainState, batch: PPOBatch):
    """`ppo_step` as a jitted data-parallel step: shard_map is manual over 'data' (each device
    group updates on its rows; gradients are summed over 'data' by shard_map itself), while
    'fsdp' and 'tensor' stay automatic, so params and optimizer state may be split over them.

    Returns a function (state, batch, key) -> (state, metrics) with donated state.
    """
    config = config.replace(data_axis="data", shuffle_blocks=1)
    s_specs = state_specs(state)
    b_specs = batch_specs(batch)
    replicated = jax.tree.map(lambda _: P(), s_specs, is_leaf=lambda x: isinstance(x, P))
    data_rows = jax.tree.map(lambda _: P("data"), b_specs, is_leaf=lambda x: isinstance(x, P))

    step = jax.shard_map(
        lambda st, b, k: ppo_step(st, b, k, config),
        mesh=mesh,
        in_specs=(replicated, data_rows, P()),
        out_specs=(replicated, P()),
        axis_names={"data"},
    )
    return jax.jit(
        step,
        in_shardings=(named(mesh, s_specs), named(mesh, b_specs), NamedSharding(mesh, P())),
        out_shardings=(named(mesh, s_specs), NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def bytes_per_device(tree) -> dict:
    """{device: bytes of `tree` resident on it}: to check how params are split."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


__all__ = [
    "LOGICAL_RULES",
    "MESH_AXES",
    "batch_specs",
    "bytes_per_device",
    "make_mesh",
    "named",
    "opt_specs",
    "param_specs",
    "shard_state",
    "sharded_ppo_step",
    "state_specs",
]


def row_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings splitting every leaf's leading (row) axis like a batch."""
    return named(mesh, jax.tree.map(lambda _: _logical_to_mesh(P("batch")), tree))

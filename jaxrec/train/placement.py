"""Where a supervised stage's arrays live (the SFT and reward stages; PPO has its own in loop).

On one device: nowhere special. With `mesh.shard`: the configured mesh over all devices (of
all processes), params and optimizer state split by the logical-axis rules, data whole on
every device, and each step's batch rows split over data x fsdp (`rows`, for a
`with_sharding_constraint` inside the step). Everything is created inside jitted functions or
from host copies, so it works the same with one process or several.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.config import Config, ModelConfig


class Placement:
    def __init__(self, config: Config, model: ModelConfig, batch_size: int, batch_key: str):
        """`batch_size` (named `batch_key` in errors) must split evenly over data x fsdp."""
        self.model, self.mesh, self.rows = model, None, None
        if not config.mesh.shard:
            return
        from jaxrec.train.mesh import make_mesh

        m = config.mesh
        self.mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
        split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size % split:
            raise ValueError(f"{batch_key}={batch_size} must divide over the mesh's data x "
                             f"fsdp = {split} devices")
        self.rows = NamedSharding(self.mesh, P(("data", "fsdp")))
        self._whole = NamedSharding(self.mesh, P())

    def whole(self, make):
        """make() (a key, a placeholder; no arguments), whole on every device of the mesh."""
        return make() if self.mesh is None else jax.jit(make, out_shardings=self._whole)()

    def host_whole(self, tree: Any) -> Any:
        """A pytree of arrays every process holds alike, whole on every device of the mesh
        (through host copies: an array committed to one device cannot feed the mesh)."""
        if self.mesh is None:
            return tree
        # make_array_from_callback, not device_put: jax 0.10's cross-process equality check
        # in device_put fails on arrays of one element
        whole = lambda x: jax.make_array_from_callback(x.shape, self._whole, lambda i: x[i])
        return jax.tree.map(lambda x: whole(np.asarray(x)), tree)

    def train_state(self, init, params: Any, tx) -> Any:
        """init(params) -> a state with fields `step`, `params` and `opt_state` (of the optax
        transformation `tx`), written straight into its shards on a mesh."""
        if self.mesh is None:
            return init(params)
        from jaxrec.train.mesh import named, opt_specs, param_specs

        host = jax.tree.map(np.asarray, params)
        abstract = jax.eval_shape(init, host)
        specs = param_specs(self.model, abstract.params)
        shardings = abstract.replace(
            step=self._whole, params=named(self.mesh, specs),
            opt_state=named(self.mesh, opt_specs(tx, abstract.opt_state, specs)))
        return jax.jit(init, out_shardings=shardings)(host)

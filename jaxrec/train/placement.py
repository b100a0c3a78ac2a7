"""Where a stage's arrays live (SFT, reward and PPO).

On one device: everything committed to it (a jitted step fed a mix of committed arrays, such
as a restored checkpoint's, and uncommitted ones compiles again when its own committed outputs
come back). With `mesh.shard`: the configured mesh over all devices (of
all processes), params and optimizer state split by the logical-axis rules, data whole on
every device, and each step's batch rows split over data x fsdp (`rows`, for a
`with_sharding_constraint` inside the step, or the PPO iteration's in_shardings). Everything
is created inside jitted functions or from host copies, so it works the same with one process
or several.
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
        self.model, self.mesh, self.rows, self.replicated = model, None, None, None
        self._device = jax.local_devices()[0]
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
        self.replicated = NamedSharding(self.mesh, P())  # whole on every device

    def jit_whole(self, fn, **jit_options):
        """jax.jit(fn) with every output whole on every device of the mesh (so each process
        can read it, and it can feed programs over the mesh)."""
        if self.mesh is not None:
            jit_options["out_shardings"] = self.replicated
        return jax.jit(fn, **jit_options)

    def commit(self, tree: Any) -> Any:
        """Without a mesh: `tree` committed to the one device. With one: `tree` as it is."""
        return jax.device_put(tree, self._device) if self.mesh is None else tree

    def whole(self, make):
        """make() (a key, a placeholder; no arguments), whole on every device of the mesh."""
        return self.commit(make()) if self.mesh is None else self.jit_whole(make)()

    def from_host(self, init, out_shardings, *trees):
        """init(*trees) run as one program that writes each output straight into its shards.
        The inputs go in as host copies: an array committed to one device (a restored
        checkpoint) cannot feed a program over the mesh, and every process holds the same
        values. None stays None."""
        host = lambda tree: None if tree is None else jax.tree.map(np.asarray, tree)
        return jax.jit(init, out_shardings=out_shardings)(*map(host, trees))

    def host_whole(self, tree: Any) -> Any:
        """A pytree of arrays every process holds alike, whole on every device of the mesh
        (through host copies: an array committed to one device cannot feed the mesh)."""
        if self.mesh is None:
            return self.commit(tree)
        # make_array_from_callback, not device_put: jax 0.10's cross-process equality check
        # in device_put fails on arrays of one element
        whole = lambda x: jax.make_array_from_callback(x.shape, self.replicated, lambda i: x[i])
        return jax.tree.map(lambda x: whole(np.asarray(x)), tree)

    def train_state(self, init, params: Any, tx) -> Any:
        """init(params) -> a state with fields `step`, `params` and `opt_state` (of the optax
        transformation `tx`), written straight into its shards on a mesh."""
        if self.mesh is None:
            return self.commit(init(params))
        from jaxrec.train.mesh import named, opt_specs, param_specs

        abstract = jax.eval_shape(init, params)
        specs = param_specs(self.model, abstract.params)
        shardings = abstract.replace(
            step=self.replicated, params=named(self.mesh, specs),
            opt_state=named(self.mesh, opt_specs(tx, abstract.opt_state, specs)))
        return self.from_host(init, shardings, params)

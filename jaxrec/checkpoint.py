"""Orbax checkpoints of a whole run: the only module that imports orbax.

One checkpoint holds the TrainState (policy and value params and optimizer states, reference
params, KL controller, step), the simulated users' states, the RNG key, and a JSON record
(the resolved config, the iteration, the data cursor, anything else the host loop keeps).
Saves are asynchronous; restoring into an abstract target (from `jax.eval_shape`, carrying
shardings) places every array where the mesh wants it. A target whose shapes differ from the
checkpoint's is a one-line error naming the array and both shapes.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


def _as_tree(state: Any, sim_state: Any, key: jax.Array) -> dict:
    """Plain nested dicts of arrays (what Orbax stores); keys as raw key data."""
    return {
        "state": serialization.to_state_dict(state),
        "sim": serialization.to_state_dict(sim_state),
        "key": jax.random.key_data(key),
    }


def _abstract(tree: Any) -> Any:
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """`DIR/<step>` checkpoints of one stage, keeping the newest `keep`."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, asynchronous: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        # Handlers named up front, so a new process can read metadata before any restore.
        handlers = {
            "arrays": ocp.StandardCheckpointHandler(),
            "record": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, sim_state: Any, key: jax.Array, record: dict) -> None:
        """Start an (asynchronous) save. Refuses non-finite params: a NaN never reaches disk."""
        tree = _as_tree(state, sim_state, key)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree["state"]):
            if np.issubdtype(leaf.dtype, np.floating) and not bool(jax.numpy.isfinite(leaf).all()):
                name = jax.tree_util.keystr(path)
                raise FloatingPointError(f"refusing to checkpoint step {step}: {name} is not "
                                         "finite")
        self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(tree), record=ocp.args.JsonSave(record)
            ),
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int | None, state: Any, sim_state: Any, key: jax.Array):
        """Restore into the structure, shapes and shardings of (state, sim_state, key).

        The arguments are targets: concrete or abstract (`jax.eval_shape`) values of the same
        kind the run would start from. Returns (state, sim_state, key, record).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint {self.directory}/{step} (steps there: "
                                    f"{self.all_steps()})")
        target = _as_tree(state, sim_state, key)
        self._check_shapes(step, target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(_abstract(target)),
                    record=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax/tensorstore: a bare Exception with a page of spec
            raise self._unreadable(step, err) from None
        arrays = restored["arrays"]
        impl = jax.random.key_impl(key)
        return (
            serialization.from_state_dict(state, arrays["state"]),
            serialization.from_state_dict(sim_state, arrays["sim"]),
            jax.random.wrap_key_data(arrays["key"], impl=impl),
            dict(restored["record"]),
        )

    def _unreadable(self, step: int, err: BaseException) -> ValueError:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        cause = lines[0] if lines else type(err).__name__
        cause = cause.split(". See full TensorStore details")[0]  # then a page of JSON spec
        cause = cause if len(cause) <= 200 else cause[:200] + "..."
        return ValueError(f"checkpoint {self.directory}/{step} is unreadable (corrupt or "
                          f"truncated): {cause}")

    def _check_shapes(self, step: int, target: dict) -> None:
        where = f"checkpoint {self.directory}/{step}"
        try:
            meta = self._manager.item_metadata(step)["arrays"]
        except Exception as err:
            raise self._unreadable(step, err) from None
        if meta is None:  # orbax reads no metadata without arrays/_METADATA
            missing = "arrays/_METADATA is missing"
            if (self.directory / str(step) / "arrays" / "_METADATA").is_file():
                missing = "orbax finds no metadata for its arrays"
            raise ValueError(f"{where} is incomplete: {missing} (an interrupted save, or files "
                             "lost since)")
        saved = {jax.tree_util.keystr(p): tuple(m.shape)
                 for p, m in jax.tree_util.tree_leaves_with_path(meta)}
        wanted = set()
        for path, leaf in jax.tree_util.tree_leaves_with_path(target):
            name = jax.tree_util.keystr(path)
            wanted.add(name)
            if name not in saved:
                raise ValueError(
                    f"{where} has no array {name}: the config's "
                    "model or optimizer differs from the one that wrote it"
                )
            if saved[name] != tuple(leaf.shape):
                raise ValueError(
                    f"{where}: {name} has shape {saved[name]}, "
                    f"the config gives {tuple(leaf.shape)}"
                )
        extra = sorted(set(saved) - wanted)
        if extra:
            raise ValueError(
                f"{where} has array {extra[0]} that the config has no place for: the config's "
                "model or optimizer differs from the one that wrote it"
            )

    def close(self) -> None:
        self._manager.close()

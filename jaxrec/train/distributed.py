"""JAX's multi-process runtime for runs over several hosts (TPU slices, GPU nodes).

Every process runs the same command; `jax.distributed.initialize` joins them into one set of
global devices, so the mesh of `mesh.shard` spans all hosts and each jitted iteration is one
SPMD program: each host computes (and holds) only its devices' shards of the state and of the
simulated users. Process 0 alone writes logs, metrics, plots and summaries; Orbax checkpoints
are written by all processes together (each its own shards) and restore on any host count
whose devices form the same mesh shape.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Join the multi-process runtime; returns whether this is a multi-process run.

    Explicit: `coordinator` ('host:port' of process 0), `num_processes` and `process_id`, all
    three. `auto`: `jax.distributed.initialize()` with no arguments, which finds them itself on
    Cloud TPU slices and under SLURM. Neither: a single process, nothing to do. Call it before
    any other JAX work. On CPU the processes talk through gloo collectives.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError("multi-process: give --coordinator HOST:PORT, --num-processes N "
                             "and --process-id I together (or --distributed to detect them)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r} must be HOST:PORT")
    elif not auto:
        return False
    # CPU processes need a collectives backend (accelerators bring their own); it must be set
    # before the CPU client starts, and is ignored by the other platforms.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true on one host)."""
    return jax.process_index() == 0


def primary_log(log):
    """`log` on process 0, a no-op on the others (so N hosts print one log)."""
    return log if is_primary() else (lambda *args, **kwargs: None)


"""One process of a multi-process PPO run on CPU (used by test_multihost.py; not a test).

    python multihost_worker.py WORKDIR OUT.npz DEVICES [COORDINATOR N ID] -- --set k=v ...

Runs `jaxrec train` (joining the runtime when a coordinator is given), then restores the
final PPO checkpoint collectively and saves this process's copy of every policy param.
"""

import os
import sys

args, overrides = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
workdir, out, devices = args[0], args[1], int(args[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxrec.checkpoint import Checkpointer  # noqa: E402
from jaxrec.cli import main  # noqa: E402
from jaxrec.config import load_config  # noqa: E402
from jaxrec.train.loop import PPORun  # noqa: E402

argv = ["train", "--workdir", workdir]
for item in overrides:
    argv += ["--set", item]
if len(args) > 3:
    argv += ["--coordinator", args[3], "--num-processes", args[4], "--process-id", args[5]]
status = main(argv)
if status != 0:
    raise SystemExit(status)

run = PPORun(load_config(None, overrides))
state, users, key = run.initial()
ckpt = Checkpointer(f"{workdir}/checkpoints/ppo")
state = ckpt.restore(None, state, users, key)[0]
ckpt.close()
flat = jax.tree_util.tree_leaves_with_path(state.policy)
local = {}
for path, leaf in flat:  # data parallel: every device holds the whole (replicated) param
    shard = leaf.addressable_shards[0]
    assert shard.data.shape == leaf.shape, (jax.tree_util.keystr(path), shard.data.shape)
    local[jax.tree_util.keystr(path)] = np.asarray(shard.data)
np.savez(out, process_count=jax.process_count(), **local)

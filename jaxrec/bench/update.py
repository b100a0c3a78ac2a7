"""`jaxrec bench update`: achieved FLOP/s of `ppo_step` next to a measured matmul ceiling.

The "small" spec: GPT-2 family, 4 layers, 4 heads, d_model 256, vocab 4096; 64 sequences of
64 prompt + 32 completion tokens; 4 epochs x 4 minibatches; a policy and a separate value
network. FLOPs per update = 6 x params x tokens for each network, with every one of the 96
tokens of every sequence counted once per epoch. The ceiling is the fastest matrix product the
device offers, measured in the same process: the best of 20 runs of a 2048^3 product in float32
and in bfloat16 x bfloat16 -> float32, whichever is faster (bfloat16 on CPUs with AMX or
AVX512_BF16 and on accelerators; float32 on CPUs without bf16 matrix units, where bfloat16
operands are widened first). One JSON line per dtype, naming the device and the CPU.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.bench.timing import best_seconds, median_seconds
from jaxrec.config import PPOConfig
from jaxrec.hardware import describe
from jaxrec.models import count_params, gpt2_config, init_params
from jaxrec.train import PPOBatch, create_train_state, ppo_step

SMALL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=128)


def matmul_flops(dtype: str, n: int | None = None, repeats: int = 20) -> float:
    """FLOP/s of an n^3 `dtype` x `dtype` -> float32 matrix product, the fastest of `repeats`
    runs; n = 2048 on CPU, 8192 on accelerators (large enough to outlast launch overhead)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    seconds = best_seconds(lambda: mm(a, b).block_until_ready(), repeats)
    return 2 * n**3 / seconds


def matmul_ceiling(n: int | None = None, repeats: int = 20) -> dict:
    """The fastest matrix product on this device: {"ceiling_flops_per_sec", "ceiling_dtype",
    and each dtype's FLOP/s} over float32 and bfloat16 inputs (both accumulate in float32)."""
    rates = {dtype: matmul_flops(dtype, n, repeats) for dtype in ("float32", "bfloat16")}
    best = max(rates, key=rates.get)
    return {"ceiling_flops_per_sec": rates[best], "ceiling_dtype": best,
            **{f"matmul_{dtype}_flops_per_sec": rate for dtype, rate in rates.items()}}


def _batch(rows, prompt, completion, vocab, seed):
    rng = np.random.default_rng(seed)
    t = prompt + completion
    action = np.zeros((rows, t), bool)
    action[:, prompt:] = True
    f = lambda: rng.normal(size=(rows, t)).astype(np.float32)
    old_logp = np.where(action, -np.log(vocab), 0.0).astype(np.float32)
    return PPOBatch(
        tokens=jnp.asarray(rng.integers(3, vocab, (rows, t)), jnp.int32),
        valid=jnp.ones((rows, t), bool), action_mask=jnp.asarray(action),
        old_logp=jnp.asarray(old_logp), ref_logp=jnp.asarray(old_logp),
        old_values=jnp.zeros((rows, t), jnp.float32),
        advantages=jnp.asarray(np.where(action, f(), 0)),
        returns=jnp.asarray(np.where(action, f(), 0)),
    )


def run(dtypes=("float32", "bfloat16"), rows=64, prompt=64, completion=32, epochs=4,
        minibatches=4, repeats=3, seed=0, print_fn=print) -> list[dict]:
    ceiling = matmul_ceiling()
    # Actions are the completion (the last tokens of each row): vocabulary log-probs are only
    # computed there, as in a real iteration. FLOPs are still counted over all tokens.
    config = PPOConfig(epochs=epochs, minibatches=minibatches, policy_lr=1e-5, value_lr=1e-5,
                       action_window=completion)
    batch = _batch(rows, prompt, completion, SMALL["vocab_size"], seed)
    step = jax.jit(ppo_step, static_argnums=3, donate_argnums=0)
    out = []
    for dtype in dtypes:
        model = gpt2_config(**SMALL, dtype=dtype)
        state = create_train_state(model, config, init_params(model, jax.random.key(seed)))
        n_params = count_params(state.policy) + count_params(state.value)
        tokens = rows * (prompt + completion) * epochs
        flops = 6 * n_params * tokens
        holder = {"state": state}

        def once(holder=holder):
            holder["state"], metrics = step(holder["state"], batch, jax.random.key(1), config)
            jax.block_until_ready(metrics)

        start = time.perf_counter()
        once()  # compile + first run
        compile_s = time.perf_counter() - start
        seconds = median_seconds(once, repeats)
        row = {
            "bench": "update",
            "spec": "small",
            "dtype": dtype,
            "rows": rows,
            "tokens_per_row": prompt + completion,
            "epochs": epochs,
            "minibatches": minibatches,
            "action_window": completion,
            "params_policy_plus_value": n_params,
            "seconds_per_update": seconds,
            "first_call_seconds": compile_s,
            "flops_per_sec": flops / seconds,
            **ceiling,
            "fraction_of_ceiling": flops / seconds / ceiling["ceiling_flops_per_sec"],
            **describe(),
        }
        out.append(row)
        print_fn(json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v)
                             for k, v in row.items()}))
    return out

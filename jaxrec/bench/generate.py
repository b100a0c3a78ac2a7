"""`jaxrec bench generate`: new tokens per second, ours against transformers' `generate`.

The "small" spec: GPT-2 family, 4 layers, 4 heads, d_model 256, vocab 4096, batch 64,
prompt 64 tokens, 32 new tokens, sampling at temperature 1 (no early stop). Both sides run the
same weights in the same process, one after the other; each figure is the median of `repeats`
timed runs after a warm-up (which includes our compilation). One JSON line per dtype.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.bench.timing import median_seconds
from jaxrec.generation import Temperature, generate_jit
from jaxrec.hardware import describe
from jaxrec.models import gpt2_config, init_params, save_pretrained

SMALL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=256)


def _ours(cfg, params, prompt, valid, new_tokens, repeats, seed) -> dict:
    sampler = Temperature(1.0)
    key = jax.random.key(seed)

    def run(n):
        out = generate_jit(cfg, params, prompt, valid, key, sampler=sampler,
                           max_new_tokens=n, eos_id=-1)
        return jax.block_until_ready(out.tokens)

    total = median_seconds(lambda: run(new_tokens), repeats)
    prefill = median_seconds(lambda: run(1), repeats)  # prefill + the first sample
    b = prompt.shape[0]
    return {
        "new_tokens_per_sec": b * new_tokens / total,
        "seconds": total,
        "prefill_ms": 1e3 * prefill,
        "decode_step_ms": 1e3 * (total - prefill) / max(new_tokens - 1, 1),
    }


def _peer(folder, dtype, prompt, new_tokens, repeats, seed) -> dict | None:
    """transformers' `generate` (PyTorch, KV cache) on the same weights; None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the peer runs where we run
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True)
    model = model.to(device).eval()
    ids = torch.tensor(np.asarray(prompt), dtype=torch.long, device=device)
    attention = torch.ones_like(ids)
    torch.manual_seed(seed)

    def run():
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=0, use_cache=True,
            )
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = median_seconds(run, repeats)
    return {
        "peer": f"transformers {transformers.__version__} generate (torch {torch.__version__})",
        "peer_dtype": dtype,
        "peer_device": device,
        "peer_new_tokens_per_sec": ids.shape[0] * new_tokens / seconds,
        "peer_seconds": seconds,
    }


def run(
    dtypes=("float32", "bfloat16"),
    batch: int = 64,
    prompt_len: int = 64,
    new_tokens: int = 32,
    repeats: int = 5,
    peer: bool = True,
    seed: int = 0,
    print_fn=print,
) -> list[dict]:
    base = gpt2_config(**{**SMALL, "max_len": max(SMALL["max_len"], prompt_len + new_tokens)})
    params32 = init_params(base, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(3, base.vocab_size, (batch, prompt_len)), jnp.int32)
    valid = jnp.ones((batch, prompt_len), jnp.bool_)
    rows = []
    peers = {}
    with tempfile.TemporaryDirectory() as folder:
        if peer:  # the peer runs each dtype once; float32 is transformers' default
            save_pretrained(base, params32, folder)
            for dtype in dict.fromkeys(["float32", *dtypes]):
                peers[dtype] = _peer(folder, dtype, prompt, new_tokens, repeats, seed)
        for dtype in dtypes:
            # A float32 KV cache is fastest on CPU (MEASURED.md); accelerators prefer bf16.
            cache = "float32" if jax.default_backend() == "cpu" else dtype
            cfg = base.replace(dtype=dtype, param_dtype=dtype, cache_dtype=cache)
            params = jax.tree.map(lambda x, c=cfg: x.astype(c.param_dtype), params32)
            row = {
                "bench": "generate",
                "spec": "small",
                "dtype": dtype,
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                **describe(),
                "cpu_count": os.cpu_count(),
            }
            row.update(_ours(cfg, params, prompt, valid, new_tokens, repeats, seed))
            if peers.get(dtype):  # the same dtype on both sides, and against the peer's default
                row.update(peers[dtype])
                row["ratio"] = row["new_tokens_per_sec"] / row["peer_new_tokens_per_sec"]
                default = peers["float32"]["peer_new_tokens_per_sec"]
                row["peer_float32_new_tokens_per_sec"] = default
                row["ratio_vs_peer_float32"] = row["new_tokens_per_sec"] / default
            rows.append(row)
            print_fn(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v
                                 for k, v in row.items()}))
    return rows

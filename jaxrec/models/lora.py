"""Low-rank adapters (LoRA, Hu et al. 2021) over plain param pytrees.

A target layer with kernel W (its first n dims inputs: [*In, *Out]) gains A [*In, r] and
B [r, *Out]; the adapted layer computes

    y = x W + (x A) (s B),    s = alpha / r

without ever forming W + s A B. Adapters live in their own pytree with the base's nesting
({"block_0": {"attn": {"q": {"lora_a", "lora_b"}}}}), so an optimizer sees only them and the
base stays frozen (and doubles as the reference policy). `attach` grafts them onto the base
for a forward pass (no copy of the base), `merge` folds them into plain weights for export.
A starts random and B at zero, so a fresh adapter leaves the model's outputs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

ADAPTER_KEYS = ("lora_a", "lora_b")


def _fan_in_dims(path: tuple[str, ...]) -> int:
    """Input dims of a kernel: 2 for the attention output ([H, Dh, D]), else 1."""
    return 2 if path[-1] == "o" else 1


def target_kernels(params: dict, targets: Iterable[str]) -> dict[tuple[str, ...], jax.Array]:
    """{module path: kernel} of every layer named in `targets` ('q', 'up', ...), in order."""
    targets = set(targets)
    found: dict[tuple[str, ...], Any] = {}

    def walk(node, path):
        for name, child in node.items():
            if not isinstance(child, dict):
                continue
            if name in targets and "kernel" in child:
                found[(*path, name)] = child["kernel"]
            else:
                walk(child, (*path, name))

    walk(params, ())
    return found


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def init_adapters(params: dict, rank: int, targets: Iterable[str], key: jax.Array,
                  dtype=jnp.float32) -> dict:
    """Adapters for the target layers of `params`: A ~ N(0, 1/fan_in) [*In, r], B = 0 [r, *Out].

    Raises if no layer matches (a target list that adapts nothing is a config error)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    kernels = target_kernels(params, targets)
    if not kernels:
        raise ValueError(f"no layer named {sorted(set(targets))} in the params: nothing to adapt")
    flat = {}
    for i, (path, kernel) in enumerate(kernels.items()):
        n_in = _fan_in_dims(path)
        ins, outs = kernel.shape[:n_in], kernel.shape[n_in:]
        a = jax.random.normal(jax.random.fold_in(key, i), (*ins, rank), dtype)
        flat[path] = {"lora_a": a * math.prod(ins) ** -0.5,
                      "lora_b": jnp.zeros((rank, *outs), dtype)}
    return _nest(flat)


def _overlay(base: dict, adapters: dict, adapt, path: tuple[str, ...] = ()) -> dict:
    """`base` with `adapt(path, layer, adapter)` in place of each adapted layer and the adapter
    tree's other leaves (a value head) added as they are. Only the path to each change is
    copied; no base array is."""
    out = dict(base)
    for name, value in adapters.items():
        if isinstance(value, dict) and "lora_a" in value:
            out[name] = adapt((*path, name), base[name], value)
        elif isinstance(value, dict):
            out[name] = _overlay(base.get(name, {}), value, adapt, (*path, name))
        else:
            out[name] = value
    return out


def attach(base: dict, adapters: dict, scale: float) -> dict:
    """The base tree with each adapter's lora_a and (scale * lora_b) beside its kernel (what
    `Dense` reads), plus the adapter tree's other leaves."""
    return _overlay(base, adapters, lambda path, layer, ad: {
        **layer, "lora_a": ad["lora_a"], "lora_b": ad["lora_b"] * scale})


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """Plain params: every adapted kernel replaced by W + scale * A B (float32 sum, stored in
    W's dtype), plus the adapter tree's other leaves."""

    def fold(path, layer, ad):
        kernel = layer["kernel"]
        a, b = ad["lora_a"], ad["lora_b"]  # [*In, r], [r, *Out]
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        if delta.shape != kernel.shape:
            raise ValueError(f"adapter {'/'.join(path)}: A B has shape {delta.shape}, its "
                             f"kernel {kernel.shape}")
        merged = kernel.astype(jnp.float32) + scale * delta
        return {**layer, "kernel": merged.astype(kernel.dtype)}

    return _overlay(base, adapters, fold)


def count_adapter_params(adapters: dict) -> int:
    return sum(int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(adapters)
               if jax.tree_util.keystr(p).endswith(("'lora_a']", "'lora_b']")))

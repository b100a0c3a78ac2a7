"""A Flax linen decoder-only LM covering the GPT-2 and Llama families.

Shapes: B batch, T new tokens in this call, S key slots (T without a cache, the cache length
with one), D d_model, H query heads, K key/value heads, G = H // K query heads per KV head,
Dh head_dim, F d_ff, V vocab.

Every matmul casts its inputs to `cfg.dtype` and accumulates in float32; norms, softmax, RoPE
and the residual stream stay in float32. Parameters carry logical axis names (batch, length,
embed, heads, kv_heads, head_dim, mlp, vocab); the sharding rules live in train/.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.models.config import ModelConfig

HEADS = ("lm", "value", "both", "none")  # "none": hidden states only
_NEG_INF = -1e30  # finite, so a fully masked row (a pad query) gives no NaN


@struct.dataclass
class LayerCache:
    k: jax.Array  # [B, K, S, Dh] cache_dtype
    v: jax.Array  # [B, K, S, Dh] cache_dtype


@struct.dataclass
class KVCache:
    """Per-layer keys and values plus the next slot to write (shared by all rows)."""

    layers: tuple[LayerCache, ...]
    index: jax.Array  # [] int32: slots [0, index) are written

    @property
    def length(self) -> int:
        return self.layers[0].k.shape[2]


@struct.dataclass
class LMOutput:
    logits: jax.Array | None  # [B, T, V] float32 (head 'lm' or 'both'; else None)
    values: jax.Array | None  # [B, T] float32 (head 'value' or 'both')
    hidden: jax.Array  # [B, T, D] float32, after the final norm
    cache: KVCache | None  # the updated cache when one was passed in


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache with `length` slots per row."""
    shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
    zeros = lambda: jnp.zeros(shape, _dtype(cfg.cache_dtype))
    layers = tuple(LayerCache(k=zeros(), v=zeros()) for _ in range(cfg.n_layers))
    return KVCache(layers=layers, index=jnp.zeros((), jnp.int32))


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Positions that skip left padding: [B, T] bool -> [B, T] int32 (0 at the first real token)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T] bool -> [B, T, T] bool: query t sees real keys s <= t."""
    t = valid.shape[-1]
    tril = jnp.tril(jnp.ones((t, t), jnp.bool_))
    return tril[None] & valid[:, None, :]


_CONTRACT = {False: (((1,), (0,)), ((), ())), True: (((1,), (1,)), ((), ()))}


def _varying_axes(x: jax.Array) -> frozenset:
    """The shard_map mesh axes x varies over (jax 0.10 spells it `manual_axis_type.varying`,
    earlier releases `vma`); empty outside shard_map."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _varying_like(ref: jax.Array, x: jax.Array) -> jax.Array:
    """Inside `jax.shard_map`, mark x as varying over the mesh axes that `ref` varies over.

    A custom VJP must return a cotangent of the same varying-ness as its input; a replicated
    parameter's cotangent from per-device rows is per-device. The cast's transpose is a psum,
    so the parameter's gradient arrives summed over devices, as autodiff would give it.
    Outside shard_map this is the identity.
    """
    missing = tuple(sorted(_varying_axes(ref) - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_dot(x: jax.Array, w: jax.Array, w_transposed: bool) -> jax.Array:
    """x [M, K] . w [K, N] (or w [N, K] transposed) in bfloat16 with float32 accumulation.

    The custom backward casts the float32 cotangent to bfloat16 too, so both backward matmuls
    also run bf16 x bf16 -> f32: JAX's default transpose would pair an f32 cotangent with a
    bf16 operand, which XLA runs as a (several times slower) float32 matmul.
    """
    return jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                               _CONTRACT[w_transposed], preferred_element_type=jnp.float32)


def _low_precision_dot_fwd(x, w, w_transposed):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y = jax.lax.dot_general(xb, wb, _CONTRACT[w_transposed], preferred_element_type=jnp.float32)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # carry the input dtypes
    return y, (xb, wb, dtypes)


def _row_block(m: int) -> int:
    """A proper divisor of m to split the rows by (1 if there is none worth using)."""
    return next((d for d in (128, 96, 64, 48, 32, 16, 8, 4, 2) if m % d == 0 and m > d), 1)


def _rows_transposed(a: jax.Array) -> jax.Array:
    """[M, N] -> [N, M] as a materialised copy.

    Written as reshape -> transpose -> reshape so that XLA cannot fold it into the consuming
    dot as a contraction over dimension 0: XLA's CPU backend runs such a "transposed-LHS"
    bf16 dot as a float32 matmul (about 6x slower here), while the copy costs a fraction.
    """
    m, n = a.shape
    q = _row_block(m)
    return a.reshape(m // q, q, n).transpose(2, 0, 1).reshape(n, m)


def _rows_contracted(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K], b [M, N] (bf16) -> a^T b [K, N] float32: the weight gradient of a dense layer.

    The smaller operand is transposed; if that is b, the [N, K] product is transposed back the
    same way (a plain `.T` would be folded into the dot, which XLA's CPU backend then cannot
    run in bf16 at all).
    """
    f32 = jnp.float32
    if _row_block(a.shape[0]) == 1:  # no way to hide the transpose: let XLA pick (float32)
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    if a.shape[1] <= b.shape[1]:
        return jnp.dot(_rows_transposed(a), b, preferred_element_type=f32)
    return _rows_transposed(jnp.dot(_rows_transposed(b), a, preferred_element_type=f32))


def _low_precision_dot_bwd(w_transposed, res, g):
    xb, wb, (x_dt, w_dt) = res
    gb = g.astype(jnp.bfloat16)  # [M, N]
    f32 = jnp.float32
    if w_transposed:  # y = x w^T with w [N, K]
        dx = jax.lax.dot_general(gb, wb, (((1,), (0,)), ((), ())), preferred_element_type=f32)
        dw = _rows_contracted(gb, xb)  # [N, K]
    else:  # y = x w with w [K, N]
        dx = jax.lax.dot_general(gb, wb, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        dw = _rows_contracted(xb, gb)  # [K, N]
    return dx.astype(x_dt.dtype), dw.astype(w_dt.dtype)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def _dot2d(x: jax.Array, w: jax.Array, dtype, w_transposed: bool = False) -> jax.Array:
    if dtype == jnp.bfloat16:
        return _low_precision_dot(x, _varying_like(x, w), w_transposed)
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), _CONTRACT[w_transposed],
                               preferred_element_type=jnp.float32)


def _dense(x: jax.Array, w: jax.Array, n_in: int, dtype) -> jax.Array:
    """x [..., *w.shape[:n_in]] . w -> [..., *w.shape[n_in:]], float32 accumulation.

    Always one 2-D matmul: for batched einsums ('btd,df->btf') XLA's CPU backward chose
    transposed layouts that made a training step ~2.5x slower.
    """
    in_size = math.prod(w.shape[:n_in])
    lead = x.shape[: x.ndim - n_in]
    y = _dot2d(x.reshape(-1, in_size), w.reshape(in_size, -1), dtype)
    return y.reshape(*lead, *w.shape[n_in:])


def _tied_logits(hidden: jax.Array, embed: jax.Array, dtype) -> jax.Array:
    """hidden [..., D] . embed[V, D]^T -> [..., V] float32, as one 2-D matmul."""
    y = _dot2d(hidden.reshape(-1, hidden.shape[-1]), embed, dtype, w_transposed=True)
    return y.reshape(*hidden.shape[:-1], embed.shape[0])


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D] float32
        cfg = self.cfg
        pdt = _dtype(cfg.param_dtype)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (cfg.d_model,), pdt,
        )
        bias = None
        if cfg.family == "gpt2":
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (cfg.d_model,), pdt,
            )
        return normalize(x, scale, bias, cfg.norm_eps)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm (with `bias`) or RMSNorm (without) over the last axis, in float32.

    x [..., D] -> [..., D] float32. A custom backward (x_hat the normalised input, r the
    reciprocal standard deviation, g = dy * scale, means over D):
        dx = r * (g - mean(g) - x_hat * mean(g * x_hat))     (RMSNorm: without mean(g))
        dscale = sum over rows of dy * x_hat,  dbias = sum over rows of dy
    It keeps only x and the per-row statistics, and takes fewer passes over the activations
    than autodiff's version of the forward.
    """
    x = x.astype(jnp.float32)
    bias = None if bias is None else _varying_like(x, bias)
    return _normalize(x, _varying_like(x, scale), bias, eps)


def _norm_stats(x, centered: bool, eps: float):
    mean = jnp.mean(x, axis=-1, keepdims=True) if centered else None
    xc = x - mean if centered else x
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    return mean, rstd


def _norm_apply(x, mean, rstd, scale, bias):
    x_hat = (x if mean is None else x - mean) * rstd
    y = x_hat * scale.astype(jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, eps):
    mean, rstd = _norm_stats(x, bias is not None, eps)
    return _norm_apply(x, mean, rstd, scale, bias)


def _normalize_fwd(x, scale, bias, eps):
    mean, rstd = _norm_stats(x, bias is not None, eps)
    return _norm_apply(x, mean, rstd, scale, bias), (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, res, dy):
    x, mean, rstd, scale, bias = res
    x_hat = (x if mean is None else x - mean) * rstd
    g = dy * scale.astype(jnp.float32)
    inner = g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)
    if mean is not None:
        inner = inner - jnp.mean(g, axis=-1, keepdims=True)
    rows = tuple(range(dy.ndim - 1))
    d_scale = jnp.sum(dy * x_hat, axis=rows).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=rows).astype(bias.dtype)
    return rstd * inner, d_scale, d_bias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class Dense(nn.Module):
    """y = x . W (+ b); W has `shape` with logical `axes`, its first `fan_in_dims` dims
    contracted with x's last ones."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    bias_dims: int = 0  # trailing kernel dims that the bias covers (0: no bias)
    fan_in_dims: int = 1  # leading kernel dims that are inputs (for the init scale)

    @nn.compact
    def __call__(self, x):
        pdt = _dtype(self.cfg.param_dtype)
        fan_in = 1
        for n in self.shape[: self.fan_in_dims]:
            fan_in *= n
        init = nn.initializers.normal(stddev=fan_in**-0.5)
        init = nn.with_logical_partitioning(init, self.axes)
        kernel = self.param("kernel", init, self.shape, pdt)
        dt = _dtype(self.cfg.dtype)
        y = _dense(x, kernel, self.fan_in_dims, dt)
        if self.has_variable("params", "lora_a"):  # adapters attached (jaxrec.models.lora)
            a = self.get_variable("params", "lora_a")  # [*In, r]
            b = self.get_variable("params", "lora_b")  # [r, *Out], already scaled
            y = y + _dense(_dense(x, a, self.fan_in_dims, dt), b, 1, dt)
        if self.bias_dims:
            bshape, baxes = self.shape[-self.bias_dims :], self.axes[-self.bias_dims :]
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, baxes), bshape, pdt
            )
            y = y + bias.astype(jnp.float32)
        return y


def _swap_last(a: jax.Array) -> jax.Array:
    """[..., Q, S] -> [..., S, Q] as a materialised copy (see `_rows_transposed`)."""
    *lead, q, s = a.shape
    blk = _row_block(q)
    if blk == 1:
        return jnp.swapaxes(a, -1, -2)
    n = len(lead)
    blocks = a.reshape(*lead, q // blk, blk, s)
    return blocks.transpose(*range(n), n + 2, n, n + 1).reshape(*lead, s, q)


def _bdot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Softmax attention without a cache: q [B, K, Q, Dh], k and v [B, K, S, Dh], mask
    [B, 1, Q, S] bool -> [B, K, Q, Dh] float32 (Q = G*T: the G query heads of each KV head).

    Matmuls take `dtype` inputs and accumulate in float32; the softmax is float32. The custom
    backward (with P the probabilities, dO the output cotangent, s = Dh^-1/2):
        dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) * s,  dQ = dS K,  dK = dS^T Q,  dV = P^T dO
    uses rowsum(dO * O) = rowsum(P * dP) (a sum over Dh instead of S), keeps P in `dtype`, and
    materialises dS^T and P^T so that every product is a plain batched matmul: XLA's CPU
    backend otherwise contracts over the rows in float32, or not at all in bf16.
    """
    return _attend_fwd(q, k, v, mask, dtype)[0]


def _attend_fwd(q, k, v, mask, dtype):
    scale = q.shape[-1] ** -0.5
    qb, kb, vb = (x.astype(dtype) for x in (q, k, v))
    scores = _bdot("bkqd,bksd->bkqs", qb, kb) * scale  # [B, K, Q, S] float32
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG_INF), axis=-1)
    pb = probs.astype(dtype)
    out = _bdot("bkqs,bksd->bkqd", pb, vb)  # [B, K, Q, Dh] float32
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (q, k, v))
    return out, (qb, kb, vb, pb, out, mask, dtypes)


def _attend_bwd(dtype, res, d_out):
    qb, kb, vb, pb, out, mask, dtypes = res
    scale = qb.shape[-1] ** -0.5
    d_outb = d_out.astype(dtype)
    d_probs = _bdot("bkqd,bksd->bkqs", d_outb, vb)  # [B, K, Q, S]
    row = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [B, K, Q, 1] = rowsum(P * dP)
    # masked scores get no gradient (a fully masked query row has P = 1/S everywhere)
    d_scores = jnp.where(mask, pb.astype(jnp.float32) * (d_probs - row) * scale, 0.0)
    d_scoresb = d_scores.astype(dtype)
    dq = _bdot("bkqs,bksd->bkqd", d_scoresb, kb)
    dk = _bdot("bksq,bkqd->bksd", _swap_last(d_scoresb), qb)
    dv = _bdot("bksq,bkqd->bksd", _swap_last(pb), d_outb)
    return tuple(g.astype(d.dtype) for g, d in zip((dq, dk, dv), dtypes, strict=True)) + (None,)


attend.defvjp(_attend_fwd, _attend_bwd)


def rope(x: jax.Array, positions: jax.Array, theta: float, style: str) -> jax.Array:
    """Rotary embedding. x [B, T, N, Dh], positions [B, T] -> [B, T, N, Dh] float32.

    'half' rotates (x[:Dh/2], x[Dh/2:]) (Hugging Face); 'interleaved' rotates the pairs
    (x[2i], x[2i+1]) (Meta / llama2.c). Both use frequency theta^(-2i/Dh) for pair i.
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x.astype(jnp.float32)
    if style == "half":
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    pairs = x.reshape(*x.shape[:-1], dh // 2, 2)  # [B, T, N, Dh/2, 2]
    xe, xo = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1)
    return out.reshape(x.shape)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attn_mask, cache: LayerCache | None, index, prefill=False,
                 keep=0):
        """`keep` > 0 (no cache): outputs for the last `keep` positions only ([B, keep, D]);
        keys and values still cover all T."""
        cfg = self.cfg
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
        dt = _dtype(cfg.dtype)
        qkv_bias = 2 if cfg.qkv_bias else 0
        q_x, q_positions = (x, positions) if not keep else (x[:, -keep:], positions[:, -keep:])
        if keep:
            attn_mask = attn_mask[:, -keep:]  # [B, keep, T]
        q = Dense(cfg, (d, h, dh), ("embed", "heads", "head_dim"), qkv_bias,
                  name="q")(q_x)  # [B, Tq, H, Dh]
        k = Dense(cfg, (d, kv, dh), ("embed", "kv_heads", "head_dim"), qkv_bias,
                  name="k")(x)  # [B, T, K, Dh]
        v = Dense(cfg, (d, kv, dh), ("embed", "kv_heads", "head_dim"), qkv_bias,
                  name="v")(x)  # [B, T, K, Dh]
        if cfg.family == "llama":
            q = rope(q, q_positions, cfg.rope_theta, cfg.rope_style)
            k = rope(k, positions, cfg.rope_theta, cfg.rope_style)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        # Keys and values live head-major, [B, K, S, Dh]: attention is then one batched matmul
        # over (B, K) with contiguous [S, Dh] blocks (4-5x faster per decode step on CPU).
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        v = v.transpose(0, 2, 1, 3)
        b, t = q.shape[:2]
        if cache is not None:  # write the new keys at [index, index + T)
            cdt = cache.k.dtype
            start = (0, 0, 0 if prefill else index, 0)
            cache = LayerCache(
                k=jax.lax.dynamic_update_slice(cache.k, k.astype(cdt), start),  # [B, K, S, Dh]
                v=jax.lax.dynamic_update_slice(cache.v, v.astype(cdt), start),
            )
            if prefill:  # the cache was empty: the fresh keys are all there is to attend to
                attn_mask = attn_mask[:, :, :t]  # [B, T, T]
            else:  # attend to every slot, in the cache's dtype (no cast of every slot per step)
                k, v, dt = cache.k, cache.v, cdt
        if cache is None:  # training and scoring: the custom-gradient attention below
            s = k.shape[2]  # keys: all T positions; queries: t (= keep, or T)
            qh = q.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)  # [B,K,G,Tq,Dh]
            qh = qh.reshape(b, kv, (h // kv) * t, dh)  # [B, K, G*Tq, Dh]: G heads per KV head
            mask = jnp.broadcast_to(attn_mask[:, None, None], (b, 1, h // kv, t, s))
            out = attend(qh, k, v, mask.reshape(b, 1, (h // kv) * t, s), dt)  # [B,K,G*Tq,Dh]
            out = out.reshape(b, kv, h // kv, t, dh).transpose(0, 3, 1, 2, 4)
            out = out.reshape(b, t, h, dh)  # [B, Tq, H, Dh]
        else:
            if jax.default_backend() == "cpu":
                # XLA's CPU has no bf16 x bf16 -> f32 kernel for these batched matrix-vector dots.
                dt = jnp.float32
            qg = q.reshape(b, t, kv, h // kv, dh)  # [B, T, K, G, Dh]
            scores = jnp.einsum(
                "btkgd,bksd->bkgts", qg.astype(dt), k.astype(dt),
                preferred_element_type=jnp.float32,
            ) * (dh**-0.5)  # [B, K, G, T, S]
            scores = jnp.where(attn_mask[:, None, None, :, :], scores, _NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S] float32
            out = jnp.einsum(
                "bkgts,bksd->btkgd", probs.astype(dt), v.astype(dt),
                preferred_element_type=jnp.float32,
            ).reshape(b, t, h, dh)  # [B, T, H, Dh]
        out = Dense(cfg, (h, dh, d), ("heads", "head_dim", "embed"),
                    1 if cfg.out_bias else 0, fan_in_dims=2, name="o")(out)  # [B, T, D]
        return out, cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        b = 1 if cfg.mlp_bias else 0
        up = Dense(cfg, (d, f), ("embed", "mlp"), b, name="up")(x)  # [B, T, F]
        if cfg.activation == "silu":  # SwiGLU
            gate = Dense(cfg, (d, f), ("embed", "mlp"), b, name="gate")(x)
            hidden = jax.nn.silu(gate) * up
        else:  # gelu_new: the tanh approximation
            hidden = jax.nn.gelu(up, approximate=True)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return Dense(cfg, (f, d), ("mlp", "embed"), b, name="down")(hidden)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attn_mask, cache, index, prefill=False, last_only=False,
                 keep=0):
        attn_out, cache = Attention(self.cfg, name="attn")(
            Norm(self.cfg, name="attn_norm")(x), positions, attn_mask, cache, index, prefill, keep
        )
        if keep:  # only the last `keep` positions go on (their queries alone were computed)
            x = x[:, -keep:]
        x = x + attn_out
        if last_only:  # only the last position feeds the head: skip the MLP for the others
            x = x[:, -1:]
        x = x + MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, cache


class CausalLM(nn.Module):
    """Decoder-only LM with an LM head, a scalar value head, or both (a shared trunk)."""

    cfg: ModelConfig
    head: str = "lm"  # 'lm' | 'value' | 'both' | 'none'

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        attn_mask: jax.Array,  # [B, T, S] bool: query t may attend to key slot s
        cache: KVCache | None = None,
        prefill: bool = False,  # the cache is empty: attend to the T new keys only
        last_only: bool = False,  # hidden/logits/values for the last position only ([B, 1, ...])
        keep_last: int = 0,  # no cache: the last block, norm and heads for the last N positions
        #                      only ([B, N, ...]; what scoring a trailing window needs)
    ) -> LMOutput:
        cfg = self.cfg
        pdt = _dtype(cfg.param_dtype)
        embed = self.param(
            "embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), pdt,
        )
        x = jnp.take(embed, tokens, axis=0).astype(jnp.float32)  # [B, T, D]
        if cfg.family == "gpt2":
            pos_embed = self.param(
                "pos_embed",
                nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                (cfg.max_len, cfg.d_model), pdt,
            )
            x = x + jnp.take(pos_embed, positions, axis=0).astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        # `self` is argument 0 of the block's __call__; the two flags are static.
        block_cls = nn.remat(Block, static_argnums=(6, 7, 8)) if cfg.remat else Block
        t = tokens.shape[1]
        keep_last = keep_last if 0 < keep_last < t and cache is None else 0
        index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        new_layers = []
        for i in range(cfg.n_layers):
            layer_cache = cache.layers[i] if cache is not None else None
            final = i == cfg.n_layers - 1
            x, layer_cache = block_cls(cfg, name=f"block_{i}")(
                x, positions, attn_mask, layer_cache, index, prefill, last_only and final,
                keep_last if final else 0,
            )
            new_layers.append(layer_cache)
        hidden = Norm(cfg, name="final_norm")(x)  # [B, T, D]

        new_cache = None
        if cache is not None:
            new_cache = KVCache(layers=tuple(new_layers), index=index + tokens.shape[1])
        logits = values = None
        dt = _dtype(cfg.dtype)
        if self.head in ("lm", "both"):
            if cfg.tie_embeddings:
                logits = _tied_logits(hidden, embed, dt)  # [B, T, V]
            else:
                logits = Dense(cfg, (cfg.d_model, cfg.vocab_size),
                               ("embed", "vocab"), name="lm_head")(hidden)
            logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if self.head in ("value", "both"):
            kernel = self.param(
                "value_head",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (cfg.d_model,), jnp.float32,
            )
            bias = self.param(
                "value_bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                jnp.float32,
            )
            values = jnp.einsum("btd,d->bt", hidden, kernel) + bias  # [B, T] float32
        return LMOutput(logits=logits, values=values, hidden=hidden, cache=new_cache)

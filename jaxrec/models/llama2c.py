"""Read and write Karpathy's llama2.c checkpoints (`.bin`) as our Llama-family params.

Two float32 layouts are read (llama2.c `export.py`):

- v0 ("legacy"): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
  a negative vocab_size meaning an untied classifier follows; then token_embedding[V, D],
  rms_att[L, D], wq[L, D, D], wk[L, KVD, D], wv[L, KVD, D], wo[L, D, D], rms_ffn[L, D],
  w1[L, F, D], w2[L, D, F], w3[L, F, D], rms_final[D], freq_cis_real[seq, Dh/2],
  freq_cis_imag[seq, Dh/2], then wcls[V, D] when untied.
- v1: uint32 magic "ak42" (0x616b3432), int32 version 1, the same 7 int32 (vocab_size positive),
  a uint8 shared-classifier flag, zeros up to byte 256; then rms_att, rms_ffn, rms_final,
  token_embedding, wq, wk, wv, wo, w1, w2, w3 (and wcls when not shared); no RoPE tables.

Matrices are PyTorch Linear weights [out, in] (y = W @ x); ours are [in, out] kernels with the
head axes split out. llama2.c's RoPE rotates interleaved pairs (2i, 2i+1), hence
`rope_style='interleaved'`; SwiGLU is w2(silu(w1 x) * w3 x), so w1=gate, w3=up, w2=down.
Version 2 (Q8_0 int8) is not read.
"""

from __future__ import annotations

import os
import pathlib
import struct
import tempfile

import jax.numpy as jnp
import numpy as np

from jaxrec.models.config import ModelConfig, llama_config

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V0_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
_F32 = np.dtype("<f4")


def _shapes(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, version, shared):
    """[(name, shape)] of the float32 arrays in file order."""
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads
    L = n_layers
    attn_ffn = [
        ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)),
        ("wo", (L, dim, dim)),
    ]
    ffn = [("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim))]
    if version == 0:
        out = [
            ("token_embedding", (vocab, dim)),
            ("rms_att", (L, dim)),
            *attn_ffn,
            ("rms_ffn", (L, dim)),
            *ffn,
            ("rms_final", (dim,)),
            ("freq_cis_real", (seq_len, head_size // 2)),
            ("freq_cis_imag", (seq_len, head_size // 2)),
        ]
    else:
        out = [
            ("rms_att", (L, dim)),
            ("rms_ffn", (L, dim)),
            ("rms_final", (dim,)),
            ("token_embedding", (vocab, dim)),
            *attn_ffn,
            *ffn,
        ]
    if not shared:
        out.append(("wcls", (vocab, dim)))
    return out


def _read_header(path: pathlib.Path, raw: bytes):
    """-> (version, header offset, 7 ints with vocab positive, shared classifier)."""
    if len(raw) < V0_HEADER_BYTES:
        raise ValueError(
            f"{path}: {len(raw)} bytes is too short for a llama2.c header "
            f"(at least {V0_HEADER_BYTES} bytes expected)"
        )
    (first,) = struct.unpack("<I", raw[:4])
    if first == MAGIC:
        if len(raw) < V1_HEADER_BYTES:
            raise ValueError(
                f"{path}: {len(raw)} bytes is too short for a llama2.c v1 header "
                f"(expected {V1_HEADER_BYTES} bytes)"
            )
        (version,) = struct.unpack("<i", raw[4:8])
        if version != 1:
            raise ValueError(
                f"{path}: llama2.c version {version} is not supported (only float32 v0 and v1; "
                "v2 is Q8_0-quantised)"
            )
        ints = struct.unpack("<7i", raw[8:36])
        ints = (*ints[:5], abs(ints[5]), ints[6])
        shared = bool(raw[36])
        return 1, V1_HEADER_BYTES, ints, shared
    ints = struct.unpack("<7i", raw[:V0_HEADER_BYTES])
    shared = ints[5] > 0
    ints = (*ints[:5], abs(ints[5]), ints[6])
    return 0, V0_HEADER_BYTES, ints, shared


def _check_dims(path, ints):
    dim, n_heads, n_kv_heads = ints[0], ints[3], ints[4]
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    bad = [f"{n}={v}" for n, v in zip(names, ints, strict=True) if v <= 0]
    if bad or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint (implausible header {ints})")


def load_llama2c(path, dtype=None) -> tuple[ModelConfig, dict]:
    """Read a llama2.c v0 or v1 float32 `.bin` -> (ModelConfig, params as host numpy arrays).

    `dtype` is the storage dtype of the returned params (None: float32; or bfloat16, as a
    name or a dtype); it also becomes `cfg.param_dtype`. Raises a one-line ValueError when the
    file size does not match its header, or for a version this reader does not know.
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    version, offset, ints, shared = _read_header(path, head)
    _check_dims(path, ints)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = ints
    shapes = _shapes(*ints, version=version, shared=shared)
    expected = offset + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size != expected:
        raise ValueError(
            f"{path}: size does not match its llama2.c v{version} header {ints}: "
            f"expected {expected} bytes, got {size}"
        )

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    pos = offset
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = mm[pos : pos + 4 * n].view(_F32).reshape(shape)
        pos += 4 * n

    name = "float32" if dtype is None else np.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of ('float32', 'bfloat16')")
    np_dtype = np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(np.float32)
    put = lambda x: np.array(x, np.float32).astype(np_dtype, copy=False)  # a copy, off the memmap

    cfg = llama_config(
        vocab_size=vocab,
        d_model=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=hidden,
        max_len=seq_len,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_style="interleaved",
        tie_embeddings=shared,
        param_dtype=name,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        architecture="LlamaForCausalLM",
    )
    h, k, dh = n_heads, n_kv_heads, dim // n_heads
    params = {"embed": put(arrays["token_embedding"])}  # [V, D]
    for i in range(n_layers):
        params[f"block_{i}"] = {
            "attn_norm": {"scale": put(arrays["rms_att"][i])},
            "attn": {
                "q": {"kernel": put(arrays["wq"][i].T.reshape(dim, h, dh))},  # [D, H, Dh]
                "k": {"kernel": put(arrays["wk"][i].T.reshape(dim, k, dh))},  # [D, K, Dh]
                "v": {"kernel": put(arrays["wv"][i].T.reshape(dim, k, dh))},  # [D, K, Dh]
                "o": {"kernel": put(arrays["wo"][i].T.reshape(h, dh, dim))},  # [H, Dh, D]
            },
            "mlp_norm": {"scale": put(arrays["rms_ffn"][i])},
            "mlp": {
                "gate": {"kernel": put(arrays["w1"][i].T)},  # [D, F]
                "up": {"kernel": put(arrays["w3"][i].T)},  # [D, F]
                "down": {"kernel": put(arrays["w2"][i].T)},  # [F, D]
            },
        }
    params["final_norm"] = {"scale": put(arrays["rms_final"])}
    if not shared:
        params["lm_head"] = {"kernel": put(arrays["wcls"].T)}  # [D, V]
    del arrays, mm
    return cfg, params


def rope_tables(head_size: int, seq_len: int, theta: float = 10000.0):
    """llama2.c's freq_cis_real / freq_cis_imag, float32 [seq_len, head_size/2] each.

    As model.py's precompute_freqs_cis computes them in torch: all in float32.
    """
    exps = np.arange(0, head_size, 2, dtype=np.float32)[: head_size // 2] / np.float32(head_size)
    freqs = np.float32(1.0) / (np.float32(theta) ** exps)  # [Dh/2]
    t = np.arange(seq_len, dtype=np.float32)
    angles = np.outer(t, freqs).astype(np.float32)  # [seq, Dh/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _half_to_interleaved(kernel: np.ndarray) -> np.ndarray:
    """Reorder the last (Dh) axis of a 'half'-RoPE q/k kernel into interleaved pairs.

    Rotate-half pairs dims (i, i + Dh/2); interleaved pairs (2i, 2i+1). Applying the same
    permutation to q and k leaves every q.k score, hence the model's outputs, unchanged.
    """
    dh = kernel.shape[-1]
    perm = np.stack([np.arange(dh // 2), np.arange(dh // 2) + dh // 2], axis=-1).reshape(-1)
    return kernel[..., perm]


def _check_saveable(cfg: ModelConfig, params: dict):
    problems = []
    if cfg.family != "llama":
        problems.append(f"family={cfg.family!r} (need 'llama')")
    if cfg.activation != "silu":
        problems.append(f"activation={cfg.activation!r} (need 'silu')")
    if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        problems.append("biases (llama2.c has none)")
    if cfg.dim_per_head * cfg.n_heads != cfg.d_model:
        problems.append(f"head_dim={cfg.dim_per_head} != d_model/n_heads")
    if cfg.rope_theta != 10000.0:
        problems.append(f"rope_theta={cfg.rope_theta} (llama2.c fixes 10000)")
    if abs(cfg.norm_eps - 1e-5) > 1e-12:
        problems.append(f"norm_eps={cfg.norm_eps} (llama2.c fixes 1e-5)")
    if problems:
        raise ValueError("cannot write a llama2.c checkpoint: " + "; ".join(problems))
    if cfg.tie_embeddings == ("lm_head" in params):
        raise ValueError(
            f"params do not match cfg.tie_embeddings={cfg.tie_embeddings}: "
            f"'lm_head' {'present' if 'lm_head' in params else 'absent'}"
        )


def save_llama2c(cfg: ModelConfig, params: dict, path, *, version: int = 0) -> None:
    """Write a llama2.c float32 checkpoint (v0 legacy by default, or v1) atomically.

    A 'half'-RoPE (Hugging Face layout) model is written with its q/k output dims permuted to
    llama2.c's interleaved pairs, which gives the same function. Other differences from what
    llama2.c runs (biases, GELU, a head_dim other than d_model / n_heads, another RoPE theta
    or norm eps) raise a ValueError.
    """
    if version not in (0, 1):
        raise ValueError(f"version={version} is not allowed; choose 0 (legacy) or 1")
    _check_saveable(cfg, params)
    f32 = lambda x: np.asarray(np.asarray(x, np.float32), _F32)
    d, h, k, dh, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.n_layers
    qk = _half_to_interleaved if cfg.rope_style == "half" else (lambda w: w)
    blocks = [params[f"block_{i}"] for i in range(L)]
    arrays = {
        "token_embedding": f32(params["embed"]),
        "rms_att": np.stack([f32(b["attn_norm"]["scale"]) for b in blocks]),
        "wq": np.stack([qk(f32(b["attn"]["q"]["kernel"])).reshape(d, h * dh).T for b in blocks]),
        "wk": np.stack([qk(f32(b["attn"]["k"]["kernel"])).reshape(d, k * dh).T for b in blocks]),
        "wv": np.stack([f32(b["attn"]["v"]["kernel"]).reshape(d, k * dh).T for b in blocks]),
        "wo": np.stack([f32(b["attn"]["o"]["kernel"]).reshape(h * dh, d).T for b in blocks]),
        "rms_ffn": np.stack([f32(b["mlp_norm"]["scale"]) for b in blocks]),
        "w1": np.stack([f32(b["mlp"]["gate"]["kernel"]).T for b in blocks]),
        "w2": np.stack([f32(b["mlp"]["down"]["kernel"]).T for b in blocks]),
        "w3": np.stack([f32(b["mlp"]["up"]["kernel"]).T for b in blocks]),
        "rms_final": f32(params["final_norm"]["scale"]),
    }
    arrays["freq_cis_real"], arrays["freq_cis_imag"] = rope_tables(dh, cfg.max_len, cfg.rope_theta)
    shared = cfg.tie_embeddings
    if not shared:
        arrays["wcls"] = f32(params["lm_head"]["kernel"]).T
    ints = (d, cfg.d_ff, L, h, k, cfg.vocab_size, cfg.max_len)
    shapes = _shapes(*ints, version=version, shared=shared)
    if version == 0:
        header = struct.pack("<7i", *ints[:5], ints[5] if shared else -ints[5], ints[6])
    else:
        header = struct.pack("<Ii7iB", MAGIC, 1, *ints, int(shared))
        header += b"\0" * (V1_HEADER_BYTES - len(header))

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for name, shape in shapes:
                a = arrays[name]
                if a.shape != shape:
                    raise ValueError(f"param {name} has shape {a.shape}, expected {shape}")
                f.write(np.ascontiguousarray(a, _F32).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

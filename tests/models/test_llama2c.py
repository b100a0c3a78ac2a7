"""llama2.c checkpoints: stories260K against an independent numpy forward, greedy golden text,
save/load round trips (v0, v1, untied, 'half' RoPE), and clear errors."""

import struct

import jax
import numpy as np
import pytest

from jaxrec.data import Llama2cTokenizer
from jaxrec.models import gpt2_config, init_params, llama_config, logits
from jaxrec.models.llama2c import load_llama2c, rope_tables, save_llama2c

HEADER = (64, 172, 5, 8, 4, 512, 512)  # dim, hidden, layers, heads, kv heads, vocab, seq_len
FILE_BYTES = 1056540


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "models" / "stories260K"


@pytest.fixture(scope="module")
def loaded(stories):
    return load_llama2c(stories / "stories260K.bin")


def _read_v0(path):
    """The raw arrays of a legacy llama2.c file, read here independently of the loader."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
    vocab = abs(vocab)
    hs = dim // n_heads
    kvd = hs * n_kv
    data = np.frombuffer(raw, "<f4", offset=28)
    w, pos = {}, 0
    for name, shape in [
        ("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kvd, dim)), ("wv", (n_layers, kvd, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
        ("fcr", (seq, hs // 2)), ("fci", (seq, hs // 2)),
    ]:
        n = int(np.prod(shape))
        w[name] = data[pos : pos + n].reshape(shape)
        pos += n
    assert pos == data.size
    return w, dict(dim=dim, n_heads=n_heads, n_kv=n_kv, n_layers=n_layers)


def _reference_logits(w, hp, tokens):
    """run.c's forward, one position at a time, in float64: [T] ids -> [T, V] logits."""
    dim, nh, nkv = hp["dim"], hp["n_heads"], hp["n_kv"]
    hs = dim // nh
    kvd = hs * nkv
    f64 = {k: v.astype(np.float64) for k, v in w.items()}

    def rmsnorm(x, g):
        return g * (x / np.sqrt(np.mean(x * x) + 1e-5))

    def rotate(vec, pos, n):  # run.c: pairs (i, i+1) over the flat vector, freq by i % hs
        vec = vec.copy()
        for i in range(0, n, 2):
            freq = 1.0 / 10000.0 ** ((i % hs) / hs)
            c, s = np.cos(pos * freq), np.sin(pos * freq)
            v0, v1 = vec[i], vec[i + 1]
            vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
        return vec

    kcache = np.zeros((hp["n_layers"], len(tokens), kvd))
    vcache = np.zeros_like(kcache)
    out = []
    for pos, tok in enumerate(tokens):
        x = f64["emb"][tok].copy()
        for layer in range(hp["n_layers"]):
            xb = rmsnorm(x, f64["rms_att"][layer])
            q = rotate(f64["wq"][layer] @ xb, pos, dim)
            kcache[layer, pos] = rotate(f64["wk"][layer] @ xb, pos, kvd)
            vcache[layer, pos] = f64["wv"][layer] @ xb
            att_out = np.zeros(dim)
            for h in range(nh):
                kvh = h // (nh // nkv)
                qh = q[h * hs : (h + 1) * hs]
                keys = kcache[layer, : pos + 1, kvh * hs : (kvh + 1) * hs]
                vals = vcache[layer, : pos + 1, kvh * hs : (kvh + 1) * hs]
                sc = keys @ qh / np.sqrt(hs)
                p = np.exp(sc - sc.max())
                att_out[h * hs : (h + 1) * hs] = (p / p.sum()) @ vals
            x = x + f64["wo"][layer] @ att_out
            xb = rmsnorm(x, f64["rms_ffn"][layer])
            h1 = f64["w1"][layer] @ xb
            hb = h1 / (1.0 + np.exp(-h1)) * (f64["w3"][layer] @ xb)
            x = x + f64["w2"][layer] @ hb
        out.append(f64["emb"] @ rmsnorm(x, f64["rms_final"]))
    return np.stack(out)


def test_stories260k_config(loaded):
    cfg, params = loaded
    got = (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
           cfg.max_len)
    assert got == HEADER
    assert cfg.family == "llama" and cfg.rope_style == "interleaved" and cfg.tie_embeddings
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.norm_eps, cfg.rope_theta) == (
        1, 2, 0, 1e-5, 10000.0)
    assert cfg.hf_architecture == "LlamaForCausalLM"
    assert "lm_head" not in params
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert params["block_0"]["attn"]["q"]["kernel"].shape == (64, 8, 8)
    assert params["block_0"]["attn"]["k"]["kernel"].shape == (64, 4, 8)
    assert params["block_4"]["attn"]["o"]["kernel"].shape == (8, 8, 64)
    assert params["block_4"]["mlp"]["down"]["kernel"].shape == (172, 64)
    assert sum(x.size for x in jax.tree.leaves(params)) == 260032  # the README's weight count


def test_stories260k_logits_match_numpy_reference(stories, loaded):
    cfg, params = loaded
    w, hp = _read_v0(stories / "stories260K.bin")
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 17]
    ref = _reference_logits(w, hp, tokens)  # [T, V]
    got = np.asarray(logits(cfg, params, np.array([tokens], np.int32)))[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_stored_rope_tables_match_ours(stories):
    w, _ = _read_v0(stories / "stories260K.bin")
    cos, sin = rope_tables(8, 512)
    np.testing.assert_allclose(cos, w["fcr"], atol=1e-6)
    np.testing.assert_allclose(sin, w["fci"], atol=1e-6)


def test_greedy_decode_reproduces_golden_text(stories, loaded):
    """Argmax from BOS with full forward passes over a fixed buffer (one compilation: the logits
    at position t depend only on tokens <= t)."""
    cfg, params = loaded
    steps = 40
    buf = np.zeros((1, steps + 1), np.int32)
    buf[0, 0] = cfg.bos_id
    for t in range(steps):
        buf[0, t + 1] = int(np.argmax(np.asarray(logits(cfg, params, buf))[0, t]))
    tok = Llama2cTokenizer.from_file(stories / "tok512.bin")
    text = tok.decode(buf[0])
    golden = (stories / "golden_greedy_t0_steps256.txt").read_text(encoding="utf-8")
    assert len(text) > 100
    assert golden.startswith(text), (text, golden[: len(text)])


def test_save_load_round_trip_is_exact(tmp_path, stories, loaded):
    cfg, params = loaded
    out = tmp_path / "copy.bin"
    save_llama2c(cfg, params, out)
    assert out.stat().st_size == FILE_BYTES
    cfg2, params2 = load_llama2c(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # every byte except the (unused) RoPE tables is the original's
    orig, new = (stories / "stories260K.bin").read_bytes(), out.read_bytes()
    tables = 2 * 512 * 4 * 4
    wcls_end = FILE_BYTES - tables
    assert new[:wcls_end] == orig[:wcls_end]
    np.testing.assert_allclose(
        np.frombuffer(new[wcls_end:], "<f4"), np.frombuffer(orig[wcls_end:], "<f4"), atol=1e-6
    )
    assert not list(tmp_path.glob("*.tmp"))


def test_reads_version1_written_as_export_py_does(tmp_path, stories, loaded):
    """A v1 file laid out by hand after llama2.c export.py version1_export."""
    cfg, params = loaded
    w, _ = _read_v0(stories / "stories260K.bin")
    header = struct.pack("<Ii7iB", 0x616B3432, 1, *HEADER, 1)
    header += b"\0" * (256 - len(header))
    order = ["rms_att", "rms_ffn", "rms_final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    path = tmp_path / "v1.bin"
    path.write_bytes(header + b"".join(w[k].astype("<f4").tobytes() for k in order))
    cfg1, params1 = load_llama2c(path)
    assert cfg1 == cfg
    jax.tree.map(np.testing.assert_array_equal, params1, params)
    save_llama2c(cfg, params, tmp_path / "ours_v1.bin", version=1)
    assert (tmp_path / "ours_v1.bin").read_bytes() == path.read_bytes()


def _perturbed(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


TINY = dict(vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=2, max_len=16)


@pytest.mark.parametrize("version", [0, 1])
def test_untied_round_trip(tmp_path, version):
    cfg = llama_config(**TINY, rope_style="interleaved", tie_embeddings=False)
    params = _perturbed(cfg)
    path = tmp_path / "untied.bin"
    save_llama2c(cfg, params, path, version=version)
    if version == 0:
        assert struct.unpack("<7i", path.read_bytes()[:28])[5] == -61  # negative: untied
    cfg2, params2 = load_llama2c(path)
    assert not cfg2.tie_embeddings and cfg2.vocab_size == 61
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_half_rope_model_is_permuted_to_interleaved(tmp_path):
    cfg = llama_config(**TINY, rope_style="half")
    params = _perturbed(cfg, seed=3)
    save_llama2c(cfg, params, tmp_path / "half.bin")
    cfg2, params2 = load_llama2c(tmp_path / "half.bin")
    assert cfg2.rope_style == "interleaved"
    tokens = np.random.default_rng(0).integers(0, 61, size=(2, 16), dtype=np.int32)
    np.testing.assert_allclose(
        np.asarray(logits(cfg2, params2, tokens)), np.asarray(logits(cfg, params, tokens)),
        atol=1e-5, rtol=1e-5,
    )


def test_bfloat16_storage(stories):
    cfg, params = load_llama2c(stories / "stories260K.bin", dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_truncated_file_gives_clear_error(tmp_path, stories):
    bad = tmp_path / "short.bin"
    bad.write_bytes((stories / "stories260K.bin").read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"short.bin.*expected {FILE_BYTES} bytes, got "
                                         f"{FILE_BYTES - 10}") as e:
        load_llama2c(bad)
    assert "\n" not in str(e.value)


def test_version2_is_rejected(tmp_path):
    path = tmp_path / "q8.bin"
    path.write_bytes(struct.pack("<Ii7iBi", 0x616B3432, 2, *HEADER, 1, 64).ljust(256, b"\0"))
    with pytest.raises(ValueError, match="version 2 is not supported"):
        load_llama2c(path)


def test_save_rejects_what_llama2c_cannot_run(tmp_path):
    cfg = gpt2_config(**{**TINY, "n_kv_heads": 4})
    with pytest.raises(ValueError, match="family='gpt2'"):
        save_llama2c(cfg, {}, tmp_path / "x.bin")
    cfg = llama_config(**TINY, qkv_bias=True, rope_theta=1e6)
    with pytest.raises(ValueError, match="biases.*rope_theta"):
        save_llama2c(cfg, {}, tmp_path / "x.bin")
    assert not list(tmp_path.iterdir())

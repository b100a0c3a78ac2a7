"""The Flax LM: cached decoding, padding, heads, dtypes, shapes of real-size configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import (
    causal_mask,
    count_params,
    forward,
    forward_cached,
    gpt2_config,
    init_cache,
    init_params,
    init_value_params,
    llama_config,
    logical_axes,
    logits,
    positions_from_valid,
    project_logits,
    values,
)

TINY = dict(vocab_size=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=64)
CONFIGS = {
    "gpt2": gpt2_config(**TINY),
    "llama-gqa": llama_config(**TINY, n_kv_heads=2, tie_embeddings=False),
    "llama-interleaved": llama_config(**TINY, n_kv_heads=1, rope_style="interleaved"),
    "qwen2-bias": llama_config(**TINY, n_kv_heads=2, qkv_bias=True, rope_theta=1e6),
}


def _random_params(cfg, seed=0):
    """Init, then perturb every leaf so zero-initialised biases and norms matter too."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("name", CONFIGS)
def test_token_by_token_cached_decoding_matches_full_forward(name):
    cfg = CONFIGS[name]
    params = _random_params(cfg)
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, cfg.vocab_size)
    full = logits(cfg, params, tokens)  # [3, 12, V]

    cache = init_cache(cfg, batch=3, length=16)
    step_logits = []
    for t in range(tokens.shape[1]):
        mask = (jnp.arange(16) <= t)[None, None, :].repeat(3, axis=0)  # [B, 1, S]
        pos = jnp.full((3, 1), t, jnp.int32)
        out = forward_cached(cfg, params, tokens[:, t : t + 1], pos, mask, cache)
        cache = out.cache
        step_logits.append(out.logits[:, 0])
    cached = jnp.stack(step_logits, axis=1)
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_prefill_then_decode_matches_full_forward(name):
    cfg = CONFIGS[name]
    params = _random_params(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, cfg.vocab_size)
    full = logits(cfg, params, tokens)
    cache = init_cache(cfg, batch=2, length=10)
    slots = jnp.arange(10)
    p = 7
    mask = (slots[None, :] <= jnp.arange(p)[:, None])[None].repeat(2, axis=0)
    pos = jnp.broadcast_to(jnp.arange(p), (2, p))
    out = forward_cached(cfg, params, tokens[:, :p], pos, mask, cache)
    np.testing.assert_allclose(out.logits, full[:, :p], atol=2e-5, rtol=1e-5)
    for t in range(p, 10):
        mask = (slots <= t)[None, None, :].repeat(2, axis=0)
        out = forward_cached(cfg, params, tokens[:, t : t + 1], jnp.full((2, 1), t), mask,
                             out.cache)
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padding_does_not_change_a_row(name):
    cfg = CONFIGS[name]
    params = _random_params(cfg)
    seq = jax.random.randint(jax.random.key(4), (1, 6), 1, cfg.vocab_size)
    alone = logits(cfg, params, seq)[0]
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    valid = jnp.arange(9)[None] >= 3
    out = forward(cfg, params, padded, valid).logits[0, 3:]
    np.testing.assert_allclose(out, alone, atol=2e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(forward(cfg, params, padded, valid).logits)).all()


def test_positions_and_causal_mask():
    valid = jnp.array([[False, False, True, True], [True, True, True, True]])
    np.testing.assert_array_equal(positions_from_valid(valid), [[0, 0, 0, 1], [0, 1, 2, 3]])
    mask = causal_mask(valid)
    assert mask.shape == (2, 4, 4)
    assert not mask[0, 3, 1] and mask[0, 3, 2] and mask[0, 3, 3] and not mask[1, 1, 2]


def test_interleaved_and_half_rope_differ_only_by_a_permutation():
    """A q/k permutation turns an interleaved-RoPE model into the same half-RoPE model."""
    inter = CONFIGS["llama-interleaved"]
    half = inter.replace(rope_style="half")
    params = _random_params(inter)
    dh = inter.dim_per_head
    perm = np.concatenate([np.arange(0, dh, 2), np.arange(1, dh, 2)])  # pairs -> halves

    def permute(tree):
        tree = jax.tree.map(lambda x: x, tree)
        for i in range(inter.n_layers):
            attn = tree[f"block_{i}"]["attn"]
            for name in ("q", "k"):
                attn[name]["kernel"] = attn[name]["kernel"][..., perm]
        return tree

    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, inter.vocab_size)
    a = logits(inter, params, tokens)
    b = logits(half, permute(params), tokens)
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    assert not np.allclose(a, logits(half, params, tokens), atol=1e-3)


def test_value_network_starts_from_the_policy_backbone():
    cfg = CONFIGS["llama-gqa"]
    params = _random_params(cfg)
    vparams = init_value_params(params)
    assert "lm_head" not in vparams
    np.testing.assert_array_equal(vparams["embed"], params["embed"])
    tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, cfg.vocab_size)
    np.testing.assert_array_equal(values(cfg, vparams, tokens), np.zeros((2, 5)))
    vparams["value_head"] = jnp.ones((cfg.d_model,))
    hidden = forward(cfg, params, tokens, head="none").hidden
    np.testing.assert_allclose(values(cfg, vparams, tokens), hidden.sum(-1), rtol=1e-5, atol=1e-5)


def test_shared_trunk_gives_logits_and_values():
    cfg = CONFIGS["gpt2"]
    both = init_params(cfg, jax.random.key(0), head="both")
    assert {"value_head", "value_bias"} <= set(both)
    tokens = jnp.ones((2, 4), jnp.int32)
    out = forward(cfg, both, tokens, head="both")
    assert out.logits.shape == (2, 4, cfg.vocab_size) and out.values.shape == (2, 4)
    np.testing.assert_allclose(project_logits(cfg, both, out.hidden), out.logits, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = CONFIGS["llama-gqa"]
    params = _random_params(cfg)
    tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, cfg.vocab_size)
    f32 = logits(cfg, params, tokens)
    bf16 = logits(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.1
    assert float(jnp.max(jnp.abs(bf16 - f32))) > 0  # really computed in bfloat16


@pytest.mark.parametrize("rows", [96, 97])  # 97: no row block to hide the transpose behind
@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("k, n", [(64, 16), (16, 64)])  # which operand gets transposed
def test_bfloat16_dense_gradients_match_float32_on_rounded_inputs(rows, w_transposed, k, n):
    from jaxrec.models.transformer import _low_precision_dot

    x = jax.random.normal(jax.random.key(0), (rows, k))
    w = jax.random.normal(jax.random.key(1), (n, k) if w_transposed else (k, n))
    loss = lambda x, w, dot: jnp.sum(jnp.sin(dot(x, w)))
    rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
    f32_dot = lambda x, w: x @ (w.T if w_transposed else w)
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(
        x, w, lambda x, w: _low_precision_dot(x, w, w_transposed))
    want = jax.grad(loss, (0, 1))(rounded(x), rounded(w), f32_dot)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == jnp.float32
        # bf16 rounding of the cotangent is the only difference: ~2^-8 relative
        assert float(jnp.max(jnp.abs(g - r))) < 1e-2 * float(jnp.max(jnp.abs(r)))


def test_remat_gives_the_same_gradients():
    cfg = CONFIGS["gpt2"]
    params = _random_params(cfg)
    tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(forward(c, p, tokens).logits ** 2)

    g1 = jax.grad(loss)(params, cfg)
    g2 = jax.grad(loss)(params, cfg.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # GPT-2 small: 124,439,808 params (Hugging Face's count, tied head).
        (gpt2_config(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                     max_len=1024), 124_439_808),
        # Llama-2 7B: 6,738,415,616 params.
        (llama_config(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=11008, max_len=4096, tie_embeddings=False), 6_738_415_616),
        # TinyLlama 1.1B (GQA 32/4): 1,100,048,384 params.
        (llama_config(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                      d_ff=5632, max_len=2048, tie_embeddings=False), 1_100_048_384),
    ],
)
def test_real_size_parameter_counts_without_allocating(cfg, expected):
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert count_params(shapes) == expected


def test_every_param_has_logical_axes():
    cfg = CONFIGS["llama-gqa"]
    axes = logical_axes(cfg)
    params = init_params(cfg, jax.random.key(0))
    flat_axes = jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat_axes) == len(flat_params)
    for (path, spec), (_, x) in zip(flat_axes, flat_params, strict=True):
        assert len(spec) == x.ndim, (path, spec, x.shape)
    q = axes["block_0"]["attn"]["q"]["kernel"]
    assert tuple(q) == ("embed", "heads", "head_dim")


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="model.rope_style='spiral'.*half"):
        llama_config(rope_style="spiral")
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of model.n_kv_heads=4"):
        llama_config(n_heads=6, n_kv_heads=4, d_model=48)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_custom_gradient_matches_autodiff(dtype, tol):
    from jaxrec.models.transformer import attend

    b, k, q, s, d = 2, 2, 12, 6, 8  # Q = 2 query heads per KV head x 6 positions
    keys = jax.random.split(jax.random.key(3), 4)
    shapes = ((b, k, q, d), (b, k, s, d), (b, k, s, d))
    qs, ks, vs = (jax.random.normal(kk, sh) for kk, sh in zip(keys[:3], shapes, strict=True))
    d_out = jax.random.normal(keys[3], (b, k, q, d))
    causal = jnp.tile(jnp.tril(jnp.ones((s, s), bool)), (2, 1))  # [Q, S]
    mask = jnp.broadcast_to(causal, (b, 1, q, s)).at[1, 0, 0].set(False)  # a fully masked row

    def plain(q, k, v):  # what autodiff sees: the same forward, float32 throughout
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k) * d**-0.5
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
        return jnp.einsum("bkqs,bksd->bkqd", probs, v)

    want_out, want_vjp = jax.vjp(plain, qs, ks, vs)
    got_out, got_vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, dtype), qs, ks, vs)
    scale = lambda x: float(jnp.max(jnp.abs(x)))
    assert scale(got_out - want_out) < tol * scale(want_out)
    for got, want in zip(got_vjp(d_out), want_vjp(d_out), strict=True):
        assert got.dtype == jnp.float32
        assert scale(got - want) < tol * scale(want)


@pytest.mark.parametrize("centered", [True, False])  # LayerNorm, RMSNorm
def test_norm_custom_gradient_matches_autodiff(centered):
    from jaxrec.models.transformer import normalize

    keys = jax.random.split(jax.random.key(4), 4)
    x = 3.0 * jax.random.normal(keys[0], (2, 5, 16)) + 1.0
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (16,))
    bias = 0.1 * jax.random.normal(keys[2], (16,)) if centered else None
    dy = jax.random.normal(keys[3], x.shape)

    def plain(x, scale, bias):
        if centered:
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-5) * scale
        return y if bias is None else y + bias

    want_y, want_vjp = jax.vjp(plain, x, scale, bias)
    got_y, got_vjp = jax.vjp(lambda x, s, b: normalize(x, s, b, 1e-5), x, scale, bias)
    np.testing.assert_allclose(got_y, want_y, atol=1e-5)
    for got, want in zip(got_vjp(dy), want_vjp(dy), strict=True):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_keep_last_equals_the_full_pass_on_its_positions(family, dtype):
    """forward(keep_last=N): the last block's queries, MLP and heads on the last N positions
    only give the full pass's last N outputs and its gradients.

    Not bit-equal on every CPU: the last block multiplies 15 rows instead of 36, and XLA's
    kernels may split rows and sum in another order for another row count (on an AVX2-only
    EPYC 1,144 of 1,455 float32 llama logits moved, by at most 7.5e-8). So float32 is compared
    at a few ulps of logits below 1, and bfloat16 at 1% of the largest value: one operand that
    rounds the other way before a bfloat16 cast moves a product by 2^-8 relative."""
    from jaxrec.models import forward, gpt2_config, init_params, llama_config

    make = gpt2_config if family == "gpt2" else llama_config
    extra = {} if family == "gpt2" else {"n_kv_heads": 2}
    cfg = make(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32,
               dtype=dtype, **extra)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, cfg.vocab_size)
    valid = jnp.ones((3, 12), bool).at[0, :3].set(False)  # left padding on one row
    full = forward(cfg, params, tokens, valid).logits
    part = forward(cfg, params, tokens, valid, keep_last=5).logits
    assert part.shape == (3, 5, cfg.vocab_size)
    close = _close_at(dtype)
    close(np.asarray(full[:, -5:]), np.asarray(part))

    def loss(p, keep):
        return jnp.sum(forward(cfg, p, tokens, valid, keep_last=keep).logits[:, -5:] ** 2)

    g_full, g_part = jax.grad(loss)(params, 0), jax.grad(loss)(params, 5)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_part), strict=True):
        if dtype == "float32":  # gradients sum over rows and positions: more terms, more ulps
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
        else:
            close(np.asarray(a), np.asarray(b))


def _close_at(dtype):
    """The comparison two summation orders allow at this compute dtype (see the test above)."""
    def close(want, got):
        if dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    return close

"""LoRA adapters: a fresh adapter changes nothing, attached equals merged, shapes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import forward, gpt2_config, init_params, llama_config, lora

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _model(make, dtype="float32"):
    cfg = make(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32,
               dtype=dtype)
    return cfg, init_params(cfg, jax.random.key(0))


def _perturbed(adapters, seed=3):
    """Adapters with a non-zero B (a trained adapter), deterministic."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("make", [gpt2_config, llama_config])
def test_fresh_adapters_leave_the_logits_unchanged(make):
    cfg, params = _model(make)
    adapters = lora.init_adapters(params, 4, TARGETS, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    base = forward(cfg, params, tokens).logits
    adapted = forward(cfg, lora.attach(params, adapters, 4.0), tokens).logits
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


@pytest.mark.parametrize("make, dtype, atol", [(gpt2_config, "float32", 1e-5),
                                               (llama_config, "float32", 1e-5),
                                               (llama_config, "bfloat16", 2e-2)])
def test_attached_adapters_equal_the_merged_weights(make, dtype, atol):
    """x W + (x A)(s B) == x (W + s A B): the low-rank path and export's merge agree."""
    cfg, params = _model(make, dtype)
    adapters = _perturbed(lora.init_adapters(params, 4, TARGETS, jax.random.key(1)))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    attached = forward(cfg, lora.attach(params, adapters, 2.0), tokens).logits
    merged = forward(cfg, lora.merge(params, adapters, 2.0), tokens).logits
    base = forward(cfg, params, tokens).logits
    assert float(jnp.abs(attached - base).max()) > 0.05  # the adapters do change the model
    np.testing.assert_allclose(np.asarray(attached), np.asarray(merged), atol=atol)


def test_adapter_shapes_and_count_follow_the_targets():
    cfg, params = _model(llama_config)
    r = 3
    adapters = lora.init_adapters(params, r, ("q", "o", "down"), jax.random.key(1))
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.dim_per_head
    attn, mlp = adapters["block_0"]["attn"], adapters["block_0"]["mlp"]
    assert attn["q"]["lora_a"].shape == (d, r)
    assert attn["q"]["lora_b"].shape == (r, cfg.n_heads, cfg.dim_per_head)
    assert attn["o"]["lora_a"].shape == (cfg.n_heads, cfg.dim_per_head, r)
    assert attn["o"]["lora_b"].shape == (r, d)
    assert mlp["down"]["lora_a"].shape == (f, r) and set(attn) == {"q", "o"}
    assert not np.any(np.asarray(attn["q"]["lora_b"]))  # B starts at zero
    per_layer = r * (d + hd) + r * (hd + d) + r * (f + d)
    assert lora.count_adapter_params(adapters) == cfg.n_layers * per_layer


def test_lora_errors_are_clear():
    cfg, params = _model(gpt2_config)
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora.init_adapters(params, 4, ("gate",), jax.random.key(0))  # GPT-2 has no gate
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.init_adapters(params, 0, ("q",), jax.random.key(0))
    # adapters made for another model (d_model 16) cannot be merged into this one's kernels
    _, small = _model(lambda **kw: gpt2_config(**{**kw, "d_model": 16}))
    foreign = lora.init_adapters(small, 2, ("q",), jax.random.key(0))
    with pytest.raises(ValueError, match=r"adapter block_0/attn/q: A B has shape \(16, 4, 4\)"):
        lora.merge(params, foreign, 1.0)


def test_adapter_gradients_are_the_same_with_remat():
    """Per-layer remat recomputes the adapted blocks in the backward pass: same gradients."""
    cfg, params = _model(llama_config)
    adapters = _perturbed(lora.init_adapters(params, 4, TARGETS, jax.random.key(1)))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)

    def loss(ad, c):
        return jnp.mean(forward(c, lora.attach(params, ad, 2.0), tokens).logits ** 2)

    plain = jax.grad(loss)(adapters, cfg)
    remat = jax.grad(loss)(adapters, cfg.replace(remat=True))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(jnp.abs(plain["block_0"]["attn"]["q"]["lora_a"]).max()) > 0

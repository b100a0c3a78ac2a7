"""The item codec: texts, prompts, slates, the trie constraint and item-token mode.

Real titles: all 1682 ml-100k items, with GPT-2's tokenizer and a byte-level BPE trained here
on those titles.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.codec import (
    add_item_tokens,
    build_codec,
    decode_slate,
    history_mask,
    item_texts,
    item_token_codec,
    render_prompts,
    render_slates,
    slate_constraint,
)
from jaxrec.data import load_tokenizer, train_bpe_tokenizer
from jaxrec.generation import Temperature, generate_jit
from jaxrec.models import init_params, llama_config

# ml-100k movie ids whose title (with year) another item shares: the disambiguated ones.
ML100K_DUPLICATES = {
    246: 268, 266: 680, 297: 303, 304: 500, 305: 865, 309: 1606, 329: 348, 573: 670,
    711: 1658, 876: 881, 878: 1003, 1175: 1617, 1234: 1654, 1256: 1257, 1395: 1607,
    1429: 1680, 1477: 1625, 1645: 1650,
}

render_prompts_jit = jax.jit(render_prompts, static_argnums=2)
render_slates_jit = jax.jit(render_slates, static_argnums=2)
decode_slate_jit = jax.jit(decode_slate, static_argnums=3)


@pytest.fixture(scope="module")
def ml100k(shared_dir):
    """(movie ids, titles) from u.item: '|'-separated Latin-1, field 1 the title with year."""
    lines = (shared_dir / "data/movielens/ml-100k/u.item").read_text("latin-1").splitlines()
    rows = [ln.split("|") for ln in lines if ln]
    return [int(r[0]) for r in rows], [r[1] for r in rows]


@pytest.fixture(scope="module")
def gpt2(shared_dir):
    return load_tokenizer(shared_dir / "models/gpt2-tokenizer")


@pytest.fixture(scope="module")
def bpe(ml100k):
    _, titles = ml100k
    return train_bpe_tokenizer([" " + t for t in titles] + ["Watched:", ". Next:"], 2048)


@pytest.fixture(scope="module", params=["gpt2", "bpe"])
def tok(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def texts(ml100k):
    ids, titles = ml100k
    return item_texts(titles, ids=ids)


@pytest.fixture(scope="module")
def codec(ml100k, tok):
    ids, titles = ml100k
    return build_codec(titles, tok, ids=ids)


@pytest.fixture(scope="module")
def bpe_codec(ml100k, bpe):
    ids, titles = ml100k
    return build_codec(titles, bpe, ids=ids)


def _pad_rows(rows, width, pad):
    out = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return jnp.asarray(out), jnp.asarray(mask)


def _sample_slates(codec, constraint, key, batch, scale=4.0):
    """Constrained sampling from random logits, a generation loop without a model:
    (tokens [B, R], mask [B, R], final constraint state).

    The logits are random low-rank ([B, 32] noise times a fixed [32, V] matrix), which is
    ~10x cheaper on CPU than fresh noise over the whole vocabulary at every step.
    """
    sampler = Temperature(1.0)
    v, r = constraint.vocab_size, codec.slate_len(constraint.k)
    key, k_basis = jax.random.split(key)
    basis = jax.random.normal(k_basis, (32, v), jnp.float32) * (scale / np.sqrt(32))

    def cond(carry):
        step, _, done, _, _, _ = carry
        return (step < r) & ~jnp.all(done)

    def body(carry):
        step, state, done, key, tokens, mask = carry
        key, k_logits, k_draw = jax.random.split(key, 3)
        logits = jax.random.normal(k_logits, (batch, 32), jnp.float32) @ basis  # [B, V]
        token, _ = sampler.sample(k_draw, logits, constraint.allowed(state))
        token = jnp.where(done, codec.pad_id, token)
        state = constraint.update(state, token)
        tokens = tokens.at[:, step].set(token)
        mask = mask.at[:, step].set(~done)
        return step + 1, state, done | (token == codec.eos_id), key, tokens, mask

    init = (
        jnp.zeros((), jnp.int32),
        constraint.init(batch),
        jnp.zeros((batch,), jnp.bool_),
        key,
        jnp.full((batch, r), codec.pad_id, jnp.int32),
        jnp.zeros((batch, r), jnp.bool_),
    )
    _, state, _, _, tokens, mask = jax.lax.while_loop(cond, body, init)
    return tokens, mask, state


def _tiny_llama(tok, **overrides):
    """A tiny random llama whose vocabulary and special tokens are the tokenizer's."""
    return llama_config(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                        n_layers=2, max_len=256, bos_id=tok.bos_id, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, **overrides)


_sample_slates_jit = jax.jit(_sample_slates, static_argnums=3)


# ---------------------------------------------------------------------------------------------
# Texts


def test_ml100k_duplicate_titles_get_their_ids(ml100k, texts):
    ids, titles = ml100k
    assert len(set(texts)) == len(texts) == 1682
    changed = {ids[i] for i in range(len(ids)) if texts[i] != titles[i]}
    assert changed == set(ML100K_DUPLICATES) | set(ML100K_DUPLICATES.values())
    by_id = dict(zip(ids, texts, strict=True))
    assert by_id[246] == "Chasing Amy (1997) (#246)"
    assert by_id[268] == "Chasing Amy (1997) (#268)"
    assert by_id[1] == "Toy Story (1995)"


def test_item_texts_prefer_the_year_and_fall_back_to_ids():
    assert item_texts(["A", "A", "A", "B"], years=[1990, 1991, 1991, 1991]) == [
        "A (1990)", "A (#1)", "A (#2)", "B",
    ]
    # "A (1990)" would be item 2's title, so item 0 uses its id.
    assert item_texts(["A", "A", "A (1990)"], years=[1990, 1991, None], ids=[7, 8, 9]) == [
        "A (#7)", "A (1991)", "A (1990)",
    ]
    assert item_texts(["x", "x"]) == ["x (#0)", "x (#1)"]


# ---------------------------------------------------------------------------------------------
# Slates: every ml-100k item round-trips


def test_every_item_round_trips_through_slate_text(codec, tok, texts):
    n = len(texts)
    # Host side: the slate text of one item, encoded, then EOS.
    rows = [tok.encode(" " + t) + [tok.eos_id] for t in texts]
    tokens, mask = _pad_rows(rows, codec.slate_len(1), codec.pad_id)
    items, valid = decode_slate_jit(codec, tokens, mask, 1)
    np.testing.assert_array_equal(items[:, 0], np.arange(n))
    assert bool(valid.all())
    # Device rendering gives the same tokens.
    dev_tokens, dev_mask = render_slates_jit(codec, jnp.arange(n, dtype=jnp.int32)[:, None],
                                             codec.slate_len(1))
    np.testing.assert_array_equal(dev_mask, mask)
    np.testing.assert_array_equal(np.where(mask, dev_tokens, -1), np.where(mask, tokens, -1))


def test_multi_item_slates_round_trip(codec, ml100k, tok, texts):
    k = 5
    n = len(texts)
    rng = np.random.default_rng(0)
    slates = np.stack([rng.choice(n, k, replace=False) for _ in range(400)]).astype(np.int32)
    slates[0] = [266, 265, 679, 0, 1]  # the two "Kull the Conqueror (1997)" items together
    tokens, mask = render_slates_jit(codec, jnp.asarray(slates), codec.slate_len(k))
    items, valid = decode_slate_jit(codec, tokens, mask, k)
    np.testing.assert_array_equal(items, slates)
    assert bool(valid.all())
    # The tokens are the per-item encodings joined by the separator token, then EOS.
    sep = tok.encode(";")
    for row in range(5):
        want = sum((tok.encode(" " + texts[i]) + sep for i in slates[row]), [])[:-1]
        got = np.asarray(tokens[row])[np.asarray(mask[row])]
        assert list(got) == want + [tok.eos_id]
    # With a newline separator the byte-level BPE is compositional: the slate string itself
    # encodes to the same tokens.
    ids, titles = ml100k
    nl = build_codec(titles, tok, ids=ids, separator="\n", suffix="\nNext:")
    tokens, mask = render_slates_jit(nl, jnp.asarray(slates), nl.slate_len(k))
    for row in range(len(slates)):
        text = "\n".join(" " + texts[i] for i in slates[row])
        got = np.asarray(tokens[row])[np.asarray(mask[row])]
        assert list(got) == tok.encode(text) + [tok.eos_id]
    np.testing.assert_array_equal(decode_slate_jit(nl, tokens, mask, k)[0], slates)


def test_decode_slate_marks_bad_items_invalid(gpt2):
    titles = ["Alien", "Alien 3", "Aliens", "Toy Story"]
    c = build_codec(titles, gpt2)
    e, s = gpt2.eos_id, gpt2.encode(";")[0]
    alien, alien3, aliens, toy = (gpt2.encode(" " + t) for t in titles)
    assert alien3[: len(alien)] == alien  # one block is a prefix of another
    k = 3
    cases = [
        (alien + [s] + alien3 + [s] + toy + [e], [0, 1, 3]),
        (alien3 + [s] + alien + [e], [1, 0, -1]),  # EOS before K items
        (alien + [s] + alien + [s] + aliens + [e], [0, -1, 2]),  # a repeat
        (gpt2.encode(" Ali") + gpt2.encode("en") + [s] + toy + [e], [-1, 3, -1]),  # spelling
        (gpt2.encode(" Predator") + [s] + [s] + aliens + [e], [-1, -1, 2]),  # unknown, empty
        (alien3[:1] + [s] + toy + [s] + aliens, [0, 3, -1]),  # prefix = item; no terminator
        (toy + [e] + alien + [s] + aliens + [e], [3, -1, -1]),  # tokens after EOS ignored
        (toy + [s] + alien + [s] + aliens + [s] + alien3 + [e], [3, 0, 2]),  # beyond K ignored
        ([e], [-1, -1, -1]),
        ([s, 7, 8, 9], [-1, -1, -1]),
    ]
    tokens, mask = _pad_rows([t for t, _ in cases], 32, c.pad_id)
    items, valid = decode_slate_jit(c, tokens, mask, k)
    np.testing.assert_array_equal(items, [w for _, w in cases])
    np.testing.assert_array_equal(valid, np.asarray(items) >= 0)
    banned = jnp.zeros((len(cases), 4), jnp.bool_).at[0, 1].set(True)
    items, valid = decode_slate_jit(c, tokens, mask, k, banned)
    np.testing.assert_array_equal(items[0], [0, -1, 3])


def test_free_generations_decode_without_crashing(codec):
    key = jax.random.key(0)
    b, r = 256, codec.slate_len(4)
    tokens = jax.random.randint(key, (b, r), 0, codec.vocab_size)
    lengths = jax.random.randint(jax.random.key(1), (b,), 0, r + 1)
    mask = jnp.arange(r)[None, :] < lengths[:, None]
    items, valid = decode_slate_jit(codec, tokens, mask, 4)
    assert items.shape == (b, 4) and valid.shape == (b, 4)
    assert not bool(valid.any())  # random tokens name no item
    np.testing.assert_array_equal(items, -1)


def test_ambiguous_slate_separator_is_rejected(gpt2):
    with pytest.raises(ValueError, match="ambiguous"):
        build_codec(["Foo", "Foo; Bar"], gpt2)
    build_codec(["Foo", "Foo; Bar"], gpt2, slate_separator="\n")  # fine with another separator
    with pytest.raises(ValueError, match="one token"):
        build_codec(["Foo"], gpt2, slate_separator=" and then")


# ---------------------------------------------------------------------------------------------
# Prompts


def _host_prompt(tok, texts, history, p, prefix, sep, suffix):
    """Reference: the most recent whole items that fit, as (token list, text, kept items)."""
    head = [tok.bos_id] + tok.encode(prefix)
    sep_t, suf_t = tok.encode(sep), tok.encode(suffix)
    kept: list[int] = []
    for i in reversed([i for i in history if i >= 0]):
        cand = [i] + kept
        size = len(head) + len(suf_t) + sum(len(tok.encode(" " + texts[j])) for j in cand)
        if size + len(sep_t) * (len(cand) - 1) > p:
            break
        kept = cand
    body = []
    for n, i in enumerate(kept):
        body += (sep_t if n else []) + tok.encode(" " + texts[i])
    text = prefix + sep.join(" " + texts[i] for i in kept) + suffix
    return head + body + suf_t, text, kept


def _histories(n, b, h, seed):
    rng = np.random.default_rng(seed)
    hist = np.stack([rng.choice(n, h, replace=False) for _ in range(b)]).astype(np.int32)
    lengths = rng.integers(0, h + 1, b)
    hist[np.arange(h)[None, :] < (h - lengths)[:, None]] = -1  # left padding
    holes = rng.random((b, h)) < 0.1
    hist[holes] = -1  # and holes
    return hist


@pytest.mark.parametrize("template", [("Watched:", ";", ". Next:"), ("Watched:", "\n", "\nNext:")])
def test_render_prompts_equals_host_rendering(ml100k, tok, texts, template):
    ids, titles = ml100k
    prefix, sep, suffix = template
    c = build_codec(titles, tok, ids=ids, prefix=prefix, separator=sep, suffix=suffix)
    p, h = 64, 12
    hist = _histories(len(titles), 160, h, seed=1)
    hist[0] = -1  # an empty history
    tokens, valid = render_prompts_jit(c, jnp.asarray(hist), p)
    assert tokens.shape == (160, p) and valid.shape == (160, p)
    truncated = 0
    for row in range(len(hist)):
        want, text, kept = _host_prompt(tok, texts, hist[row], p, prefix, sep, suffix)
        truncated += len(kept) < (hist[row] >= 0).sum()
        got_valid = np.asarray(valid[row])
        assert got_valid.sum() == len(want) and got_valid[-len(want):].all()  # left padded
        got = list(np.asarray(tokens[row])[got_valid])
        assert got == want
        assert tok.decode(got) == text  # byte-level BPE decodes the blocks back to the text
        if sep == "\n":  # compositional template: the whole string encodes the same
            assert tok.encode(text, bos=True) == want
    assert truncated > 10  # many histories did not fit whole
    assert bool(valid.all(1).any())  # and some filled the prompt exactly


def test_render_prompts_keeps_most_recent_whole_items(bpe_codec, bpe, texts):
    c = bpe_codec
    lens = [len(bpe.encode(" " + texts[i])) for i in range(6)]
    fixed = 1 + len(bpe.encode("Watched:")) + len(bpe.encode(". Next:"))
    p = fixed + sum(lens[3:]) + 2  # exactly items 3, 4, 5 and two ';'
    hist = jnp.asarray([[0, 1, 2, 3, 4, 5], [5, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, -1],
                        [-1, 5, -1, 1, 2, -1]], jnp.int32)
    tokens, valid = render_prompts_jit(c, hist, p)
    out = [bpe.decode(np.asarray(t)[np.asarray(v)]) for t, v in zip(tokens, valid, strict=True)]

    def text(items):
        return "Watched:" + ";".join(" " + texts[i] for i in items) + ". Next:"

    assert bool(valid[0].all()) and out[0] == text([3, 4, 5])  # an exact fit
    assert lens[5] > 10 and sum(lens[:5]) + 4 < p - fixed  # item 5 is long
    assert out[1] == text([0, 1, 2, 3, 4])  # item 5 does not fit whole: dropped, not cut
    assert out[2] == out[0]  # -1 padding may sit anywhere
    assert out[3] == text([5, 1, 2])
    with pytest.raises(ValueError, match="cannot hold"):
        render_prompts(c, hist, fixed - 1)


# ---------------------------------------------------------------------------------------------
# Constrained decoding


def test_constrained_sampling_gives_distinct_real_items(bpe_codec):
    c = bpe_codec
    n, k, b = c.num_items, 5, 2000  # 10,000 items drawn
    rng = np.random.default_rng(5)
    banned = rng.random((b, n)) < 0.3
    # The first 64 rows may use exactly k items: every other one is banned.
    only = np.stack([rng.choice(n, k, replace=False) for _ in range(64)])
    only[0] = [0, 1, 2, 3, 4]
    banned[:64] = True
    banned[np.arange(64)[:, None], only] = False
    constraint = slate_constraint(c, k, banned=jnp.asarray(banned))
    tokens, mask, state = _sample_slates_jit(c, constraint, jax.random.key(3), b)
    items, valid = decode_slate_jit(c, tokens, mask, k)
    assert bool(valid.all()), f"{int((~valid).sum())} invalid of {b * k}"
    items = np.asarray(items)
    assert all(len(set(row)) == k for row in items)
    assert not banned[np.arange(b)[:, None], items].any()
    for row in range(64):
        assert set(items[row]) == set(only[row])
    np.testing.assert_array_equal(state.chosen, items)  # the constraint saw the same slates
    # The tokens are exactly the canonical rendering of the slate.
    want, want_mask = render_slates_jit(c, jnp.asarray(items), tokens.shape[1])
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(np.where(mask, tokens, -1), np.where(mask, want, -1))
    assert len(np.unique(items)) > 1000  # random logits reach most of the catalogue


def test_constrained_sampling_with_a_larger_model_vocab(gpt2, ml100k):
    ids, titles = ml100k
    c = build_codec(titles, gpt2, ids=ids)
    k, b = 3, 32
    constraint = slate_constraint(c, k, vocab_size=c.vocab_size + 37)
    tokens, mask, _ = _sample_slates_jit(c, constraint, jax.random.key(4), b)
    items, valid = decode_slate_jit(c, tokens, mask, k)
    assert bool(valid.all())
    assert all(len(set(row)) == k for row in np.asarray(items))


def test_prefix_items_and_an_exhausted_catalogue(bpe):
    titles = ["Alien", "Alien 3", "Aliens", "Toy Story"]
    c = build_codec(titles, bpe)
    alien, alien3 = bpe.encode(" Alien"), bpe.encode(" Alien 3")
    assert alien3[: len(alien)] == alien  # one block is a prefix of another
    b = 64
    banned = np.zeros((b, 4), bool)
    banned[:4] = [True, False, True, False]  # two items left for three slots
    constraint = slate_constraint(c, 3, jnp.asarray(banned))
    tokens, mask, state = _sample_slates_jit(c, constraint, jax.random.key(7), b)
    items, valid = decode_slate_jit(c, tokens, mask, 3)
    assert bool(valid[4:].all())
    counts = collections.Counter(np.asarray(items[4:]).reshape(-1).tolist())
    assert set(counts) == {0, 1, 2, 3}  # "Alien" and "Alien 3" both reachable
    # The rows with two items left stop with EOS after two.
    np.testing.assert_array_equal(np.sort(np.asarray(items)[:4, :2], 1), [[1, 3]] * 4)
    np.testing.assert_array_equal(valid[:4], [[True, True, False]] * 4)
    assert bool(state.done.all())


# ---------------------------------------------------------------------------------------------
# Item-token mode


@pytest.mark.parametrize("tie", [True, False])
def test_item_tokens_start_at_the_title_means(bpe_codec, bpe, texts, tie):
    cfg = _tiny_llama(bpe, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    cfg2, params2, offset = add_item_tokens(cfg, params, bpe_codec)
    n = len(texts)
    assert offset == bpe.vocab_size and cfg2.vocab_size == offset + n
    embed = np.asarray(params["embed"])
    new_embed = np.asarray(params2["embed"])
    assert new_embed.shape == (offset + n, 32)
    np.testing.assert_array_equal(new_embed[:offset], embed)
    want = np.stack([embed[bpe.encode(" " + t)].mean(0) for t in texts])
    np.testing.assert_allclose(new_embed[offset:], want, atol=1e-6)
    if tie:
        assert "lm_head" not in params2
    else:
        kernel = np.asarray(params["lm_head"]["kernel"])
        new_kernel = np.asarray(params2["lm_head"]["kernel"])
        assert new_kernel.shape == (32, offset + n)
        want = np.stack([kernel[:, bpe.encode(" " + t)].mean(1) for t in texts], 1)
        np.testing.assert_allclose(new_kernel, np.concatenate([kernel, want], 1), atol=1e-6)


def test_item_token_codec_round_trips(bpe_codec, bpe):
    offset = bpe.vocab_size
    c = item_token_codec(bpe_codec, offset)
    n = c.num_items
    assert c.item_token_offset == offset and c.block_len == 1
    np.testing.assert_array_equal(c.item_tokens[:, 0], offset + np.arange(n))
    tokens, mask = render_slates_jit(c, jnp.arange(n, dtype=jnp.int32)[:, None], c.slate_len(1))
    np.testing.assert_array_equal(tokens, np.stack([offset + np.arange(n),
                                                    np.full(n, bpe.eos_id)], 1))
    np.testing.assert_array_equal(decode_slate_jit(c, tokens, mask, 1)[0][:, 0], np.arange(n))
    hist = jnp.asarray([[-1, 5, 9], [3, -1, -1]], jnp.int32)
    tokens, valid = render_prompts_jit(c, hist, 16)
    sep = bpe.encode(";")
    head = [bpe.bos_id] + bpe.encode("Watched:")
    assert list(np.asarray(tokens[0])[np.asarray(valid[0])]) == (
        head + [offset + 5] + sep + [offset + 9] + bpe.encode(". Next:"))
    k, b = 5, 200
    tokens, mask, _ = _sample_slates_jit(c, slate_constraint(c, k), jax.random.key(9), b)
    items, valid = decode_slate_jit(c, tokens, mask, k)
    assert bool(valid.all())
    assert all(len(set(row)) == k for row in np.asarray(items))


# ---------------------------------------------------------------------------------------------
# End to end with the generation loop


@pytest.mark.parametrize("mode", ["text", "item_tokens"])
def test_generate_recommends_valid_distinct_unseen_items(bpe_codec, bpe, mode):
    cfg = _tiny_llama(bpe)
    params = init_params(cfg, jax.random.key(0))
    c = bpe_codec
    if mode == "item_tokens":
        cfg, params, offset = add_item_tokens(cfg, params, c)
        c = item_token_codec(c, offset)
    k, b, h = 3, 8, 6
    hist = jnp.asarray(_histories(c.num_items, b, h, seed=3))
    prompts, valid = render_prompts_jit(c, hist, 48)
    banned = history_mask(c, hist)
    out = generate_jit(cfg, params, prompts, valid, jax.random.key(1), sampler=Temperature(1.0),
                       max_new_tokens=c.slate_len(k),
                       constraint=slate_constraint(c, k, banned, vocab_size=cfg.vocab_size))
    items, ok = decode_slate_jit(c, out.tokens, out.mask, k)
    assert bool(ok.all())
    items = np.asarray(items)
    assert all(len(set(row)) == k for row in items)
    assert not np.asarray(banned)[np.arange(b)[:, None], items].any()
    assert bool((out.tokens[np.arange(b), out.lengths - 1] == bpe.eos_id).all())

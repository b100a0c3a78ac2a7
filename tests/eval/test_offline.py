"""LM item scores for ranking, generative validity and recommend, on a tiny synthetic world."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.codec import build_codec, render_prompts
from jaxrec.data import train_bpe_tokenizer
from jaxrec.eval.offline import (
    _generate_slates,
    generative_validity,
    item_log_probs,
    recommend,
    score_items,
    terminator_of,
)
from jaxrec.models import forward, init_params, llama_config
from jaxrec.sim import make_env

HISTORY = 3

SCORE_ATOL = 1e-4  # item scores of -34..-86 in float32: 13-26 ulps (see below)


@pytest.fixture(scope="module")
def world():
    env, _ = make_env("synthetic", n_items=30, n_topics=3, slate_size=2, history_len=4,
                      history_min=2, seed=0)
    # years make some titles prefixes of others' token blocks less likely; keep plain titles
    tokenizer = train_bpe_tokenizer(env.titles, vocab_size=300)
    codec = build_codec(env.titles, tokenizer)
    prompt_len = codec.prompt_len(HISTORY)
    cfg = llama_config(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_kv_heads=2,
                       d_ff=64, n_layers=2, max_len=prompt_len + codec.slate_len(2),
                       eos_id=codec.eos_id, pad_id=codec.pad_id)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    histories = np.stack([rng.choice(30, HISTORY, replace=False) for _ in range(5)])
    histories[1, 0] = -1  # a shorter history
    return codec, cfg, params, prompt_len, histories.astype(np.int32)


def _reference_score(cfg, params, codec, prompt, valid, item, terminator):
    """log p(block, terminator | prompt) by one plain causal pass over the whole row."""
    n = int(codec.item_len[item])
    seq = [*np.asarray(prompt)[valid], *np.asarray(codec.item_tokens[item])[:n], terminator]
    tokens = jnp.asarray([seq], jnp.int32)
    lp = jax.nn.log_softmax(forward(cfg, params, tokens).logits[0])  # [T, V]
    start = int(valid.sum())
    return float(sum(lp[t - 1, seq[t]] for t in range(start, len(seq))))


def test_item_scores_equal_a_plain_teacher_forced_pass(world):
    codec, cfg, params, prompt_len, histories = world
    term = terminator_of(codec, 2)
    assert term == codec.slate_sep_id and terminator_of(codec, 1) == codec.eos_id
    prompt, valid = render_prompts(codec, jnp.asarray(histories[:2]), prompt_len)
    items = jnp.asarray([[0, 7, 29], [3, 3, 11]], jnp.int32)
    scores = np.asarray(item_log_probs(cfg, params, codec, prompt, valid, term, items))
    for row in range(2):
        v = np.asarray(valid[row])
        for col in range(3):
            ref = _reference_score(cfg, params, codec, prompt[row], v, int(items[row, col]), term)
            assert scores[row, col] == pytest.approx(ref, abs=2e-4)
    assert scores[1, 0] != scores[1, 2] and scores[1, 0] == scores[1, 1]


def test_full_catalogue_scores_are_a_distribution_and_chunking_keeps_them(world):
    codec, cfg, params, prompt_len, histories = world
    full = score_items(cfg, params, codec, histories, prompt_len, 2)
    assert full.shape == (5, 30) and np.isfinite(full).all()
    # the terminator makes blocks prefix-free: probabilities of whole items sum to at most 1
    assert np.all(np.exp(full.astype(np.float64)).sum(axis=1) <= 1.0 + 1e-5)
    # odd chunk sizes pad users and items, and give the same numbers up to the summation
    # order of other batch shapes: an item's score sums 10-15 float32 log-probs to -34..-86,
    # where one ulp is 4-8e-6, so 1e-4 is 13-26 ulps (the nearest two items differ by 0.16)
    odd = score_items(cfg, params, codec, histories, prompt_len, 2, users_per_call=2,
                      items_per_call=7)
    np.testing.assert_allclose(odd, full, rtol=0, atol=SCORE_ATOL)
    # per-user candidate lists pick the same scores as the full catalogue
    cand = np.asarray([[4, 0, 9], [1, 2, 3], [29, 28, 27], [5, 5, 6], [10, 20, 0]], np.int32)
    picked = score_items(cfg, params, codec, histories, prompt_len, 2, items=cand)
    np.testing.assert_allclose(picked, np.take_along_axis(full, cand, axis=1), rtol=0,
                               atol=SCORE_ATOL)


def test_recommend_returns_distinct_unseen_items_best_first(world):
    codec, cfg, params, prompt_len, histories = world
    history = histories[0]
    top = recommend(cfg, params, codec, history, 5, prompt_len, 2)
    items = [i for i, _ in top]
    assert len(items) == 5 == len(set(items)) and not set(items) & set(history.tolist())
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    full = score_items(cfg, params, codec, history[None], prompt_len, 2)[0]
    full[history] = -np.inf
    assert items == list(np.argsort(-full, kind="stable")[:5])


def test_constrained_generation_is_always_valid_free_generation_mostly_not(world):
    codec, cfg, params, prompt_len, histories = world
    key = jax.random.key(0)
    on = generative_validity(cfg, params, codec, histories, prompt_len, 2, key, constrained=True)
    assert on["item_valid_frac"] == 1.0 and on["slate_valid_frac"] == 1.0
    off = generative_validity(cfg, params, codec, histories, prompt_len, 2, key,
                              constrained=False, users_per_call=2)
    # an untrained LM sampling freely over 300 tokens almost never spells a title
    assert off["item_valid_frac"] < 0.5 and off["users"] == 5 and not off["constrained"]
    compiled = _generate_slates._cache_size()
    again = generative_validity(cfg, params, codec, histories, prompt_len, 2, key,
                                constrained=True)
    assert again == on and _generate_slates._cache_size() == compiled  # no recompilation


def test_cutting_left_padding_and_unused_block_columns_changes_no_score(world):
    from jaxrec.eval.offline import _trimmed

    codec, cfg, params, prompt_len, histories = world
    prompt, valid = render_prompts(codec, jnp.asarray(histories), prompt_len)
    cut, cut_valid = _trimmed(prompt, valid, multiple=4)
    assert cut.shape[1] < prompt.shape[1]  # history row 1 is short: there is padding to cut
    assert int(cut_valid.sum()) == int(valid.sum())
    lens = np.asarray(codec.item_len)
    short = np.argsort(lens, kind="stable")[:6]  # the six shortest titles
    items = jnp.asarray(np.broadcast_to(short, (5, 6)), jnp.int32)
    term = terminator_of(codec, 2)
    whole = item_log_probs(cfg, params, codec, prompt, valid, term, items)
    fewer = item_log_probs(cfg, params, codec, cut, cut_valid, term, items,
                           int(lens[short].max()))
    np.testing.assert_allclose(np.asarray(fewer), np.asarray(whole), rtol=0, atol=SCORE_ATOL)

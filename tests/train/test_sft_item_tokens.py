"""SFT with one vocabulary token per item (model.items: tokens): windows of a history are one
sequence, every separator predicts the next item over the catalogue, and the held-out item is
ranked from one forward pass."""

import copy

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.codec import render_prompts
from jaxrec.config import config_from_dict
from jaxrec.eval.offline import next_item_logits, score_items
from jaxrec.models import forward
from jaxrec.train import sft
from jaxrec.train.setup import build_setup

BASE = {
    "sim": {"n_items": 24, "n_topics": 4, "history_len": 6},
    "model": {"d_model": 32, "n_layers": 1, "d_ff": 64, "items": "tokens"},
    "rollout": {"history_items": 5, "slate_size": 2},
    "sft": {"steps": 120, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "eval_every": 60,
            "eval_users": 64, "examples_per_user": 2},
    "checkpoint": {"every": 60, "keep": 2},
}


def _config(*overrides):
    return config_from_dict(copy.deepcopy(BASE), list(overrides))


def _quiet(*args):
    pass


def test_sequence_windows_cover_every_transition_once():
    lengths = [1, 2, 7, 12]
    hist = sft.histories_from_lists([100 * u + np.arange(n) for u, n in enumerate(lengths)])
    windows = sft.sequence_windows(hist, np.arange(4), per_user=10, window=4)
    pairs = []
    for row in windows:
        items = row[row >= 0]
        assert 2 <= len(items) <= 5 and np.all(np.diff(items) == 1)  # one user, in order
        pairs += list(zip(items[:-1], items[1:], strict=True))
    expect = [(100 * u + i, 100 * u + i + 1) for u, n in enumerate(lengths) for i in range(n - 1)]
    assert sorted(pairs) == sorted(expect)  # user 0 (one item) has none
    # at most per_user windows, the most recent ones
    (row,) = sft.sequence_windows(hist, np.asarray([3]), per_user=1, window=4)
    assert row.tolist() == [307, 308, 309, 310, 311]


def test_the_prompt_is_the_sequence_and_the_loss_is_the_catalogue_softmax():
    config = _config()
    setup = build_setup(config)
    codec, model = setup.codec, setup.model
    offset, n = codec.item_token_offset, codec.num_items
    assert offset >= 0 and model.vocab_size == offset + n and codec.block_len == 1
    # [BOS] prefix i_1 ; i_2 ; ... i_n ;  -- the slate separator after every item
    tokens, valid = render_prompts(codec, jnp.asarray([[-1, 3, 5]]), 12)
    real = np.asarray(tokens)[0][np.asarray(valid)[0]]
    head = np.asarray(codec.head_tokens)
    sep = codec.slate_sep_id
    assert real.tolist() == [*head, offset + 3, sep, offset + 5, sep]

    data = sft.build_sft_data(config, setup)
    batch = jax.tree.map(lambda x: x[:6], data.train)
    total, count = sft.sequence_nll(model, codec, setup.params, batch)
    # by hand: at every separator followed by an item, -log softmax over the N item logits
    logits = np.asarray(forward(model, setup.params, batch.tokens, batch.valid).logits)
    toks, ok = np.asarray(batch.tokens), np.asarray(batch.valid)
    want, seen = 0.0, 0
    for b in range(toks.shape[0]):
        for t in range(toks.shape[1] - 1):
            if ok[b, t] and toks[b, t] == sep and offset <= toks[b, t + 1] < offset + n:
                row = logits[b, t, offset:offset + n]
                row = row - row.max()
                want += -(row[toks[b, t + 1] - offset] - np.log(np.exp(row).sum()))
                seen += 1
    assert int(count) == seen > 6
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    loss, _ = sft.sft_loss(setup.params, model, batch, 0.0, codec)
    np.testing.assert_allclose(float(loss), want / seen, rtol=1e-4)


def test_item_scores_are_one_forward_pass_and_rank_the_catalogue():
    config = _config()
    setup = build_setup(config)
    codec, model = setup.codec, setup.model
    hist = np.asarray([[-1, 2, 4, 6, 8], [1, 3, 5, 7, 9], [-1, -1, -1, -1, 11]], np.int32)
    scores = score_items(model, setup.params, codec, hist, setup.spec.prompt_len, 2)
    prompt, valid = render_prompts(codec, jnp.asarray(hist), setup.spec.prompt_len)
    logits = np.asarray(forward(model, setup.params, prompt, valid).logits)[:, -1]
    items = logits[:, codec.item_token_offset:codec.item_token_offset + codec.num_items]
    want = items - np.log(np.exp(items - items.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - items.max(1, keepdims=True)
    np.testing.assert_allclose(scores, want, atol=2e-5)
    np.testing.assert_allclose(np.exp(scores).sum(axis=1), 1.0, rtol=1e-5)
    picked = score_items(model, setup.params, codec, hist, setup.spec.prompt_len, 2,
                         items=np.asarray([[0, 5, 7]] * 3))
    np.testing.assert_array_equal(picked, scores[:, [0, 5, 7]])
    np.testing.assert_allclose(next_item_logits(model, setup.params, codec, prompt, valid),
                               scores, atol=1e-6)


def _successor_histories(setup, n_users, key):
    n, h = setup.env.n_items, setup.config.sim.history_len
    start = np.asarray(jax.random.randint(key, (n_users,), 0, n))
    return sft.histories_from_rows((start[:, None] + np.arange(h)) % n)


def test_item_token_sft_learns_a_predictable_world_and_ranks_by_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "synthetic_histories", _successor_histories)
    summary = sft.run_sft(_config(), tmp_path, log=_quiet)
    assert summary["eval_loss_last"] < 0.3 * summary["eval_loss_first"]
    assert summary["next_item_acc_first"] < 0.2 < 0.9 < summary["next_item_acc_last"]
    lines = [x for x in map(__import__("json").loads,
                            (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "sft/eval_hr@10" in x]
    assert lines[-1]["sft/eval_hr@10"] > 0.95 and lines[-1]["sft/eval_ndcg@10"] > 0.9
    assert lines[0]["sft/eval_hr@10"] < 0.7


def test_item_token_sft_on_movielens_holds_out_the_validation_item(shared_dir):
    """Training windows come from the leave-one-out training split; the held-out example of
    each user is its validation item after its training history."""
    from jaxrec.data import histories, leave_one_out, load_movielens

    config = _config("data.source=movielens-100k", f"data.dir={shared_dir / 'data/movielens'}",
                     "sim.preset=movielens", "sim.history_len=20", "rollout.history_items=20")
    setup = build_setup(config)
    data = sft.build_sft_data(config, setup)
    ratings = load_movielens("movielens-100k", data_dir=shared_dir / "data/movielens")
    split = leave_one_out(ratings)
    train = histories(ratings, split.train)
    val = dict(zip(ratings.user[split.val].tolist(), ratings.item[split.val].tolist(),
                   strict=True))
    assert data.eval.size == len(val) == 943
    users = sorted(val)
    np.testing.assert_array_equal(data.eval.next_item, [val[u] for u in users])
    for row, u in enumerate(users):
        h = np.asarray(data.eval.history[row])
        assert h[h >= 0].tolist() == train[u][-20:].tolist()
    # every training window is a run of some user's training sequence
    offset = setup.codec.item_token_offset
    sequences = {tuple(t.tolist()) for t in train}
    toks = np.asarray(data.train.tokens)
    for row in toks[:: max(1, len(toks) // 50)]:
        items = tuple((row[row >= offset] - offset).tolist())
        assert any(_is_run(items, s) for s in sequences)


def _is_run(items, seq):
    n = len(items)
    return any(seq[i:i + n] == items for i in range(len(seq) - n + 1))


def test_an_exported_template_renders_the_sequence_prompt():
    from jaxrec.train.export import catalogue_entries, prompt_ids

    setup = build_setup(_config())
    template = {**setup.template, "prompt_len": setup.spec.prompt_len}
    items = catalogue_entries(setup)
    assert items[3]["tokens"] == [setup.codec.item_token_offset + 3]
    assert items[3]["text"] == setup.titles[3]
    history = [2, 4, 6]
    ids = prompt_ids(setup.tokenizer.encode, template, items, history,
                     bos_id=setup.tokenizer.bos_id)
    tokens, valid = render_prompts(setup.codec, jnp.asarray([history]), setup.spec.prompt_len)
    assert ids == np.asarray(tokens)[0][np.asarray(valid)[0]].tolist()

"""Prefill + while-loop decoding: greedy agrees with full forwards, EOS, masks, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxrec.generation import (
    Greedy,
    Temperature,
    TopK,
    generate,
    generate_jit,
    left_pad,
    score,
)
from jaxrec.models import init_params, llama_config, logits

CFG = llama_config(vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                   max_len=64, eos_id=2, pad_id=0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _greedy_by_full_forward(params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(logits(CFG, params, jnp.array([seq]))[0, -1])))
    return seq[len(prompt) :]


def test_greedy_matches_full_forward_argmax_on_padded_batch(params):
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 30, 31]]
    tokens, valid = left_pad(prompts)
    out = generate_jit(CFG, params, tokens, valid, jax.random.key(0), sampler=Greedy(),
                       max_new_tokens=7, eos_id=-1)
    for row, prompt in enumerate(prompts):
        assert list(np.asarray(out.tokens[row])) == _greedy_by_full_forward(params, prompt, 7)
    assert bool(out.mask.all()) and list(np.asarray(out.lengths)) == [7, 7, 7]


@struct.dataclass
class ForcedSchedule:
    """A test constraint: at step i each row may emit only schedule[row, i]."""

    schedule: jax.Array  # [B, R] int32
    vocab: int = struct.field(pytree_node=False)

    def init(self, batch):
        return jnp.zeros((), jnp.int32)

    def allowed(self, step):
        want = self.schedule[:, jnp.minimum(step, self.schedule.shape[1] - 1)]
        return jax.nn.one_hot(want, self.vocab, dtype=jnp.bool_)

    def update(self, step, tokens):
        return step + 1


def test_allowed_mask_changes_per_step_and_rows_stop_at_eos(params):
    schedule = jnp.array([[10, 11, 2, 12, 13], [20, 21, 22, 23, 24]], jnp.int32)  # row 0: EOS
    tokens, valid = left_pad([[1, 4], [1, 5, 6]])
    out = generate(CFG, params, tokens, valid, jax.random.key(1), sampler=Temperature(0.7),
                   max_new_tokens=5, constraint=ForcedSchedule(schedule, CFG.vocab_size))
    np.testing.assert_array_equal(out.tokens[0], [10, 11, 2, 0, 0])  # pad after EOS
    np.testing.assert_array_equal(out.mask[0], [True, True, True, False, False])
    np.testing.assert_array_equal(out.tokens[1], [20, 21, 22, 23, 24])
    np.testing.assert_array_equal(out.lengths, [3, 5])
    # A single allowed token has probability 1 under the sampling distribution.
    np.testing.assert_allclose(out.logps, 0.0, atol=1e-6)


def test_loop_ends_early_when_every_row_is_done(params):
    schedule = jnp.array([[2] * 6, [9, 2, 9, 9, 9, 9]], jnp.int32)
    tokens, valid = left_pad([[1], [1, 3]])
    out = generate_jit(CFG, params, tokens, valid, jax.random.key(1), sampler=Greedy(),
                       max_new_tokens=6, constraint=ForcedSchedule(schedule, CFG.vocab_size))
    np.testing.assert_array_equal(out.tokens, [[2, 0, 0, 0, 0, 0], [9, 2, 0, 0, 0, 0]])


@pytest.mark.parametrize("sampler", [Temperature(1.0), Temperature(0.6), TopK(0.9, k=5)])
def test_behaviour_logps_match_teacher_forced_scoring(params, sampler):
    tokens, valid = left_pad([[1, 5, 6], [1, 7], [1, 8, 9, 10]])
    out = generate_jit(CFG, params, tokens, valid, jax.random.key(3), sampler=sampler,
                       max_new_tokens=6)
    if isinstance(sampler, TopK):  # teacher forcing sees the unfiltered distribution
        scores = score(CFG, params, tokens, valid, out.tokens, out.mask, temperature=0.9)
        assert bool(jnp.all(scores.logps <= out.logps + 1e-5))
        return
    scores = score(CFG, params, tokens, valid, out.tokens, out.mask,
                   temperature=sampler.temperature)
    np.testing.assert_allclose(scores.logps, out.logps, atol=2e-5)
    assert bool(jnp.all(scores.entropy[out.mask] > 0))


def test_same_key_same_tokens_and_different_key_different_tokens(params):
    tokens, valid = left_pad([[1, 5]] * 8)
    run = lambda k: generate_jit(CFG, params, tokens, valid, jax.random.key(k),
                                 sampler=Temperature(1.0), max_new_tokens=8, eos_id=-1).tokens
    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))
    # Rows with the same prompt draw different samples (per-row randomness).
    assert len({tuple(r) for r in np.asarray(run(7))}) > 1


def test_one_compilation_per_shape(params):
    tokens, valid = left_pad([[1, 5, 6], [1, 7, 8]])
    run = lambda seed, toks: generate_jit(CFG, params, toks, valid, jax.random.key(seed),
                                          sampler=TopK(0.8, k=3), max_new_tokens=4)
    run(0, tokens)
    compiled = generate_jit._cache_size()
    for seed in range(1, 4):
        run(seed, tokens + seed)  # new keys and new prompt values, same shapes
    assert generate_jit._cache_size() == compiled


def test_left_pad_truncates_from_the_left_and_rejects_empty_prompts():
    tokens, valid = left_pad([[1, 2, 3, 4], [5]], length=3, pad_id=0)
    np.testing.assert_array_equal(tokens, [[2, 3, 4], [0, 0, 5]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


def test_windowed_sequence_scores_equal_the_full_ones_inside_the_window(params):
    from jaxrec.generation import sequence_scores

    tokens = jax.random.randint(jax.random.key(9), (3, 9), 0, CFG.vocab_size)
    valid = jnp.ones((3, 9), bool).at[0, :2].set(False)
    full = sequence_scores(CFG, params, tokens, valid, temperature=0.7)
    win = sequence_scores(CFG, params, tokens, valid, temperature=0.7, window=4)
    np.testing.assert_allclose(win.logps[:, -4:], full.logps[:, -4:], atol=1e-5)
    np.testing.assert_allclose(win.entropy[:, -4:], full.entropy[:, -4:], atol=1e-5)
    assert float(jnp.abs(win.logps[:, :-4]).max()) == 0.0

"""The one RLHF iteration on the synthetic world: rollout -> score -> shape -> GAE -> PPO -> KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.codec import build_codec
from jaxrec.config import PPOConfig
from jaxrec.data import train_bpe_tokenizer
from jaxrec.models import init_params, llama_config
from jaxrec.rollout import RolloutSpec, rollout
from jaxrec.sim import make_env
from jaxrec.train import create_train_state
from jaxrec.train.iteration import build_iteration

USERS = 8
PPO = PPOConfig(epochs=1, minibatches=2, policy_lr=1e-3, value_lr=1e-3, kl_coef=0.1)


@pytest.fixture(scope="module")
def world():
    env, params = make_env("synthetic", n_items=40, n_topics=4, slate_size=2, history_len=4,
                           history_min=2, seed=0)
    tokenizer = train_bpe_tokenizer(env.titles, vocab_size=300)
    codec = build_codec(env.titles, tokenizer)
    spec = RolloutSpec(slate_size=2, prompt_len=codec.prompt_len(2),
                       max_new_tokens=codec.slate_len(2), temperature=1.0)
    cfg = llama_config(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_kv_heads=2,
                       d_ff=64, n_layers=2, max_len=spec.prompt_len + spec.max_new_tokens,
                       eos_id=codec.eos_id, pad_id=codec.pad_id)
    return env, params, codec, spec, cfg


def _start(world, seed=0):
    env, params, _, _, cfg = world
    state = create_train_state(cfg, PPO, init_params(cfg, jax.random.key(seed)))
    _, users = env.reset_batch(jax.random.key(100 + seed), USERS, params)
    return state, users


def test_rollout_names_only_real_unseen_items(world):
    env, params, codec, spec, cfg = world
    state, users = _start(world)
    histories = jax.vmap(env.observation, in_axes=(0, None))(users, params)
    ro, nxt = jax.jit(rollout, static_argnums=(0, 3, 7))(
        cfg, state.policy, codec, env, params, users, jax.random.key(1), spec)
    assert bool(ro.item_valid.all()) and bool(ro.has_eos.all())
    items, hist = np.asarray(ro.items), np.asarray(histories)
    for row in range(USERS):
        assert len(set(items[row])) == 2  # distinct
        assert not set(items[row]) & set(hist[row][hist[row] >= 0])  # not already seen
    assert ro.reward.shape == (USERS,) and np.isfinite(np.asarray(ro.reward)).all()
    # A click adds the clicked item to the user's history (auto-reset users start afresh).
    new_hist = np.asarray(jax.vmap(env.observation, in_axes=(0, None))(nxt, params))
    for row in np.flatnonzero(np.asarray(ro.clicked) & ~np.asarray(ro.done)):
        assert new_hist[row][-1] in items[row]


def test_iteration_runs_compiles_once_and_updates(world):
    env, params, codec, spec, _ = world
    iteration = build_iteration(PPO, spec, env, params, codec)
    state, users = _start(world)
    start_embed = np.asarray(state.policy["embed"]).copy()
    seen = []
    for i in range(3):
        state, users, metrics = iteration(state, users, jax.random.key(i))
        seen.append(metrics)
        if i == 0:
            compiled = iteration._cache_size()
    assert iteration._cache_size() == compiled == 1  # no recompilation after the first
    for m in seen:
        assert float(m["gen/invalid_item_frac"]) == 0.0
        for name in ("reward/mean", "kl/ref", "kl/coef", "ppo/policy_loss", "ppo/value_loss",
                     "ppo/clipfrac", "ppo/approx_kl", "sim/click_rate"):
            assert np.isfinite(float(m[name])), name
    # The first update starts from the rollout's own policy: ratio 1 on the first minibatch,
    # and the reference KL is 0 before any update.
    assert abs(float(seen[0]["kl/ref"])) < 1e-4
    assert float(seen[2]["kl/ref"]) != 0.0
    assert not np.allclose(start_embed, np.asarray(state.policy["embed"]))
    assert int(state.step) == 3 * PPO.epochs * PPO.minibatches


@pytest.mark.parametrize("temperature", [0.5, 0.0])
def test_first_update_starts_at_ratio_one_at_any_sampling_temperature(world, temperature):
    """Behaviour, reference and updated log-probs are all at ppo.temperature (the sampling
    one; for greedy rollouts the one the config names): before any update the ratio is 1."""
    import dataclasses

    env, params, codec, spec, _ = world
    spec = dataclasses.replace(spec, temperature=temperature)
    ppo = PPO.replace(minibatches=1, policy_lr=1e-9, value_lr=1e-9, temperature=0.5)
    state, users = _start(world)
    _, _, m = build_iteration(ppo, spec, env, params, codec)(state, users, jax.random.key(0))
    assert float(m["ppo/ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["ppo/approx_kl"]) < 1e-8 and float(m["ppo/clipfrac"]) == 0.0
    if temperature:
        with pytest.raises(ValueError, match="ppo.temperature=1.0 must equal the rollout's "
                                             "temperature 0.5"):
            build_iteration(PPO, spec, env, params, codec)


def test_iteration_is_pure_under_vmap_over_seeds(world):
    env, params, codec, spec, _ = world
    iteration = build_iteration(PPO, spec, env, params, codec, jit=False)
    states, users = jax.vmap(lambda s: _start(world, s))(jnp.arange(2))
    keys = jax.random.split(jax.random.key(7), 2)
    run = jax.jit(jax.vmap(iteration))
    out_states, _, metrics = run(states, users, keys)
    assert metrics["reward/mean"].shape == (2,)
    # Seed 1 alone gives what the vmapped run gave for seed 1.
    one_state, one_users = _start(world, 1)
    single = build_iteration(PPO, spec, env, params, codec)
    s1, _, m1 = single(one_state, one_users, keys[1])
    np.testing.assert_allclose(out_states.policy["embed"][1], s1.policy["embed"], atol=1e-5)
    assert float(metrics["reward/mean"][1]) == pytest.approx(float(m1["reward/mean"]), abs=1e-6)


def test_teacher_forced_logps_under_the_constraint_equal_the_behaviour_logps(world):
    """Scoring renormalises over the tokens the constraint allowed: the sampled distribution."""
    from jaxrec.generation import sequence_scores

    env, params, codec, spec, cfg = world
    state, users = _start(world)
    ro, _ = jax.jit(rollout, static_argnums=(0, 3, 7))(
        cfg, state.policy, codec, env, params, users, jax.random.key(3), spec)
    tokens = jnp.concatenate([ro.prompt, ro.completion], axis=1)
    valid = jnp.concatenate([ro.prompt_valid, ro.completion_mask], axis=1)
    r = spec.max_new_tokens
    scored = sequence_scores(cfg, state.policy, tokens, valid, temperature=spec.temperature,
                             window=r, allowed=ro.allowed)
    m = np.asarray(ro.completion_mask)
    np.testing.assert_allclose(np.asarray(scored.logps[:, -r:])[m],
                               np.asarray(ro.behaviour_logp)[m], atol=2e-4)
    # Unconstrained scoring of the same tokens gives lower log-probs (mass on masked tokens).
    free = sequence_scores(cfg, state.policy, tokens, valid, temperature=spec.temperature,
                           window=r)
    free_total = float(np.asarray(free.logps[:, -r:])[m].sum())
    assert free_total < float(np.asarray(ro.behaviour_logp)[m].sum())


def test_sampler_log_probs_stand_in_for_the_policy_scoring_pass(world):
    """ppo.old_logp='sampler' takes the decoder's log-probs: the same batch up to rounding."""
    from jaxrec.train.iteration import ScoreSpec, _ppo_batch, session_of

    env, params, codec, spec, cfg = world
    state, users = _start(world)
    ro, _ = jax.jit(rollout, static_argnums=(0, 3, 7))(
        cfg, state.policy, codec, env, params, users, jax.random.key(5), spec)
    score = jax.jit(lambda st, r, c: _ppo_batch(st, session_of(r), spec, ScoreSpec(), c)[0],
                    static_argnums=2)
    batches = {src: score(state, ro, PPO.replace(action_window=spec.max_new_tokens,
                                                 old_logp=src))
               for src in ("rescore", "sampler")}
    rescored, sampled = batches["rescore"], batches["sampler"]
    action = np.asarray(rescored.action_mask)
    assert action.sum() > 0
    np.testing.assert_allclose(np.asarray(sampled.old_logp), np.asarray(rescored.old_logp),
                               atol=2e-4)
    assert np.all(np.asarray(sampled.old_logp)[~action] == 0.0)
    assert not np.array_equal(np.asarray(sampled.old_logp), np.asarray(rescored.old_logp))
    np.testing.assert_array_equal(np.asarray(sampled.old_values), np.asarray(rescored.old_values))
    np.testing.assert_array_equal(np.asarray(sampled.ref_logp), np.asarray(rescored.ref_logp))
    with pytest.raises(ValueError, match="ppo.old_logp='behaviour' is not allowed"):
        PPO.replace(old_logp="behaviour")


def _session_world(world, turns=3):
    import dataclasses

    env, params, codec, spec, cfg = world
    spec = dataclasses.replace(spec, turns=turns)
    return env, params, codec, spec, cfg.replace(max_len=spec.session_len)


def test_a_session_sees_its_updated_history_and_scores_as_it_sampled(world):
    """Three turns in one sequence: a clicked item joins the next turn's prompt (and is banned
    from its slate); teacher-forced log-probs over the whole session equal the behaviour's."""
    from jaxrec.generation import sequence_scores
    from jaxrec.rollout import rollout_session

    env, params, codec, spec, cfg = _session_world(world)
    state = create_train_state(cfg, PPO, init_params(cfg, jax.random.key(0)))
    _, users = env.reset_batch(jax.random.key(100), USERS, params)
    ro, _ = jax.jit(rollout_session, static_argnums=(0, 3, 7))(
        cfg, state.policy, codec, env, params, users, jax.random.key(5), spec)
    p, seg = spec.prompt_len, spec.prompt_len + spec.max_new_tokens
    assert ro.tokens.shape == (USERS, spec.session_len) and ro.reward.shape == (USERS, 3)
    active, clicked, items = (np.asarray(x) for x in (ro.active, ro.clicked, ro.items))
    assert active[:, 0].all() and (active[:, 1:] <= active[:, :-1]).all()
    assert (active[:, 1:] == (active[:, :-1] & ~np.asarray(ro.done)[:, :-1])).all()
    tokens, blocks, lens = np.asarray(ro.tokens), np.asarray(codec.item_tokens), codec.item_len
    f = codec.suffix_tokens.shape[0]
    checked = 0
    for row, t in zip(*np.nonzero(clicked[:, :-1] & active[:, 1:]), strict=True):
        prompt = tokens[row, (t + 1) * seg:(t + 1) * seg + p]
        last_block = [c for c in items[row, t]
                      if (prompt[p - f - int(lens[c]):p - f] == blocks[c, :lens[c]]).all()]
        assert len(last_block) == 1  # the clicked item is the newest in the next prompt
        assert last_block[0] not in items[row, t + 1]  # and banned from the next slate
        checked += 1
    assert checked > 0
    assert not np.asarray(ro.action)[~np.repeat(active, seg, axis=1)].any()
    window = spec.session_len - p
    scored = sequence_scores(cfg, state.policy, ro.tokens, ro.valid,
                             temperature=spec.temperature, window=window, allowed=ro.allowed)
    m = np.asarray(ro.action)[:, -window:]
    np.testing.assert_allclose(np.asarray(scored.logps[:, -window:])[m],
                               np.asarray(ro.behaviour_logp)[:, -window:][m], atol=2e-4)


def test_multi_turn_iteration_runs_and_compiles_once(world):
    env, params, codec, spec, cfg = _session_world(world, turns=2)
    iteration = build_iteration(PPO, spec, env, params, codec)
    state = create_train_state(cfg, PPO, init_params(cfg, jax.random.key(0)))
    _, users = env.reset_batch(jax.random.key(100), USERS, params)
    for i in range(2):
        state, users, metrics = iteration(state, users, jax.random.key(i))
    assert iteration._cache_size() == 1
    turns = float(metrics["sim/turns_mean"])
    assert turns >= 1.0 and turns <= 2.0
    assert float(metrics["gen/invalid_item_frac"]) == 0.0
    for name in ("reward/mean", "reward/session_return", "kl/ref", "ppo/policy_loss",
                 "ppo/value_loss"):
        assert np.isfinite(float(metrics[name])), name
    assert int(state.step) == 2 * PPO.epochs * PPO.minibatches

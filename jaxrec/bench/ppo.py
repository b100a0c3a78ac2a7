"""`jaxrec bench ppo`: seconds per full RLHF iteration, split into generate / score / update.

The "small" spec: GPT-2 family, 4 layers, 4 heads, d_model 256, vocab 4096; a rollout batch of
64 simulated users (the synthetic world), prompts of 64 tokens, responses of 32 tokens
(catalogue-constrained slates), 4 epochs x 4 minibatches, a policy and a separate value network.
`sec_per_iter` times the fused, jitted iteration; the three parts are timed as separate jits of
the same functions (so they add up to a little more). One JSON line per dtype and source of
the behaviour log-probs (`old_logp`: 'sampler', the decoder's own, or 'rescore', a
teacher-forced pass of the policy as TRL does).
"""

from __future__ import annotations

import itertools
import json

import jax

from jaxrec.bench.timing import median_seconds
from jaxrec.codec import build_codec
from jaxrec.config import PPOConfig, gpt2_config
from jaxrec.data import train_bpe_tokenizer
from jaxrec.hardware import describe
from jaxrec.models import init_params
from jaxrec.rollout import RolloutSpec, rollout
from jaxrec.sim import make_env
from jaxrec.train import create_train_state, ppo_step
from jaxrec.train.iteration import ScoreSpec, _ppo_batch, build_iteration, session_of

SMALL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, d_ff=1024)


def _world(users, prompt_len, response_len, seed):
    env, params = make_env("synthetic", n_items=500, n_topics=10, history_len=16, history_min=12,
                           slate_size=1, seed=seed)
    tokenizer = train_bpe_tokenizer(env.titles, vocab_size=1024)
    codec = build_codec(env.titles, tokenizer)
    slate = max(1, response_len // (codec.block_len + 1))
    env, params = make_env("synthetic", n_items=500, n_topics=10, history_len=16, history_min=12,
                           slate_size=slate, seed=seed)
    spec = RolloutSpec(slate_size=slate, prompt_len=prompt_len, max_new_tokens=response_len)
    _, users_state = env.reset_batch(jax.random.key(seed + 1), users, params)
    return env, params, codec, spec, users_state


def _time_one(dtype, env, params, codec, spec, users_state, config, repeats, seed) -> dict:
    model = gpt2_config(**SMALL, max_len=spec.prompt_len + spec.max_new_tokens, dtype=dtype,
                        eos_id=codec.eos_id, pad_id=codec.pad_id)
    state = create_train_state(model, config, init_params(model, jax.random.key(0)))
    key = jax.random.key(seed)
    roll = jax.jit(lambda st, us, k: rollout(st.model, st.policy_params(), codec, env, params,
                                             us, k, spec))
    score = jax.jit(lambda st, ro: _ppo_batch(st, session_of(ro), spec, ScoreSpec(), config))
    update = jax.jit(ppo_step, static_argnums=3)
    ro, _ = roll(state, users_state, key)
    batch, _ = score(state, ro)
    fused = jax.jit(build_iteration(config, spec, env, params, codec, jit=False))
    return {
        # the fused iteration is not donated here: the same inputs are timed repeatedly
        "sec_per_iter": median_seconds(
            lambda: jax.block_until_ready(fused(state, users_state, key)), repeats),
        "generate_sec": median_seconds(
            lambda: jax.block_until_ready(roll(state, users_state, key)), repeats),
        "score_sec": median_seconds(lambda: jax.block_until_ready(score(state, ro)), repeats),
        "update_sec": median_seconds(
            lambda: jax.block_until_ready(update(state, batch, key, config)), repeats),
    }


def run(dtypes=("float32", "bfloat16"), users=64, prompt_len=64, response_len=32, epochs=4,
        minibatches=4, repeats=3, seed=0, old_logp=("sampler", "rescore"),
        print_fn=print) -> list[dict]:
    env, params, codec, spec, users_state = _world(users, prompt_len, response_len, seed)
    rows = []
    for dtype, source in itertools.product(dtypes, old_logp):
        config = PPOConfig(epochs=epochs, minibatches=minibatches, policy_lr=1e-5,
                           value_lr=1e-5, action_window=response_len, old_logp=source)
        row = {
            "bench": "ppo",
            "spec": "small",
            "dtype": dtype,
            "old_logp": source,
            "users": users,
            "prompt_len": prompt_len,
            "response_len": response_len,
            "slate_size": spec.slate_size,
            "epochs": epochs,
            "minibatches": minibatches,
            **_time_one(dtype, env, params, codec, spec, users_state, config, repeats, seed),
            **describe(),
        }
        rows.append(row)
        print_fn(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v
                             for k, v in row.items()}))
    return rows

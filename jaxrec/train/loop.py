"""The host loop of the PPO stage: build the world and the policy, iterate, log, checkpoint.

The loop only does I/O: every iteration is one call of the jitted `build_iteration` function.
The key of iteration i is `fold_in(key(seed), i)`, and the whole state (params, optimizer
states, KL controller, users, key) is checkpointed, so a run killed at any point and started
again with the same command continues exactly where its last checkpoint left it.

Work dir layout: DIR/config.yaml (the resolved config), DIR/checkpoints/ppo/<iteration>,
DIR/metrics.jsonl (one line per iteration with `stage` and `step`), DIR/tb/ (TensorBoard),
DIR/plots/*.png, DIR/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxrec.checkpoint import Checkpointer
from jaxrec.config import Config, dump_config
from jaxrec.rollout import rollout
from jaxrec.train.distributed import is_primary, primary_log
from jaxrec.train.iteration import build_iteration, score_spec
from jaxrec.train.placement import Placement
from jaxrec.train.report import TensorBoard, write_plots
from jaxrec.train.setup import build_setup
from jaxrec.train.stages import metrics_before, metrics_writer, stop_requests, write_config
from jaxrec.train.state import create_train_state


class PPORun:
    """Everything the PPO stage needs, built once from a Config."""

    def __init__(self, config: Config, params=None, reward_model=None):
        """`params`: the policy to start from (e.g. the SFT stage's), instead of model.init;
        `reward_model`: used by PPO's reward when reward.ppo_source is 'model' or 'mix'."""
        self.config = config
        setup = build_setup(config)
        self.setup = setup
        self.env, self.env_params, self.titles = setup.env, setup.env_params, setup.titles
        self.tokenizer, self.codec, self.spec = setup.tokenizer, setup.codec, setup.spec
        self.model = setup.model
        r = config.rollout
        self.ppo = config.ppo if r.temperature == 0 else config.ppo.replace(
            temperature=r.temperature)
        self.params = setup.params if params is None else params
        # the reward model travels in the state (frozen["reward"]), not baked into the program
        self.reward_model = reward_model if config.reward.ppo_source != "simulator" else None
        self.ptx = None  # PPO-ptx draws from the SFT stage's training examples
        if config.ppo.ptx_coef > 0:
            from jaxrec.train.sft import build_sft_data, ptx_rows

            self.ptx = ptx_rows(build_sft_data(config, setup).train, self.codec)
        self.placement = Placement(config, self.model, r.users, "rollout.users")
        self.mesh = self.placement.mesh
        if self.mesh is not None:
            self._build_sharded(reward_model)
        else:
            self.iteration = build_iteration(self.ppo, self.spec, self.env, self.env_params,
                                             self.codec, score_spec(self.ppo),
                                             **_reward_options(config, reward_model))

    def _build_sharded(self, reward_model):
        """The iteration jitted over the configured mesh: sharding only at the jit boundary
        (state by the logical-axis rules, users' rows over data x fsdp); GSPMD partitions the
        rollout, scoring and update inside, with the same global semantics as one device."""
        from jaxrec.train.mesh import named, row_shardings, state_specs

        raw = build_iteration(self.ppo, self.spec, self.env, self.env_params, self.codec,
                              score_spec(self.ppo), jit=False,
                              **_reward_options(self.config, reward_model))
        state, users, _ = jax.eval_shape(self._initial_unsharded, self.params,
                                         self.reward_model)
        # metrics (and the key) whole on every device, so every host can read them
        whole = self.placement.replicated
        self._shardings = (named(self.mesh, state_specs(state)), row_shardings(self.mesh, users),
                           whole)
        self.iteration = jax.jit(raw, in_shardings=self._shardings,
                                 out_shardings=self._shardings, donate_argnums=(0, 1))

    def _greedy_rollout(self, policy_params, users):
        if not hasattr(self, "_greedy"):  # one greedy turn per user (the first of a session)
            spec = dataclasses.replace(self.spec, temperature=0.0, turns=1)
            self._greedy = self.placement.jit_whole(lambda p, us, k: rollout(
                self.model, p, self.codec, self.env, self.env_params, us, k, spec)[0])
        if not hasattr(self, "_greedy_key"):  # made once (placed on the mesh when there is one)
            self._greedy_key = self.placement.whole(lambda: jax.random.key(0))
        return self._greedy(policy_params, users, self._greedy_key)

    def _users(self, salt: int, n: int):
        """A fixed draw of n simulated users, apart from the training users (salt 1 << 20)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), salt)
        draw = lambda: self.env.reset_batch(key, n, self.env_params)[1]
        return self.placement.jit_whole(draw)()

    def evaluate(self, policy_params) -> dict[str, float]:
        """Greedy slates for `monitor.eval_users` held-out users: mean simulator reward, click
        rate and invalid-item fraction (a pure function of the params: resuming repeats it)."""
        if not hasattr(self, "_eval_users"):
            self._eval_users = self._users(3 << 20, self.config.monitor.eval_users)
        ro = self._greedy_rollout(policy_params, self._eval_users)
        f32 = lambda x: float(np.mean(np.asarray(x, np.float32)))
        return {"eval/reward_mean": f32(ro.reward), "eval/click_rate": f32(ro.clicked),
                "eval/invalid_item_frac": f32(~np.asarray(ro.item_valid))}

    def recommend(self, policy_params, n_users: int | None = None) -> list[dict]:
        """Greedy slates for a few fixed users (the same ones every call), as titles."""
        n_users = n_users or self.config.monitor.sample_users
        if getattr(self, "_fixed_users_n", None) != n_users:
            self._fixed_users = self._users(2 << 20, n_users)
            self._fixed_users_n = n_users
        ro = self._greedy_rollout(policy_params, self._fixed_users)
        histories = np.asarray(jax.vmap(self.env.observation, in_axes=(0, None))(
            self._fixed_users, self.env_params))
        title = lambda i: self.titles[int(i)] if i >= 0 else "(invalid)"
        return [
            {"history": [title(i) for i in h[h >= 0][-4:]],
             "recommended": [title(i) for i in np.asarray(ro.items[u])]}
            for u, h in enumerate(histories)
        ]

    def _initial_unsharded(self, params, reward_model):
        key = jax.random.key(self.config.seed)
        lora = self.config.lora if self.config.lora.rank else None
        frozen_dtype = self.config.model.frozen_dtype
        state = create_train_state(self.model, self.ppo, params, adapters=lora,
                                   key=jax.random.fold_in(key, 2 << 20),
                                   frozen_dtype=frozen_dtype)
        if reward_model is not None:
            from jaxrec.train.reward_model import with_reward_model

            state = with_reward_model(state, reward_model, frozen_dtype)
        if self.ptx is not None:
            state = state.replace(frozen={**state.frozen, "ptx": jax.tree.map(jnp.copy,
                                                                               self.ptx)})
        _, users = self.env.reset_batch(jax.random.fold_in(key, 1 << 20),
                                        self.config.rollout.users, self.env_params)
        return state, users, key

    def initial(self):
        """(state, users, key) at iteration 0. With a mesh, one jitted init writes each array
        straight into its shards (on several hosts, each computes and holds only its own)."""
        if self.mesh is None:  # committed, as the iteration's outputs are (see Placement)
            return self.placement.commit(self._initial_unsharded(self.params, self.reward_model))
        return self.placement.from_host(self._initial_unsharded, self._shardings, self.params,
                                        self.reward_model)


def _reward_options(config: Config, reward_model) -> dict:
    if reward_model is None:
        if config.reward.ppo_source != "simulator":
            raise ValueError(f"reward.ppo_source={config.reward.ppo_source!r} needs a trained "
                             "reward model (the reward stage)")
        return {}
    return {"reward_model": reward_model, "reward_source": config.reward.ppo_source,
            "reward_mix": config.reward.mix}


class Iteration:
    """`make_iteration(config)`: the compiled RLHF iteration of a run, plus its starting point.

        iteration = make_iteration(config)
        state, sim_state, key = iteration.initial()
        state, sim_state, metrics = iteration(state, sim_state, jax.random.fold_in(key, 0))
    """

    def __init__(self, config: Config):
        self.run = PPORun(config)
        self.jitted = self.run.iteration

    def __call__(self, state, sim_state, key):
        return self.jitted(state, sim_state, key)

    def initial(self):
        return self.run.initial()


def make_iteration(config: Config) -> Iteration:
    """The pure iteration for a Config (state and user states donated; see build_iteration)."""
    return Iteration(config)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_ppo(config: Config, workdir: str | pathlib.Path, log=print, *, params=None,
            reward_model=None, profile: bool = False) -> dict[str, Any]:
    """Run (or resume) the PPO stage in `workdir`; returns the summary.

    `params`: the policy to start from (the SFT stage's), else model.init or fresh weights; the
    reference is this starting policy. `profile`: write a JAX profiler trace of iterations
    2-4 of this invocation (after compilation) to DIR/profile/ (TensorBoard's profile plugin or
    Perfetto read it). `reward_model`: the trained reward model PPO's reward uses
    (reward.ppo_source 'model' or 'mix').
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log, primary = primary_log(log), is_primary()  # several hosts: process 0 writes the files
    resolved = dump_config(config)

    run = PPORun(config, params, reward_model)
    state, users, key = run.initial()
    ckpt = Checkpointer(workdir / "checkpoints" / "ppo", keep=config.checkpoint.keep)
    best_ckpt = Checkpointer(workdir / "checkpoints" / "ppo_best", keep=1)
    start, best = 0, None
    if ckpt.latest_step() is not None:
        state, users, key, record = ckpt.restore(None, state, users, key)
        start, best = int(record["iteration"]), record.get("best")
        log(f"resuming the ppo stage at iteration {start} from {ckpt.directory}")
    write_config(config, workdir, log)  # the checkpoint fits this config
    monitor = config.monitor
    tracing = False

    metrics_path = workdir / "metrics.jsonl"
    kept = metrics_before(metrics_path, "ppo", start)
    own = [x for x in kept if x.get("stage") == "ppo"]  # other stages' lines are kept too
    first_reward = own[0]["reward/mean"] if own else None
    rewards = [x["reward/mean"] for x in own]  # every iteration's, for the windowed means
    tokens_per_iter = config.rollout.users * run.spec.max_new_tokens * run.spec.turns
    board = TensorBoard(workdir, enabled=primary)
    bar = tqdm.tqdm(total=config.ppo.iterations, initial=start, desc="ppo", unit="it",
                    disable=not (primary and sys.stderr.isatty()))
    interrupted = None
    try:
        with stop_requests() as stop, metrics_writer(metrics_path, primary) as out:
            for line in kept:
                out.write(json.dumps(line) + "\n")
            last = own[-1] if own else {}
            bad = 0
            for i in range(start, config.ppo.iterations):
                if profile and i == start + 1:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    tracing = True
                tick = time.perf_counter()
                state, users, metrics = run.iteration(state, users, jax.random.fold_in(key, i))
                line = {"stage": "ppo", "step": i + 1, **_scalars(metrics)}
                line["perf/sec_per_iter"] = time.perf_counter() - tick
                line["perf/tokens_per_s"] = tokens_per_iter / line["perf/sec_per_iter"]
                if tracing and (i == start + 3 or i + 1 == config.ppo.iterations):
                    jax.profiler.stop_trace()
                    tracing = False
                    log(f"profiler trace of iterations {start + 2}-{i + 1} in "
                        f"{workdir / 'profile'}")
                final = i + 1 == config.ppo.iterations
                if monitor.eval_every and ((i + 1) % monitor.eval_every == 0 or final):
                    line.update(run.evaluate(state.policy_params()))
                    if best is None or line["eval/reward_mean"] > best["eval_reward"]:
                        best = {"iteration": i + 1, "eval_reward": line["eval/reward_mean"]}
                        best_ckpt.save(i + 1, state, users, key,
                                       {"iteration": i + 1, "best": best, "config": resolved})
                        line["eval/best"] = 1.0
                out.write(json.dumps(line) + "\n")
                out.flush()
                board.write(line)
                bad = bad + 1 if line["ppo/skipped"] == 1.0 else 0
                if bad >= config.ppo.max_bad_iterations:
                    raise FloatingPointError(
                        f"ppo: {bad} consecutive iterations had only non-finite gradients "
                        f"(iteration {i + 1}); stopping without checkpointing them"
                    )
                first_reward = line["reward/mean"] if first_reward is None else first_reward
                rewards.append(line["reward/mean"])
                last = line
                if bar.disable:  # no terminal: one log line per iteration instead of the bar
                    log(f"ppo {i + 1}/{config.ppo.iterations}  reward {line['reward/mean']:.3f}  "
                        f"kl {line['kl/ref']:.4f}  beta {line['kl/coef']:.4f}  "
                        f"invalid {line['gen/invalid_item_frac']:.2f}")
                bar.set_postfix(reward=f"{line['reward/mean']:.3f}", kl=f"{line['kl/ref']:.3f}",
                                refresh=False)
                bar.update(1)
                if "eval/reward_mean" in line:
                    log(f"ppo {i + 1}: held-out reward {line['eval/reward_mean']:.3f} (best "
                        f"{best['eval_reward']:.3f} at iteration {best['iteration']})")
                if monitor.sample_every and (i + 1) % monitor.sample_every == 0 and not final:
                    _log_samples(run.recommend(state.policy_params()),
                                 f"ppo {i + 1}: greedy slates", log)
                if (i + 1) % config.checkpoint.every == 0 or final or stop["signal"] is not None:
                    ckpt.save(i + 1, state, users, key,
                              {"iteration": i + 1, "best": best, "config": resolved})
                if stop["signal"] is not None and not final:
                    interrupted = signal.Signals(stop["signal"]).name
                    log(f"{interrupted}: saved iteration {i + 1}; rerun the command to resume")
                    break
    finally:  # also on an error: no writer threads or async savers left behind
        if tracing:  # the loop ended (signal or error) inside the traced iterations
            jax.profiler.stop_trace()
        bar.close()
        for manager in (ckpt, best_ckpt):
            manager.wait()
            manager.close()
        board.close()
    if primary:
        write_plots(workdir, "ppo")
    before, after = run.recommend(state.ref_params), run.recommend(state.policy_params())
    samples = [{**b, "recommended_before": b["recommended"], "recommended_after": a["recommended"]}
               for b, a in zip(before, after, strict=True)]
    for s in samples:
        del s["recommended"]
    window = min(10, max(1, len(rewards) // 4))
    summary = {
        "stage": "ppo",
        "interrupted": interrupted,
        "samples": samples,
        "iterations": config.ppo.iterations,
        "reward_first": first_reward,
        "reward_last": last.get("reward/mean"),
        # one iteration's mean reward is noisy: also the means of the first and last windows
        "reward_window": window,
        "reward_first_window": float(np.mean(rewards[:window])) if rewards else None,
        "reward_last_window": float(np.mean(rewards[-window:])) if rewards else None,
        "kl_last": last.get("kl/ref"),
        "invalid_item_frac_last": last.get("gen/invalid_item_frac"),
        "best": best,  # {"iteration", "eval_reward"}: checkpoints/ppo_best holds that policy
    }
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, log)
    return summary


def _print_summary(summary: dict, log) -> None:
    """The one-screen end-of-run summary."""
    n = summary["reward_window"]
    log(f"ppo: mean reward {summary['reward_first_window']:.3f} (first {n} iterations) -> "
        f"{summary['reward_last_window']:.3f} (last {n}), KL to the reference "
        f"{summary['kl_last']:.3f}")
    for n, s in enumerate(summary["samples"], 1):
        log(f"user {n}: watched {'; '.join(s['history'])}")
        log(f"  before: {'; '.join(s['recommended_before'])}")
        log(f"  after:  {'; '.join(s['recommended_after'])}")


def _log_samples(samples: list[dict], title: str, log) -> None:
    log(title)
    for n, s in enumerate(samples, 1):
        log(f"  user {n}: watched {'; '.join(s['history'])} -> {'; '.join(s['recommended'])}")

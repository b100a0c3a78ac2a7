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

import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm

from jaxrec.checkpoint import Checkpointer
from jaxrec.codec import build_codec
from jaxrec.config import Config, dump_config
from jaxrec.data import load_tokenizer, train_bpe_tokenizer
from jaxrec.models import gpt2_config, init_params, llama_config, load_pretrained
from jaxrec.rollout import RolloutSpec, rollout
from jaxrec.sim import make_env
from jaxrec.train.iteration import build_iteration
from jaxrec.train.report import TensorBoard, write_plots
from jaxrec.train.state import create_train_state


def build_world(config: Config):
    """(env, env_params, titles, years) for the configured simulator."""
    sim, data = config.sim, config.data
    if sim.preset == "movielens":
        if data.source == "synthetic":
            raise ValueError("sim.preset='movielens' needs data.source='movielens-...' (and "
                             "data.dir for raw files or data.tfds_dir for tensorflow-datasets)")
        return _movielens_world(config)
    if sim.preset != "synthetic" or data.source != "synthetic":
        raise ValueError(
            f"sim.preset={sim.preset!r} with data.source={data.source!r}: the PPO stage runs "
            "'synthetic' with 'synthetic', or 'movielens' with a MovieLens source"
        )
    env, params = make_env(
        "synthetic", n_items=config.sim.n_items, n_topics=config.sim.n_topics,
        slate_size=config.rollout.slate_size, history_len=config.sim.history_len,
        reward=config.sim.reward, seed=config.sim.world_seed,
    )
    return env, params, list(env.titles), None


def _movielens_world(config: Config):
    """Users calibrated to the chronological training split of a MovieLens release."""
    from jaxrec.data import leave_one_out, load_movielens

    data = config.data
    ratings = load_movielens(data.source, data_dir=data.dir, tfds_dir=data.tfds_dir,
                             lenient=data.lenient)
    train = leave_one_out(ratings).train
    items = ratings.items
    env, params = make_env(
        "movielens", users=ratings.user[train], items=ratings.item[train],
        ratings=ratings.rating[train], timestamps=ratings.timestamp[train],
        n_users=len(ratings.user_ids), n_items=len(items.ids), genres=items.genres,
        titles=[str(t) for t in items.clean_title], slate_size=config.rollout.slate_size,
        history_len=config.sim.history_len, reward=config.sim.reward,
        seed=config.sim.world_seed,
    )
    years = [int(y) if y > 0 else None for y in items.year]
    return env, params, [str(t) for t in items.clean_title], years


def build_tokenizer(config: Config, titles: list[str]):
    """The policy checkpoint's tokenizer, or a byte-level BPE trained on the titles."""
    init = config.model.init
    if init is None:  # a small byte-level BPE of the catalogue's own titles
        return train_bpe_tokenizer(titles, vocab_size=min(max(320, 256 + 3 + len(titles)), 4096))
    path = pathlib.Path(init)
    if path.is_dir():
        return load_tokenizer(path)
    for candidate in [path.parent / "tokenizer.bin", *sorted(path.parent.glob("tok*.bin"))]:
        if candidate.is_file() and candidate != path:
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"model.init={init}: no tokenizer beside it")


def build_policy(config: Config, tokenizer, max_len: int):
    """(ModelConfig, params): the checkpoint, or a fresh model sized to the tokenizer."""
    m = config.model
    if m.init is not None:
        cfg, params = load_pretrained(m.init)
        if cfg.max_len < max_len:
            raise ValueError(f"model.init={m.init} holds {cfg.max_len} positions; rollouts need "
                             f"{max_len} (prompt + completion)")
        cfg = cfg.replace(dtype=m.dtype, cache_dtype=m.cache_dtype, remat=m.remat)
        return cfg, jax.tree.map(np.asarray, params)
    make = gpt2_config if m.family == "gpt2" else llama_config
    shape = dict(vocab_size=tokenizer.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                 n_heads=m.n_heads, d_ff=m.d_ff, max_len=max_len, dtype=m.dtype,
                 cache_dtype=m.cache_dtype, remat=m.remat, bos_id=max(tokenizer.bos_id, -1),
                 eos_id=tokenizer.eos_id, pad_id=max(tokenizer.pad_id, 0))
    if m.family == "llama":
        shape["n_kv_heads"] = m.n_kv_heads
    cfg = make(**shape)
    return cfg, init_params(cfg, jax.random.key(config.seed))


def _codec(titles, tokenizer, years, item_prefix):
    """The codec with the first slate separator this tokenizer encodes as one token."""
    error = None
    for separator in (";", "\n", ",", "|", "and"):  # " and": SentencePiece vocabularies
        try:
            return build_codec(titles, tokenizer, years=years, item_prefix=item_prefix,
                               slate_separator=separator)
        except ValueError as err:  # e.g. a SentencePiece prefix space makes ";" two tokens
            error = err
    raise ValueError(f"no slate separator fits this tokenizer: {error}")


class PPORun:
    """Everything the PPO stage needs, built once from a Config."""

    def __init__(self, config: Config):
        self.config = config
        self.env, self.env_params, self.titles, years = build_world(config)
        self.tokenizer = build_tokenizer(config, self.titles)
        item_prefix = "" if type(self.tokenizer).__name__ == "Llama2cTokenizer" else " "
        self.codec = _codec(self.titles, self.tokenizer, years, item_prefix)
        r = config.rollout
        self.spec = RolloutSpec(
            slate_size=r.slate_size, prompt_len=self.codec.prompt_len(r.history_items),
            max_new_tokens=self.codec.slate_len(r.slate_size), temperature=r.temperature,
            constrained=r.constrained, ban_history=r.ban_history,
        )
        max_len = self.spec.prompt_len + self.spec.max_new_tokens
        self.model, params = build_policy(config, self.tokenizer, max_len)
        self.ppo = config.ppo if r.temperature == 0 else config.ppo.replace(
            temperature=r.temperature)
        self.params = params
        self.iteration = build_iteration(self.ppo, self.spec, self.env, self.env_params,
                                         self.codec)

    def recommend(self, policy_params, n_users: int = 3) -> list[dict]:
        """Greedy slates for `n_users` fixed users (the same ones every call), as titles."""
        if not hasattr(self, "_greedy"):
            spec = dataclasses.replace(self.spec, temperature=0.0)
            self._greedy = jax.jit(lambda p, us, k: rollout(
                self.model, p, self.codec, self.env, self.env_params, us, k, spec)[0])
            key = jax.random.fold_in(jax.random.key(self.config.seed), 2 << 20)
            _, self._fixed_users = self.env.reset_batch(key, n_users, self.env_params)
        ro = self._greedy(policy_params, self._fixed_users, jax.random.key(0))
        histories = np.asarray(jax.vmap(self.env.observation, in_axes=(0, None))(
            self._fixed_users, self.env_params))
        title = lambda i: self.titles[int(i)] if i >= 0 else "(invalid)"
        return [
            {"history": [title(i) for i in h[h >= 0][-4:]],
             "recommended": [title(i) for i in np.asarray(ro.items[u])]}
            for u, h in enumerate(histories)
        ]

    def initial(self):
        """(state, users, key) at iteration 0."""
        key = jax.random.key(self.config.seed)
        state = create_train_state(self.model, self.ppo, self.params)
        _, users = self.env.reset_batch(jax.random.fold_in(key, 1 << 20),
                                        self.config.rollout.users, self.env_params)
        return state, users, key


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


@contextlib.contextmanager
def _stop_requests():
    """Turns SIGTERM / SIGINT into a flag the loop checks after each iteration (so the run
    saves a checkpoint and stops cleanly); handlers are restored afterwards."""
    requested: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_ppo(config: Config, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    """Run (or resume) the PPO stage in `workdir`; returns the summary."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = dump_config(config)
    config_path = workdir / "config.yaml"
    if config_path.exists() and config_path.read_text() != resolved:
        log(f"note: {config_path} differs from this run's config; it is replaced")
    config_path.write_text(resolved)

    run = PPORun(config)
    state, users, key = run.initial()
    ckpt = Checkpointer(workdir / "checkpoints" / "ppo", keep=config.checkpoint.keep)
    start = 0
    if ckpt.latest_step() is not None:
        state, users, key, record = ckpt.restore(None, state, users, key)
        start = int(record["iteration"])
        log(f"resuming the ppo stage at iteration {start} from {ckpt.directory}")

    metrics_path = workdir / "metrics.jsonl"
    kept = _metrics_before(metrics_path, start)
    first_reward = kept[0]["reward/mean"] if kept else None
    tokens_per_iter = config.rollout.users * run.spec.max_new_tokens
    board = TensorBoard(workdir)
    bar = tqdm.tqdm(total=config.ppo.iterations, initial=start, desc="ppo", unit="it",
                    disable=not sys.stderr.isatty())
    interrupted = None
    with _stop_requests() as stop, metrics_path.open("w") as out:
        for line in kept:
            out.write(json.dumps(line) + "\n")
        last = kept[-1] if kept else {}
        bad = 0
        for i in range(start, config.ppo.iterations):
            tick = time.perf_counter()
            state, users, metrics = run.iteration(state, users, jax.random.fold_in(key, i))
            line = {"stage": "ppo", "step": i + 1, **_scalars(metrics)}
            line["perf/sec_per_iter"] = time.perf_counter() - tick
            line["perf/tokens_per_s"] = tokens_per_iter / line["perf/sec_per_iter"]
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
            last = line
            if bar.disable:  # no terminal: one log line per iteration instead of the bar
                log(f"ppo {i + 1}/{config.ppo.iterations}  reward {line['reward/mean']:.3f}  "
                    f"kl {line['kl/ref']:.4f}  beta {line['kl/coef']:.4f}  "
                    f"invalid {line['gen/invalid_item_frac']:.2f}")
            bar.set_postfix(reward=f"{line['reward/mean']:.3f}", kl=f"{line['kl/ref']:.3f}",
                            refresh=False)
            bar.update(1)
            final = i + 1 == config.ppo.iterations
            if (i + 1) % config.checkpoint.every == 0 or final or stop["signal"] is not None:
                ckpt.save(i + 1, state, users, key, {"iteration": i + 1, "config": resolved})
            if stop["signal"] is not None and not final:
                interrupted = signal.Signals(stop["signal"]).name
                log(f"{interrupted}: saved iteration {i + 1}; rerun the command to resume")
                break
    bar.close()
    ckpt.wait()
    ckpt.close()
    board.close()
    write_plots(workdir, "ppo")
    before, after = run.recommend(state.frozen["ref"]), run.recommend(state.policy)
    samples = [{**b, "recommended_before": b["recommended"], "recommended_after": a["recommended"]}
               for b, a in zip(before, after, strict=True)]
    for s in samples:
        del s["recommended"]
    summary = {
        "stage": "ppo",
        "interrupted": interrupted,
        "samples": samples,
        "iterations": config.ppo.iterations,
        "reward_first": first_reward,
        "reward_last": last.get("reward/mean"),
        "kl_last": last.get("kl/ref"),
        "invalid_item_frac_last": last.get("gen/invalid_item_frac"),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, log)
    return summary


def _print_summary(summary: dict, log) -> None:
    """The one-screen end-of-run summary."""
    log(f"ppo: reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f} "
        f"(first and last iteration), KL to the reference {summary['kl_last']:.3f}")
    for n, s in enumerate(summary["samples"], 1):
        log(f"user {n}: watched {'; '.join(s['history'])}")
        log(f"  before: {'; '.join(s['recommended_before'])}")
        log(f"  after:  {'; '.join(s['recommended_after'])}")


def _metrics_before(path: pathlib.Path, iteration: int) -> list[dict]:
    """Metric lines of iterations <= `iteration` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("stage") != "ppo" or x["step"] <= iteration]

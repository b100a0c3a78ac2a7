"""The `jaxrec` command line. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _local_path(flag: str, value: str) -> str:
    """value, unless it is a URL: the commands write and read local (or mounted) paths."""
    if "://" in value:
        raise CliError(f"{flag} {value}: a URL; give a local or mounted path (mount a bucket "
                       "with gcsfuse, e.g. /mnt/bucket/run, for a slice's hosts to share)")
    return value


def _find_tokenizer(model_path: pathlib.Path, vocab_size: int | None = None) -> pathlib.Path:
    """The tokenizer that sits beside a model: the HF folder itself, or a llama2.c tok*.bin
    (tok{vocab_size}.bin first when the model's vocabulary size is known: llama2.c's naming)."""
    if model_path.is_dir():
        return model_path
    candidates = [model_path.parent / f"tok{vocab_size}.bin"] if vocab_size else []
    candidates.append(model_path.parent / "tokenizer.bin")
    candidates += sorted(p for p in model_path.parent.glob("tok*.bin") if p != model_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CliError(f"no tokenizer found beside {model_path}; pass --tokenizer PATH")


def cmd_generate(args: argparse.Namespace) -> int:
    import jax

    from jaxrec.data import load_tokenizer
    from jaxrec.generation import generate_jit, left_pad, make_sampler
    from jaxrec.models import load_pretrained

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top-p {args.top_p} must be in (0, 1] (1: off)")
    if args.top_k < 0:
        raise CliError(f"--top-k {args.top_k} must be >= 0 (0: off)")
    model_path = pathlib.Path(args.model)
    if not model_path.exists():
        raise CliError(f"--model {model_path}: no such file or folder")
    cfg, params = load_pretrained(model_path)
    tokenizer_path = args.tokenizer or _find_tokenizer(model_path, cfg.vocab_size)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CliError(
            f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model "
            f"{model_path} has a vocabulary of {cfg.vocab_size}: they do not belong together"
        )
    prompt_ids = tokenizer.encode(args.prompt, bos=tokenizer.bos_id >= 0)
    if not prompt_ids:
        raise CliError("the prompt is empty and the tokenizer has no BOS token")
    if len(prompt_ids) + args.max_new_tokens > cfg.max_len:
        raise CliError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
            f"the model's max_len {cfg.max_len}"
        )
    sampler = make_sampler(args.greedy, args.temperature, args.top_k, args.top_p)
    tokens, valid = left_pad([prompt_ids], pad_id=max(cfg.pad_id, 0))
    out = generate_jit(
        cfg, params, tokens, valid, jax.random.key(args.seed),
        sampler=sampler, max_new_tokens=args.max_new_tokens,
    )
    new_ids = [int(t) for t, m in zip(out.tokens[0], out.mask[0], strict=True) if m]
    if new_ids and new_ids[-1] == cfg.eos_id:
        new_ids = new_ids[:-1]
    prefix = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    print(full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(new_ids))
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from jaxrec.bench.generate import run

    run(
        dtypes=args.dtype,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        peer=not args.no_peer,
        seed=args.seed,
    )
    return 0


def cmd_bench_update(args: argparse.Namespace) -> int:
    from jaxrec.bench.update import run

    run(dtypes=args.dtype, rows=args.rows, prompt=args.prompt_len,
        completion=args.completion_len, epochs=args.epochs, minibatches=args.minibatches,
        repeats=args.repeats, seed=args.seed)
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from jaxrec.bench.memory import run

    if args.rank < 0:
        raise CliError(f"--rank {args.rank} must be >= 0 (0: full fine-tuning rows only)")
    run(models=args.models, rank=args.rank, targets=args.targets,
        frozen_dtype=args.frozen_dtype, as_markdown=args.markdown)
    return 0


def cmd_bench_sim(args: argparse.Namespace) -> int:
    from jaxrec.bench.sim import run

    if args.users < 1 or args.steps < 1 or args.repeats < 1:
        raise CliError("--users, --steps and --repeats must be positive")
    overrides = {} if args.batch_rng is None else {"batch_rng": args.batch_rng}
    run(preset=args.preset, users=args.users, steps=args.steps, repeats=args.repeats,
        seed=args.seed, key_impl=args.key_impl, **overrides)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from jaxrec.sim.evaluate import simulate

    if args.episodes < 1:
        raise CliError("--episodes must be positive")
    print(json.dumps(simulate(args.preset, args.episodes, policy=args.policy, seed=args.seed)))
    return 0


def _run_config(args: argparse.Namespace):
    from jaxrec.config import load_config

    return load_config(args.config, args.set or [])


def cmd_train(args: argparse.Namespace) -> int:
    from jaxrec.train.distributed import initialize, is_primary
    from jaxrec.train.stages import run_stages

    _local_path("--workdir", args.workdir)
    config = _run_config(args)  # a bad config fails before any process waits for the others
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    stages = config.stages if args.command == "train" else (args.command,)
    summary = run_stages(config, args.workdir, stages, profile=args.profile)
    if is_primary():
        print(json.dumps(summary))
    for stage_summary in summary["stages"].values():
        if stage_summary.get("interrupted"):
            return 128 + int(getattr(__import__("signal"), stage_summary["interrupted"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxrec.train.export import export

    out = export(_local_path("--workdir", args.workdir), _local_path("--out", args.out),
                 stage=args.stage, dtype=args.dtype)
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxrec.config import BASELINES, load_config
    from jaxrec.train.evaluate import run_eval

    path = args.config or pathlib.Path(_local_path("--workdir", args.workdir)) / "config.yaml"
    if not pathlib.Path(path).is_file():
        raise CliError(f"no --config given and {path} is missing (not a jaxrec work dir)")
    config = load_config(path, args.set or [])
    baselines = None
    if args.baselines is not None:
        baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
        for name in baselines:
            if name not in BASELINES:
                raise CliError(f"--baselines {name!r} is not allowed; choose from {BASELINES}")
    log = lambda line: print(line, file=sys.stderr, flush=True)
    run_eval(config, args.workdir, baselines=baselines, log=log)
    out = pathlib.Path(args.workdir) / "eval"
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from jaxrec.train.recommend import recommend_titles, split_history

    rows = recommend_titles(_local_path("--workdir", args.workdir), split_history(args.history),
                            args.k, stage=args.stage)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        year = "" if row["year"] is None else f" ({row['year']})"
        print(f"{row['rank']:3d}. {row['title']}{year}  log-prob {row['score']:.3f}")
    return 0


def cmd_bench_ppo(args: argparse.Namespace) -> int:
    from jaxrec.bench.ppo import run

    run(dtypes=args.dtype, users=args.users, prompt_len=args.prompt_len,
        response_len=args.response_len, epochs=args.epochs, minibatches=args.minibatches,
        repeats=args.repeats, seed=args.seed, old_logp=args.old_logp)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxrec.train.report import write_plots

    for path in write_plots(_local_path("--workdir", args.workdir), args.stage):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrec", description="Fine-tune causal LMs into recommender policies with RLHF-PPO."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample a completion from a checkpoint")
    gen.add_argument("--model", required=True, help="Hugging Face folder or llama2.c .bin file")
    gen.add_argument("--tokenizer", help="tokenizer folder or llama2.c tokenizer .bin")
    gen.add_argument("--prompt", default="", help="prompt text (BOS is prepended when known)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    for name, text in (("train", "run the stages the config lists (sft, reward, ppo)"),
                       ("sft", "run the supervised stage (next-item prediction)"),
                       ("reward", "run the reward-model stage (Bradley-Terry)"),
                       ("ppo", "run the PPO stage")):
        run = sub.add_parser(name, help=text)
        run.add_argument("--config", help="YAML config (defaults apply where it is silent)")
        run.add_argument("--workdir", required=True, help="checkpoints, metrics and summary")
        run.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a config key, e.g. --set ppo.iterations=10")
        run.add_argument("--profile", action="store_true",
                         help="write a JAX profiler trace of PPO iterations 2-4 to DIR/profile")
        multi = run.add_argument_group("several processes (hosts): run the same command on each")
        multi.add_argument("--distributed", action="store_true",
                           help="join the multi-process runtime, detecting the coordinator, "
                           "process count and id (Cloud TPU slices, SLURM)")
        multi.add_argument("--coordinator", metavar="HOST:PORT",
                           help="process 0's address (with --num-processes and --process-id)")
        multi.add_argument("--num-processes", type=int, metavar="N")
        multi.add_argument("--process-id", type=int, metavar="I")
        run.set_defaults(func=cmd_train)

    exp = sub.add_parser("export", help="write the trained policy as a Hugging Face folder")
    exp.add_argument("--workdir", required=True, help="the run's work dir")
    exp.add_argument("--out", required=True, help="folder to write (must not hold a model)")
    exp.add_argument("--stage", choices=["ppo", "ppo_best", "sft"],
                     help="which policy (default: ppo, else sft)")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="stored weight dtype")
    exp.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="offline ranking, validity and simulator evaluation of "
                        "the trained policies, with baselines")
    ev.add_argument("--config", help="YAML config (default: DIR/config.yaml of the run)")
    ev.add_argument("--workdir", required=True, help="the run's work dir; writes DIR/eval/")
    ev.add_argument("--baselines", help="comma-separated: popularity,bpr,sasrec "
                    "(default: eval.baselines)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key, e.g. --set eval.users=100")
    ev.set_defaults(func=cmd_eval)

    rec = sub.add_parser("recommend", help="top-K items a trained policy gives a history")
    rec.add_argument("--workdir", required=True, help="the run's work dir")
    rec.add_argument("--history", required=True, help='titles, oldest first: "title; title"')
    rec.add_argument("-k", type=int, default=10, help="items to return")
    rec.add_argument("--stage", choices=["ppo", "ppo_best", "sft"],
                     help="which policy (default: ppo, else sft)")
    rec.add_argument("--json", action="store_true", help="one JSON list instead of lines")
    rec.set_defaults(func=cmd_recommend)

    plot = sub.add_parser("plot", help="redraw DIR/plots/*.png from DIR/metrics.jsonl")
    plot.add_argument("--workdir", required=True)
    plot.add_argument("--stage", default="ppo")
    plot.set_defaults(func=cmd_plot)

    bench = sub.add_parser("bench", help="benchmarks that print JSON lines")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bgen = bench_sub.add_parser("generate", help="new tokens per second vs transformers")
    bgen.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
    bgen.add_argument("--batch", type=int, default=64)
    bgen.add_argument("--prompt-len", type=int, default=64)
    bgen.add_argument("--new-tokens", type=int, default=32)
    bgen.add_argument("--repeats", type=int, default=5)
    bgen.add_argument("--no-peer", action="store_true", help="skip transformers' generate")
    bgen.add_argument("--seed", type=int, default=0)
    bgen.set_defaults(func=cmd_bench_generate)
    bsim = bench_sub.add_parser("sim", help="simulator user-steps per second (random slates)")
    bsim.add_argument("--preset", default="recsim-ie", help="simulator preset")
    bsim.add_argument("--users", type=int, default=10_000)
    bsim.add_argument("--steps", type=int, default=50)
    bsim.add_argument("--repeats", type=int, default=5)
    bsim.add_argument("--seed", type=int, default=0)
    bsim.add_argument("--key-impl", default="threefry2x32",
                      choices=["threefry2x32", "rbg", "unsafe_rbg"], help="jax.random key impl")
    bsim.add_argument("--batch-rng", choices=["threefry", "xla_threefry", "key"],
                      help="how step_batch draws its words (default: the preset's)")
    bsim.set_defaults(func=cmd_bench_sim)

    sim = sub.add_parser("simulate", help="episode statistics of a simulator under a policy")
    sim.add_argument("--preset", default="recsim-ie", help="simulator preset")
    sim.add_argument("--episodes", type=int, default=10_000)
    sim.add_argument("--policy", default="random", choices=["random"])
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=cmd_simulate)
    bppo = bench_sub.add_parser("ppo", help="seconds per RLHF iteration: generate/score/update")
    bppo.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
    bppo.add_argument("--users", type=int, default=64)
    bppo.add_argument("--prompt-len", type=int, default=64)
    bppo.add_argument("--response-len", type=int, default=32)
    bppo.add_argument("--epochs", type=int, default=4)
    bppo.add_argument("--minibatches", type=int, default=4)
    bppo.add_argument("--repeats", type=int, default=3)
    bppo.add_argument("--old-logp", nargs="+", default=["sampler", "rescore"],
                      choices=["sampler", "rescore"],
                      help="behaviour log-probs from the decoder, or a teacher-forced pass")
    bppo.add_argument("--seed", type=int, default=0)
    bppo.set_defaults(func=cmd_bench_ppo)
    bupd = bench_sub.add_parser("update",
                                help="ppo_step FLOP/s vs the fastest matmul (float32 or bf16)")
    bupd.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
    bupd.add_argument("--rows", type=int, default=64)
    bupd.add_argument("--prompt-len", type=int, default=64)
    bupd.add_argument("--completion-len", type=int, default=32)
    bupd.add_argument("--epochs", type=int, default=4)
    bupd.add_argument("--minibatches", type=int, default=4)
    bupd.add_argument("--repeats", type=int, default=3)
    bupd.add_argument("--seed", type=int, default=0)
    bupd.set_defaults(func=cmd_bench_update)
    bmem = bench_sub.add_parser("memory", help="computed GiB per device of an RLHF-PPO run's "
                                "state (125M / 1B / 7B, meshes, LoRA); no device needed")
    bmem.add_argument("--models", nargs="+", choices=["125m", "1b", "7b"], default=None,
                      help="a subset of the models (default: all three)")
    bmem.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA rows (0: none)")
    bmem.add_argument("--targets", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"],
                      choices=["q", "k", "v", "o", "gate", "up", "down"],
                      help="layers the LoRA rows adapt")
    bmem.add_argument("--frozen-dtype", choices=["float32", "bfloat16"], default=None,
                      help="storage of frozen params (default: float32 full, bfloat16 LoRA)")
    bmem.add_argument("--markdown", action="store_true",
                      help="a markdown table (for the README) instead of JSON lines")
    bmem.set_defaults(func=cmd_bench_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, FloatingPointError, FileNotFoundError, FileExistsError) as err:
        print(f"jaxrec {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`jaxrec eval`: the trained policies and the baselines on one protocol, as one results table.

    results = run_eval(config, workdir, baselines=("popularity", "bpr", "sasrec"))

Writes `DIR/eval/results.json` ({"rows": [{"name", "protocol", "hr@10", "ndcg@10", "mrr", ...}],
plus generative validity and simulator rows) and `DIR/eval/results.md` (a Markdown table with
one row per model and protocol, then literature figures labelled as such).

Offline ranking needs a MovieLens source (chronological leave-one-out, `jaxrec.eval.data`);
the synthetic world has no logged interactions, so there only the simulator and validity
sections are filled. Every LM policy is scored on the same users, histories and candidate
lists as the baselines; baselines are trained `eval.seeds` times (mean and 95% interval).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxrec.config import Config
from jaxrec.eval import (
    candidate_scores,
    exclude_items,
    leave_one_out_protocol,
    mean_interval,
    ranking_metrics,
)
from jaxrec.train.setup import Setup, build_setup, load_ratings

# Published figures, full ranking, leave-one-out; each applies only to our rows of the same
# dataset and filter. LlamaRec's "ML-100k" is the ml-latest-small download, 5-core filtered
# (its dataset code reads ml-latest-small.zip); its Recall@10 is HR@10 here (one held-out item).
_LLAMAREC = "Yue et al. 2023 (LlamaRec), reported R@10 / NDCG@10 on its 'ML-100k'"
_LATEST_SMALL_5_CORE = {"dataset": "movielens-latest-small", "min_user_ratings": 5,
                        "min_item_ratings": 5, "protocol": "full", "source": _LLAMAREC}
LITERATURE = [
    {"name": "LlamaRec (literature)", "hr@10": 0.1524, "ndcg@10": 0.0759, **_LATEST_SMALL_5_CORE},
    {"name": "LRURec (literature)", "hr@10": 0.1426, "ndcg@10": 0.0705, **_LATEST_SMALL_5_CORE},
    {"name": "SASRec (literature)", "hr@10": 0.0993, "ndcg@10": 0.0522, **_LATEST_SMALL_5_CORE},
    {"name": "BERT4Rec (literature)", "hr@10": 0.0785, "ndcg@10": 0.0366, **_LATEST_SMALL_5_CORE},
]


def literature_for(config: Config) -> list[dict]:
    """The published rows measured on this config's dataset and filter (none otherwise)."""
    d = config.data
    return [row for row in LITERATURE if row["dataset"] == d.source
            and row["min_user_ratings"] == d.min_user_ratings
            and row["min_item_ratings"] == d.min_item_ratings]


SPLIT_TEXT = ("leave-one-out by time: each user's last rating is the test item, the one before "
              "it validation, the rest train; equal timestamps are ordered by item id")


def ranking_text(candidates: int) -> str:
    return (f"full: every catalogue item except the user's history; candidates: the test item "
            f"and {candidates - 1} items the user never rated, the same lists for every model")


def filter_text(config: Config) -> str:
    d = config.data
    if not (d.min_user_ratings or d.min_item_ratings):
        return "none (every rating)"
    return (f"users with >= {d.min_user_ratings} and items with >= {d.min_item_ratings} ratings, "
            "repeated until stable")


TABLE_METRICS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")
POLICY_NAMES = {"sft": "SFT policy", "ppo": "RLHF policy", "ppo_best": "RLHF policy (best)"}


def has_checkpoint(workdir: pathlib.Path, stage: str) -> bool:
    folder = workdir / "checkpoints" / stage
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _both_protocols(name: str, scores: np.ndarray, protocol) -> list[dict]:
    """Rows for full ranking (history excluded) and the candidate lists, from [U, N] scores."""
    full = ranking_metrics(exclude_items(scores, protocol.histories), protocol.targets)
    picked = candidate_scores(scores, protocol.candidates)  # [U, C]
    where = np.argmax(protocol.candidates == protocol.targets[:, None], axis=1)
    cand = ranking_metrics(picked, where)
    return [{"name": name, "protocol": "full", **full},
            {"name": name, "protocol": "candidates", "candidates": protocol.candidates.shape[1],
             **cand}]


def _summarise_seeds(name: str, per_seed: list[list[dict]]) -> list[dict]:
    """Mean over seeds with a 95% interval ('<metric>_ci95': [low, high]) per protocol."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        row = {k: v for k, v in first.items() if not isinstance(v, float)}
        row.update(name=name, seeds=len(per_seed))
        for key in (k for k, v in first.items() if isinstance(v, float)):
            ci = mean_interval([runs[i][key] for runs in per_seed])
            row[key] = ci["mean"]
            row[f"{key}_ci95"] = [ci["low"], ci["high"]]
        rows.append(row)
    return rows


def _policies(config: Config, workdir: pathlib.Path, setup: Setup, log) -> dict:
    from jaxrec.train.export import _latest_policy

    out = {}
    for stage in config.eval.policies:
        if not has_checkpoint(workdir, stage):
            log(f"eval: no checkpoints/{stage} in {workdir}; skipping the {stage} policy")
            continue
        out[stage] = _latest_policy(workdir, config, setup, stage)[1]
    return out


def _baseline_settings(name: str, config: Config) -> dict:
    epochs = config.eval.baseline_epochs
    settings = {"dropout": config.eval.sasrec_dropout} if name == "sasrec" else {}
    if name == "popularity" or epochs is None:
        return settings
    return {**settings, "epochs": epochs, "eval_every": min(epochs, 5)}


def _ranking(config: Config, setup: Setup, policies: dict, baselines, log) -> tuple[list, dict]:
    from jaxrec.eval.baselines import fit_baseline
    from jaxrec.eval.offline import score_items

    ratings = load_ratings(config)
    protocol = leave_one_out_protocol(ratings, candidates=config.eval.candidates,
                                      seed=config.seed)
    if config.eval.users is not None:
        protocol = protocol.take(np.arange(min(config.eval.users, len(protocol))))
    info = {"dataset": config.data.source, "users": len(protocol), "items": protocol.n_items,
            "ratings": len(ratings), "filter": filter_text(config),
            "candidates": config.eval.candidates, "split": SPLIT_TEXT,
            "ranking": ranking_text(config.eval.candidates)}
    rows, per_user = [], {}
    for stage, params in policies.items():
        start = time.perf_counter()
        scores = score_items(setup.model, params, setup.codec, protocol.histories,
                             setup.spec.prompt_len, setup.spec.slate_size)
        rows += _both_protocols(POLICY_NAMES[stage], scores, protocol)
        per_user[stage] = _ndcg10_per_user(scores, protocol)
        log(f"eval: {stage} policy ranked {protocol.n_items} items for {len(protocol)} users "
            f"in {time.perf_counter() - start:.1f} s (hr@10 {rows[-2]['hr@10']:.4f})")
    for name in baselines:
        seeds = 1 if name == "popularity" else config.eval.seeds  # popularity is deterministic
        per_seed = []
        for seed in range(seeds):
            start = time.perf_counter()
            model = fit_baseline(name, ratings, protocol, seed=config.seed + seed,
                                 **_baseline_settings(name, config))
            scores = model.scores(protocol.users, protocol.histories)
            per_seed.append(_both_protocols(name, scores, protocol))
            log(f"eval: {name} seed {seed} in {time.perf_counter() - start:.1f} s "
                f"(hr@10 {per_seed[-1][0]['hr@10']:.4f})")
        rows += _summarise_seeds(name, per_seed)
    info["paired"] = paired_differences(per_user)
    return rows, info


def _ndcg10_per_user(scores: np.ndarray, protocol) -> np.ndarray:
    """[U] each user's NDCG@10 of the test item (full ranking, history excluded)."""
    from jaxrec.eval.metrics import ndcg, target_ranks

    better, tied = target_ranks(exclude_items(scores, protocol.histories), protocol.targets)
    return ndcg(better, tied, 10)


def paired_differences(per_user: dict[str, np.ndarray]) -> list[dict]:
    """RLHF minus SFT on the same users: the mean per-user difference in NDCG@10 (full
    ranking) with its Student-t 95% interval over users."""
    out = []
    for stage in ("ppo", "ppo_best"):
        if stage in per_user and "sft" in per_user:
            ci = mean_interval(per_user[stage] - per_user["sft"])
            out.append({"name": f"{POLICY_NAMES[stage]} - SFT policy", "metric": "ndcg@10",
                        "protocol": "full", "users": len(per_user["sft"]),
                        "mean": ci["mean"], "ci95": [ci["low"], ci["high"]]})
    return out


def _generation_and_simulator(config: Config, setup: Setup, policies: dict, log) -> tuple:
    from jaxrec.eval.offline import generative_validity
    from jaxrec.eval.simulator import simulate_greedy_and_sampled

    ev, spec = config.eval, setup.spec
    key = jax.random.key(config.seed + 7)
    _, users = setup.env.reset_batch(jax.random.key(config.seed + 11), ev.validity_users,
                                     setup.env_params)
    histories = np.asarray(jax.vmap(setup.env.observation, in_axes=(0, None))(
        users, setup.env_params))
    validity, simulator = [], []
    for stage, params in policies.items():
        name = POLICY_NAMES[stage]
        for constrained in (False, True):
            row = generative_validity(setup.model, params, setup.codec, histories,
                                      spec.prompt_len, spec.slate_size, key,
                                      constrained=constrained, temperature=0.0)
            validity.append({"name": name, **row})
        for row in simulate_greedy_and_sampled(
                setup.model, params, setup.codec, setup.env, setup.env_params, key,
                episodes=ev.sim_users, slate_size=spec.slate_size, prompt_len=spec.prompt_len,
                max_new_tokens=spec.max_new_tokens, temperature=ev.temperature):
            simulator.append({"name": name, **row})
        log(f"eval: {name}: free greedy generations name real items "
            f"{validity[-2]['item_valid_frac']:.3f} of the time; simulator return "
            f"{simulator[-2]['return_mean']:.3f} (greedy)")
    return validity, simulator


def run_eval(config: Config, workdir, *, baselines: tuple[str, ...] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Evaluate the work dir's trained policies (`eval.policies`) and the baselines
    (`baselines`, default `eval.baselines`); write and return the results."""
    workdir = pathlib.Path(workdir)
    baselines = config.eval.baselines if baselines is None else tuple(baselines)
    movielens = config.data.source != "synthetic"
    if baselines and not movielens:
        raise ValueError(f"--baselines {','.join(baselines)}: baselines need logged "
                         "interactions; data.source='synthetic' has none (use a MovieLens "
                         "source)")
    setup = build_setup(config)
    policies = _policies(config, workdir, setup, log)
    if not policies and not baselines:
        raise FileNotFoundError(f"{workdir}: no trained policy ({', '.join(config.eval.policies)}"
                                " checkpoints) and no baselines to evaluate")
    results = {"rows": [], "dataset": None}
    if movielens:
        rows, info = _ranking(config, setup, policies, baselines, log)
        results.update(rows=rows, **info)
    results["validity"], results["simulator"] = _generation_and_simulator(
        config, setup, policies, log)
    results["literature"] = literature_for(config)
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(results, indent=2, default=_plain))
    _write_atomic(out / "results.md", markdown_report(results))
    return results


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    ci = row.get(f"{key}_ci95")
    if ci is not None and row.get("seeds", 1) > 1:
        return f"{value:.4f} ± {(ci[1] - ci[0]) / 2:.4f}"
    return f"{value:.4f}"


def markdown_report(results: dict) -> str:
    """The results as Markdown: ranking table, literature, validity and simulator tables."""
    lines = []
    if results.get("rows"):
        lines += [f"## Offline ranking: {results['dataset']}, {results['users']} users, "
                  f"{results['items']} items, {results.get('ratings', '?')} ratings",
                  "",
                  f"- filter: {results.get('filter', 'none (every rating)')}",
                  f"- split: {results['split']}",
                  f"- ranking: {results.get('ranking', ranking_text(results['candidates']))}",
                  "- trained baselines: mean ± half the 95% interval over seeds",
                  "",
                  "| model | protocol | " + " | ".join(TABLE_METRICS) + " |",
                  "| --- | --- |" + " ---: |" * len(TABLE_METRICS)]
        for row in results["rows"]:
            cells = " | ".join(_cell(row, k) for k in TABLE_METRICS)
            lines.append(f"| {row['name']} | {row['protocol']} | {cells} |")
        for row in results.get("paired", []):
            low, high = row["ci95"]
            lines += ["", f"Paired over {row['users']} users, {row['name']}: {row['metric']} "
                      f"({row['protocol']}) {row['mean']:+.4f}, 95% interval "
                      f"[{low:+.4f}, {high:+.4f}]."]
        if results.get("literature"):
            lines += ["", "Published figures on the same dataset, filter and split (not "
                      "measured here; full ranking):", "", "| model | hr@10 | ndcg@10 | source |",
                      "| --- | ---: | ---: | --- |"]
            for row in results["literature"]:
                lines.append(f"| {row['name']} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | "
                             f"{row['source']} |")
        lines.append("")
    if results.get("validity"):
        lines += ["## Generative validity (greedy)", "",
                  "| model | constrained | item valid | slate valid |",
                  "| --- | --- | ---: | ---: |"]
        for row in results["validity"]:
            lines.append(f"| {row['name']} | {row['constrained']} | "
                         f"{row['item_valid_frac']:.3f} | {row['slate_valid_frac']:.3f} |")
        lines.append("")
    if results.get("simulator"):
        keys = ("return_mean", "clicks_mean", "click_rate", "coverage", "diversity", "novelty")
        lines += ["## Simulator (first episodes of fresh users)", "",
                  "| model | decoding | " + " | ".join(keys) + " |",
                  "| --- | --- |" + " ---: |" * len(keys)]
        for row in results["simulator"]:
            cells = " | ".join("" if row.get(k) is None else f"{row[k]:.4f}" for k in keys)
            lines.append(f"| {row['name']} | {row['decoding']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def combine_runs(runs: list[dict]) -> dict:
    """Several runs' results.json (one seed each, same dataset and split) as one: each LM
    policy row becomes the mean over runs with its Student-t 95% interval ('seeds' = runs);
    baseline rows, already over their own seeds, come from the first run; paired differences
    are averaged over runs with the interval over runs."""
    if not runs:
        raise ValueError("combine_runs: no results to combine")
    keys = ("dataset", "filter", "split", "users", "items")
    for run in runs[1:]:
        if any(run.get(k) != runs[0].get(k) for k in keys):
            raise ValueError(f"runs differ in {[k for k in keys if run.get(k) != runs[0].get(k)]}")
    policies = set(POLICY_NAMES.values())
    out = dict(runs[0])
    rows = []
    for row in runs[0]["rows"]:
        if row["name"] not in policies:
            rows.append(row)
            continue
        same = [next(r for r in run["rows"] if r["name"] == row["name"]
                     and r["protocol"] == row["protocol"]) for run in runs]
        merged = {k: v for k, v in row.items() if not isinstance(v, float)}
        merged["seeds"] = len(runs)
        for key in (k for k, v in row.items() if isinstance(v, float)):
            ci = mean_interval([r[key] for r in same])
            merged[key], merged[f"{key}_ci95"] = ci["mean"], [ci["low"], ci["high"]]
        rows.append(merged)
    out["rows"] = rows
    paired = []
    if len(runs) == 1:  # one seed: the interval is over users, as the run computed it
        out["paired"] = [{**row, "over": "users"} for row in runs[0].get("paired", [])]
        return out
    for row in runs[0].get("paired", []):
        means = [next(p for p in run["paired"] if p["name"] == row["name"])["mean"]
                 for run in runs]
        ci = mean_interval(means)
        paired.append({**row, "mean": ci["mean"], "ci95": [ci["low"], ci["high"]],
                       "over": "seeds", "seeds": len(runs)})
    out["paired"] = paired
    return out


def summary_table(results: dict, metrics: tuple[str, ...] = ("hr@10", "ndcg@10")) -> str:
    """A compact Markdown table of the full-ranking rows, the split named above it, the paired
    RLHF - SFT difference and the published rows of the same split below it."""
    lines = [f"{results['dataset']} ({results['users']} users, {results['items']} items); "
             f"filter: {results['filter']}; {results['split']}; full ranking over the "
             "catalogue minus the history.", "",
             "| model | seeds | " + " | ".join(metrics) + " |",
             "| --- | ---: |" + " ---: |" * len(metrics)]
    for row in results["rows"]:
        if row["protocol"] == "full":
            cells = " | ".join(_cell(row, k) for k in metrics)
            lines.append(f"| {row['name']} | {row.get('seeds', 1)} | {cells} |")
    for row in results.get("literature", []):
        cells = " | ".join(f"{row[k]:.4f}" if k in row else "" for k in metrics)
        lines.append(f"| {row['name']} | | {cells} |")
    for row in results.get("paired", []):
        low, high = row["ci95"]
        over = (f"{row['seeds']} seeds" if row.get("over") == "seeds"
                else f"{row['users']} users")
        lines += ["", f"{row['name']}, {row['metric']}: {row['mean']:+.4f} (95% interval over "
                  f"{over}: [{low:+.4f}, {high:+.4f}])."]
    return "\n".join(lines) + "\n"


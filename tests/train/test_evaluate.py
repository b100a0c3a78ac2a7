"""`jaxrec eval` and `jaxrec recommend` on the real ml-100k files with a tiny SFT policy."""

import json

import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import load_config
from jaxrec.eval.offline import score_items
from jaxrec.train.evaluate import markdown_report
from jaxrec.train.setup import build_setup

TINY = ["stages=[sft]", "data.source=movielens-100k", "sim.preset=movielens",
        "sim.history_len=6", "rollout.history_items=3", "rollout.slate_size=2",
        "model.d_model=32", "model.n_layers=1", "model.d_ff=64", "sft.steps=20",
        "sft.eval_every=100", "sft.eval_users=32", "sft.batch_size=16", "sft.lr=0.003",
        "eval.users=40", "eval.seeds=2", "eval.baseline_epochs=2", "eval.sim_users=16",
        "eval.validity_users=16"]


def _argv(command, workdir, data_dir, extra=()):
    argv = [command, "--workdir", str(workdir)]
    for item in [*TINY, f"data.dir={data_dir}", *extra]:
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_dir):
    workdir = tmp_path_factory.mktemp("ml100k")
    data_dir = shared_dir / "data" / "movielens"
    assert main(_argv("sft", workdir, data_dir)) == 0
    return workdir, data_dir


def test_eval_writes_ranking_validity_and_simulator_results(run, capsys):
    workdir, data_dir = run
    capsys.readouterr()
    assert main(_argv("eval", workdir, data_dir) + ["--baselines", "popularity,bpr,sasrec"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["dataset"] == "movielens-100k" and results["users"] == 40
    assert results["items"] == 1682 and results["candidates"] == 20
    rows = {(r["name"], r["protocol"]): r for r in results["rows"]}
    assert set(rows) == {(name, protocol) for protocol in ("full", "candidates")
                         for name in ("SFT policy", "popularity", "bpr", "sasrec")}
    # trained baselines: mean and 95% interval over eval.seeds seeds; popularity is one
    assert rows[("popularity", "full")]["seeds"] == 1
    for name in ("bpr", "sasrec"):
        row = rows[(name, "full")]
        assert row["seeds"] == 2
        low, high = row["hr@10_ci95"]
        assert low <= row["hr@10"] <= high
    for row in rows.values():
        for key in ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"):
            assert 0.0 <= row[key] <= 1.0, (row["name"], key)
        assert row["hr@1"] <= row["hr@5"] <= row["hr@10"] <= row["hr@20"]
    # popularity beats chance: 10 of 20 candidates, 20 of 1682 items
    assert rows[("popularity", "candidates")]["hr@10"] > 0.5
    assert rows[("popularity", "full")]["hr@20"] > 20 / 1682

    # the SFT row is what scoring the same users directly gives
    config = load_config(workdir / "config.yaml")
    from jaxrec.data import load_movielens
    from jaxrec.eval import exclude_items, leave_one_out_protocol, ranking_metrics
    from jaxrec.train.export import _latest_policy

    setup = build_setup(config)
    params = _latest_policy(workdir, config, setup, "sft")[1]
    ratings = load_movielens("movielens-100k", data_dir=data_dir)
    protocol = leave_one_out_protocol(ratings, seed=config.seed).take(np.arange(40))
    scores = score_items(setup.model, params, setup.codec, protocol.histories,
                         setup.spec.prompt_len, setup.spec.slate_size)
    direct = ranking_metrics(exclude_items(scores, protocol.histories), protocol.targets)
    assert rows[("SFT policy", "full")]["mrr"] == pytest.approx(direct["mrr"], rel=1e-6)

    validity = {r["constrained"]: r for r in results["validity"]}
    assert validity[True]["item_valid_frac"] == 1.0 == validity[True]["slate_valid_frac"]
    assert 0.0 <= validity[False]["item_valid_frac"] <= 1.0
    decodings = [r["decoding"] for r in results["simulator"]]
    assert decodings == ["greedy", "sampled"]
    for row in results["simulator"]:
        assert 0.0 < row["coverage"] <= 1.0 and 0.0 <= row["click_rate"] <= 1.0
    md = (workdir / "eval" / "results.md").read_text()
    assert md == markdown_report(results) and md in printed
    assert "| SFT policy | full |" in md
    # the split is named beside the table; LlamaRec's figures are on another split, so absent
    assert results["filter"] == "none (every rating)" and results["ratings"] == 100000
    assert "equal timestamps are ordered by item id" in md and "19 items the user" in md
    assert results["literature"] == [] and "literature" not in md


def test_literature_rows_appear_only_beside_their_own_split():
    from jaxrec.config import config_from_dict
    from jaxrec.train.evaluate import literature_for

    small = ["data.source=movielens-latest-small"]
    assert literature_for(config_from_dict({}, small)) == []  # unfiltered: not LlamaRec's split
    rows = literature_for(config_from_dict({}, [*small, "data.min_user_ratings=5",
                                                "data.min_item_ratings=5"]))
    assert {r["name"] for r in rows} == {"LlamaRec (literature)", "LRURec (literature)",
                                         "SASRec (literature)", "BERT4Rec (literature)"}
    assert literature_for(config_from_dict({}, ["data.source=movielens-100k"])) == []
    shipped = load_config("configs/movielens-latest-small.yaml")
    assert len(literature_for(shipped)) == 4


def test_eval_errors_name_the_cause(run, tmp_path, capsys):
    workdir, data_dir = run
    assert main(_argv("eval", workdir, data_dir) + ["--baselines", "popularity,knn"]) == 2
    assert "--baselines 'knn' is not allowed" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert main(["eval", "--config", str(workdir / "config.yaml"), "--workdir", str(tmp_path),
                 "--set", "eval.policies=[ppo]"]) == 2
    assert "no trained policy" in capsys.readouterr().err


def test_recommend_prints_unseen_titles_and_names_unknown_ones(run, capsys):
    workdir, _ = run
    capsys.readouterr()
    history = "Toy Story (1995); GoldenEye; Star Wars"
    assert main(["recommend", "--workdir", str(workdir), "--history", history, "-k", "5",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert len({r["item"] for r in rows}) == 5
    titles = {r["title"] for r in rows}
    assert not titles & {"Toy Story", "GoldenEye", "Star Wars"}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert main(["recommend", "--workdir", str(workdir), "--history", "Toy Stroy", "-k",
                 "3"]) == 2
    err = capsys.readouterr().err
    assert "'Toy Stroy' is not in the catalogue; closest: Toy Story (1995)" in err


def test_eval_in_the_synthetic_world_fills_validity_and_simulator_only(tmp_path, capsys):
    tiny = ["stages=[sft]", "sim.n_items=30", "sim.n_topics=3", "rollout.history_items=2",
            "rollout.slate_size=2", "model.d_model=32", "model.n_layers=1", "sft.steps=5",
            "sft.eval_every=100", "sft.eval_users=16", "eval.sim_users=8",
            "eval.validity_users=8"]
    argv = lambda command: [command, "--workdir", str(tmp_path),
                            *[a for item in tiny for a in ("--set", item)]]
    assert main(argv("sft")) == 0
    assert main([*argv("eval"), "--baselines", "bpr"]) == 2
    assert "data.source='synthetic' has none" in capsys.readouterr().err
    assert main(argv("eval")) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["rows"] == [] and results["dataset"] is None
    assert [r["decoding"] for r in results["simulator"]] == ["greedy", "sampled"]
    assert {r["constrained"] for r in results["validity"]} == {False, True}
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "Offline ranking" not in md and "| SFT policy | greedy |" in md


def test_runs_of_several_seeds_combine_into_one_table():
    from jaxrec.train.evaluate import combine_runs, summary_table

    def run(ndcg, diff):
        return {"dataset": "movielens-latest-small", "filter": "f", "split": "s", "users": 610,
                "items": 3650, "literature": [],
                "rows": [{"name": "RLHF policy", "protocol": "full", "ndcg@10": ndcg,
                          "hr@10": 2 * ndcg},
                         {"name": "sasrec", "protocol": "full", "ndcg@10": 0.05, "hr@10": 0.1,
                          "seeds": 3, "ndcg@10_ci95": [0.04, 0.06], "hr@10_ci95": [0.09, 0.11]}],
                "paired": [{"name": "RLHF policy - SFT policy", "metric": "ndcg@10",
                            "protocol": "full", "users": 610, "mean": diff,
                            "ci95": [diff - 1, diff + 1]}]}

    both = combine_runs([run(0.07, 0.01), run(0.09, 0.03)])
    rl = both["rows"][0]
    assert rl["seeds"] == 2 and rl["ndcg@10"] == pytest.approx(0.08)
    # Student-t with 1 degree of freedom: 12.706 * sd / sqrt(2) = 12.706 * 0.01
    assert rl["ndcg@10_ci95"] == pytest.approx([0.08 - 0.12706, 0.08 + 0.12706], rel=1e-3)
    assert both["rows"][1] == run(0, 0)["rows"][1]  # baselines keep their own seeds
    assert both["paired"][0]["mean"] == pytest.approx(0.02)
    assert both["paired"][0]["over"] == "seeds"
    table = summary_table(both)
    assert "| RLHF policy | 2 | 0.1600 ± 0.2541 | 0.0800 ± 0.1271 |" in table
    assert "over 2 seeds" in table and "filter: f; s" in table
    one = combine_runs([run(0.07, 0.01)])  # one seed: the run's own interval over users
    assert one["paired"][0]["ci95"] == [0.01 - 1, 0.01 + 1]
    assert "over 610 users: [-0.9900, +1.0100]" in summary_table(one)
    with pytest.raises(ValueError, match="differ in"):
        combine_runs([run(0.07, 0.0), {**run(0.07, 0.0), "users": 943}])

"""`jaxrec bench sim` runs at a tiny size and prints one JSON line (figures are not asserted)."""

import json

from jaxrec.cli import main
from tests.bench.test_bench import assert_names_the_machine


def test_bench_sim_prints_json_line(capsys):
    assert main(["bench", "sim", "--preset", "recsim-ie", "--users", "8", "--steps", "3",
                 "--repeats", "1"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["user_steps_per_sec"] > 0 and row["compile_s"] >= 0
    assert row["users"] == 8 and row["steps"] == 3
    assert_names_the_machine(row)
    assert row["batch_rng"] == "threefry" and row["key_impl"] == "threefry2x32"


def test_bench_sim_other_generators(capsys):
    assert main(["bench", "sim", "--users", "4", "--steps", "2", "--repeats", "1",
                 "--batch-rng", "key", "--key-impl", "unsafe_rbg"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["batch_rng"] == "key" and row["key_impl"] == "unsafe_rbg"


def test_bench_sim_rejects_bad_sizes(capsys):
    assert main(["bench", "sim", "--users", "0"]) == 2
    assert "positive" in capsys.readouterr().err

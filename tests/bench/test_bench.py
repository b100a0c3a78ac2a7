"""The benchmarks run and print JSON lines with their keys (figures are not asserted)."""

import json

import pytest

from jaxrec.cli import main
from jaxrec.hardware import cpu_info


def assert_names_the_machine(row):
    """Every benchmark line says where it was measured: device, CPU model and matrix ISA."""
    cpu = cpu_info()
    assert row["backend"] == "cpu" and row["device_kind"] == "cpu"
    assert row["cpu_model"] == cpu.model and row["cpu_matrix_isa"] == cpu.matrix_isa
    assert row["bf16_matrix_units"] is cpu.bf16_matrix_units


def test_bench_generate_prints_json_lines_with_peer_figures(capsys):
    status = main(["bench", "generate", "--batch", "2", "--prompt-len", "4", "--new-tokens", "3",
                   "--repeats", "1"])
    assert status == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for row in rows:
        assert_names_the_machine(row)
        assert row["new_tokens_per_sec"] > 0 and row["peer_new_tokens_per_sec"] > 0
        assert row["peer_dtype"] == row["dtype"]
        assert abs(row["ratio"] - row["new_tokens_per_sec"] / row["peer_new_tokens_per_sec"]) < 0.01
        assert row["batch"] == 2 and row["new_tokens"] == 3


def test_bench_generate_without_peer(capsys):
    assert main(["bench", "generate", "--dtype", "float32", "--batch", "2", "--prompt-len", "4",
                 "--new-tokens", "2", "--repeats", "1", "--no-peer"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "peer_new_tokens_per_sec" not in row and row["new_tokens_per_sec"] > 0


def test_bench_update_prints_flops_and_ceiling(capsys):
    assert main(["bench", "update", "--dtype", "bfloat16", "--rows", "4", "--prompt-len", "6",
                 "--completion-len", "2", "--epochs", "1", "--minibatches", "2",
                 "--repeats", "1"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_names_the_machine(row)
    assert row["dtype"] == "bfloat16" and row["flops_per_sec"] > 0
    assert row["fraction_of_ceiling"] == pytest.approx(
        row["flops_per_sec"] / row["ceiling_flops_per_sec"], rel=1e-3)
    # the ceiling is the faster of the two matrix products, whichever the CPU has units for
    rates = {d: row[f"matmul_{d}_flops_per_sec"] for d in ("float32", "bfloat16")}
    assert row["ceiling_dtype"] == max(rates, key=rates.get)
    assert row["ceiling_flops_per_sec"] == max(rates.values())


def test_bench_ppo_prints_the_split(capsys):
    assert main(["bench", "ppo", "--dtype", "float32", "--users", "4", "--prompt-len", "24",
                 "--response-len", "10", "--epochs", "1", "--minibatches", "2",
                 "--repeats", "1", "--old-logp", "sampler"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_names_the_machine(row)
    for key in ("sec_per_iter", "generate_sec", "score_sec", "update_sec"):
        assert row[key] > 0, key
    assert row["slate_size"] >= 1 and row["dtype"] == "float32"
    assert row["old_logp"] == "sampler"

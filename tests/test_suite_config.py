"""The test command itself: a worker that dies ends the run at once, naming its test; each
file's compiled programs are released, so a worker's memory mappings stay bounded."""

import pathlib
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp

from tests.conftest import memory_maps, release_compiled_programs

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADDOPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
    "addopts"]


def test_a_crashed_worker_ends_the_run_and_names_its_test(tmp_path):
    (tmp_path / "test_dies.py").write_text(
        "import os, signal\n\n"
        "def test_dies_in_native_code():\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n\n"
        "def test_after_the_crash():\n"
        "    pass\n")
    (tmp_path / "test_slow.py").write_text(  # the other worker's file outlasts the crash
        "import time\n\n"
        + "".join(f"def test_waits_{i}():\n    time.sleep(0.5)\n\n" for i in range(20)))
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = {ADDOPTS}\n")
    # The timeout only guards this test against the hang it checks for.
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out  # tests failed (not 3: an internal error of pytest)
    assert "crashed while running 'test_dies.py::test_dies_in_native_code'" in out, out
    assert "FAILED test_dies.py::test_dies_in_native_code" in out, out
    assert "replacing crashed worker" not in out, out
    assert "INTERNALERROR" not in out, out


def test_releasing_compiled_programs_returns_their_memory_mappings():
    if memory_maps() is None:
        import pytest

        pytest.skip("no /proc/self/maps on this platform")
    jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()  # the runtime's own first maps
    release_compiled_programs()
    before = memory_maps()
    kept = [jax.jit(lambda x, i=i: jnp.tanh(x * i) @ x) for i in range(100)]
    for f in kept:  # jitted functions that stay alive, as module-level ones do
        f(jnp.ones((8, 8))).block_until_ready()
    grown = memory_maps()
    assert grown - before > 200  # each program holds several mappings (measured: about 6)
    release_compiled_programs()
    assert memory_maps() - before < 50
    assert kept  # still alive: only their compiled programs went

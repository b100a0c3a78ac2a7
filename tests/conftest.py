"""Test set-up, before jax loads: 8 fake CPU devices (and, opt-in, a compilation cache)."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_REPO = pathlib.Path(__file__).resolve().parents[1]
# The persistent compilation cache is opt-in (export JAX_COMPILATION_CACHE_DIR=.jax_cache for
# fast local reruns): in two long CI runs, jaxlib 0.10.2 crashed the test process inside
# `executable.serialize()` while writing a cache entry (SIGABRT once, SIGSEGV once).
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

SHARED = _REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (real MovieLens files and models); skips with a reason only when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it holds the licensed test data and models")
    return SHARED

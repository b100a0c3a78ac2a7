"""Test set-up, before jax loads: 8 fake CPU devices (and, opt-in, a compilation cache); after
each test file, its compiled programs are released.

Why the release: every compiled XLA CPU program holds about six memory mappings (its JIT code
and data sections) for as long as a jit cache keeps it, and the caches of module-level jitted
functions live as long as the worker process. A worker that ran half the suite held over 20,000
mappings, growing by 2,500-3,600 per heavy file; Linux refuses mmap past vm.max_map_count
(65,530 by default), and whatever asked next failed: the XLA compiler (SIGSEGV in
backend_compile_and_load), executable.serialize, a native thread of an Orbax save (SIGABRT
with no Python frame), or an Orbax restore that waited forever. With the limit lowered to
24,000, a single process running tests/train hung in such a restore in its fifth file; with
the release below it held about 1,200 mappings after each file.
"""

import ctypes
import gc
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
MAPS_LIMIT = pathlib.Path("/proc/sys/vm/max_map_count")
SELF_MAPS = pathlib.Path("/proc/self/maps")


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl)
        return None


_LIBC = _glibc()


def memory_maps() -> int | None:
    """Memory mappings this process holds (None where /proc does not say)."""
    try:
        with SELF_MAPS.open() as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def release_compiled_programs() -> None:
    """Drop every jit cache's compiled programs and the objects that held them."""
    import jax

    jax.clear_caches()
    gc.collect()
    if _LIBC is not None:  # hand freed heap pages back, so RSS tracks what is alive
        _LIBC.malloc_trim(0)


@pytest.fixture(scope="module", autouse=True)
def _compiled_programs_released_after_each_file(request):
    """Bounds a worker's mappings and memory by one file's programs. A file that still leaves
    more than half of vm.max_map_count mapped errors here, named, instead of crashing whatever
    test runs when the limit is reached."""
    yield
    release_compiled_programs()
    maps = memory_maps()
    if maps is None or not MAPS_LIMIT.is_file():
        return
    budget = int(MAPS_LIMIT.read_text()) // 2
    if maps > budget:
        raise RuntimeError(f"{request.module.__name__} left {maps} memory mappings after its "
                           f"compiled programs were released (budget {budget}: half of "
                           "vm.max_map_count); something keeps programs or arrays alive")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared (real MovieLens files and models); skips with a reason only when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it holds the licensed test data and models")
    return SHARED

"""jaxrec.hardware: the CPU's model and matrix ISA from /proc/cpuinfo, and what `auto` becomes."""

import pathlib

import jax
import pytest

from jaxrec import hardware
from jaxrec.config import ModelConfig, load_config
from jaxrec.hardware import accelerator_has_bf16, parse_cpuinfo, resolve_cache_dtype, resolve_dtype

# First-processor blocks as these CPUs print them (flags cut to the ones that matter and a few
# around them; a second processor's block follows to check that only the first is read).
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""
CASCADE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.80GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
"""
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
"""
ZEN_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd aes sha2 crc32 atomics asimddp sve i8mm bf16 svebf16 rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


@pytest.mark.parametrize("text, model, isa, bf16", [
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "amx-bf16", True),
    (CASCADE_LAKE, "Intel(R) Xeon(R) CPU @ 2.80GHz", "avx512", False),
    (ZEN4, "AMD EPYC 9B14", "avx512-bf16", True),
    (ZEN_AVX2, "AMD EPYC", "avx2", False),
])
def test_x86_cpus_are_named_with_their_best_matrix_isa(text, model, isa, bf16):
    cpu = parse_cpuinfo(text, "x86_64")
    assert (cpu.model, cpu.matrix_isa, cpu.bf16_matrix_units) == (model, isa, bf16)
    assert "something" not in cpu.model and "fpu" in cpu.flags


def test_aarch64_names_its_features_and_counts_as_without_bf16_units():
    # XLA's CPU backend has no bfloat16 matrix kernels for Arm: auto stays float32 there.
    cpu = parse_cpuinfo(GRAVITON3, "aarch64")
    assert cpu.model == "aarch64" and cpu.matrix_isa == "aarch64+bf16+i8mm+sve"
    assert not cpu.bf16_matrix_units


def test_an_empty_cpuinfo_says_unknown_rather_than_guessing():
    cpu = parse_cpuinfo("", "")
    assert (cpu.model, cpu.matrix_isa, cpu.bf16_matrix_units) == ("unknown", "unknown", False)


def test_this_machine_is_read_from_proc_cpuinfo():
    path = pathlib.Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo on this platform")
    flags = set()
    for line in path.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.partition(":")[2].split())
            break
    cpu = hardware.cpu_info()
    assert cpu.flags == flags
    assert cpu.bf16_matrix_units == bool(flags & {"amx_bf16", "avx512_bf16"})


@pytest.mark.parametrize("platform, capability, expected", [
    ("tpu", None, True),
    ("gpu", "9.0", True),  # H100 / H200
    ("gpu", "8.0", True),  # A100
    ("gpu", "7.5", False),  # T4: float16 tensor cores only
    ("gpu", "7.0", False),  # V100
    ("rocm", None, True),
    ("cpu", None, False),
])
def test_accelerators_with_bf16_units(platform, capability, expected):
    assert accelerator_has_bf16(platform, capability) is expected


def test_auto_resolves_on_the_cpu_by_its_matrix_units():
    cpu_device = jax.devices("cpu")[0]
    expected = "bfloat16" if hardware.cpu_info().bf16_matrix_units else "float32"
    assert resolve_dtype("auto", cpu_device) == expected
    assert resolve_cache_dtype("auto", cpu_device) == "float32"  # CPU attention: f32 cache
    for name in ("float32", "bfloat16"):  # an explicit dtype is kept on every machine
        assert resolve_dtype(name, cpu_device) == name
        assert resolve_cache_dtype(name, cpu_device) == name


def test_auto_is_the_run_default_and_what_every_shipped_config_uses():
    configs = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        model = load_config(path).model
        assert model.dtype == "auto", path.name
        assert model.cache_dtype == "auto", path.name


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_the_policy_is_built_in_the_resolved_dtype(dtype):
    from jaxrec.train.setup import build_setup

    setup = build_setup(load_config(None, ["sim.n_items=20", f"model.dtype={dtype}"]))
    assert setup.model.dtype == resolve_dtype(dtype) != "auto"
    assert setup.model.cache_dtype == resolve_cache_dtype("auto") != "auto"


def test_model_config_takes_only_concrete_dtypes():
    with pytest.raises(ValueError, match="model.dtype='auto' is not allowed"):
        ModelConfig(dtype="auto")


def test_a_run_config_refuses_an_unknown_dtype_naming_the_choices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dtype: float16\n")
    with pytest.raises(ValueError, match=r"model.dtype='float16' is not allowed; choose one of "
                                         r"\('auto', 'float32', 'bfloat16'\)"):
        load_config(path)

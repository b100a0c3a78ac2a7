"""What the machine offers for matrix products: the CPU's model and matrix instruction set, the
accelerator if any, and the compute dtype that `model.dtype: auto` resolves to on it.

Rank 0 of the import order: this module imports nothing from jaxrec, and jax only inside the
functions that ask for the backend (so reading /proc/cpuinfo costs no jax import).

bfloat16 compute pays only where the hardware multiplies bfloat16 natively: Intel AMX or
AVX512_BF16 on CPUs, tensor cores from compute capability 8.0 (Ampere) on NVIDIA GPUs, AMD's
Instinct GPUs, TPUs. A CPU with AVX2 only (or AVX-512 without BF16) converts every bfloat16
operand to float32 first, so bfloat16 is slower there than float32.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import platform

CPUINFO = pathlib.Path("/proc/cpuinfo")
# Matrix instruction sets from best to worst for a bfloat16 x bfloat16 -> float32 product, as
# the /proc/cpuinfo flag that announces each (x86-64; aarch64 lists "Features" instead).
_X86_ISAS = (
    ("amx_bf16", "amx-bf16"),
    ("avx512_bf16", "avx512-bf16"),
    ("avx512f", "avx512"),
    ("avx2", "avx2"),
    ("avx", "avx"),
    ("sse4_2", "sse4.2"),
)
_BF16_ISAS = frozenset({"amx-bf16", "avx512-bf16"})
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class CPUInfo:
    """The host CPU as /proc/cpuinfo describes its first core."""

    model: str  # 'model name' (x86) or the machine type; 'unknown' when nothing says
    matrix_isa: str  # best matrix ISA: amx-bf16 | avx512-bf16 | avx512 | avx2 | avx | sse4.2 |
    #                  the aarch64 features with bf16/sme/sve, or the machine type
    flags: frozenset[str]  # every flag (x86 'flags', aarch64 'Features')

    @property
    def bf16_matrix_units(self) -> bool:
        """True where this CPU multiplies bfloat16 natively (AMX or AVX512_BF16)."""
        return self.matrix_isa in _BF16_ISAS


def parse_cpuinfo(text: str, machine: str = "") -> CPUInfo:
    """A CPUInfo from the text of /proc/cpuinfo (only the first processor's block is read)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("cpu model") or machine or "unknown"
    isa = next((name for flag, name in _X86_ISAS if flag in flags), "")
    if not isa and "features" in fields:  # aarch64: name the extensions matmuls may use
        isa = "+".join(["aarch64", *sorted(flags & {"bf16", "i8mm", "sve", "sve2", "sme"})])
    return CPUInfo(model=model, matrix_isa=isa or machine or "unknown", flags=flags)


@functools.cache
def cpu_info() -> CPUInfo:
    """This machine's CPU (read once per process)."""
    machine = platform.machine()
    try:
        text = CPUINFO.read_text()
    except OSError:  # macOS, Windows: no /proc; name the processor as the platform does
        return CPUInfo(model=platform.processor() or machine or "unknown",
                       matrix_isa=machine or "unknown", flags=frozenset())
    return parse_cpuinfo(text, machine)


def accelerator_has_bf16(platform: str, compute_capability: str | None = None) -> bool:
    """bfloat16 matrix units on an accelerator: every TPU; NVIDIA GPUs of compute capability
    8.0 (Ampere) and later (Volta and Turing have float16 tensor cores only); ROCm GPUs, which
    report no capability (every Instinct GPU jax supports has them)."""
    if platform == "tpu":
        return True
    if platform in ("gpu", "cuda", "rocm"):
        if compute_capability is None:
            return True
        return float(compute_capability) >= 8.0
    return False


def _accelerator_has_bf16(device) -> bool:
    return accelerator_has_bf16(device.platform, getattr(device, "compute_capability", None))


def _or_first_device(device):
    """`device`, or jax's first device when it is None."""
    if device is None:
        import jax

        device = jax.devices()[0]
    return device


def bf16_matrix_units(device=None) -> bool:
    """True where `device` (default: jax's first device) multiplies bfloat16 natively."""
    device = _or_first_device(device)
    if device.platform == "cpu":
        return cpu_info().bf16_matrix_units
    return _accelerator_has_bf16(device)


def resolve_dtype(name: str, device=None) -> str:
    """The compute dtype `name` stands for on `device`: 'auto' is 'bfloat16' where the hardware
    has bfloat16 matrix units and 'float32' elsewhere; any other name is itself."""
    if name != AUTO:
        return name
    return "bfloat16" if bf16_matrix_units(device) else "float32"


def resolve_cache_dtype(name: str, device=None) -> str:
    """The KV-cache dtype `name` stands for: 'auto' is float32 on CPUs (XLA's CPU attention over
    a bfloat16 cache runs several times slower) and bfloat16 on accelerators with bf16 units."""
    if name != AUTO:
        return name
    device = _or_first_device(device)
    if device.platform == "cpu":
        return "float32"
    return "bfloat16" if _accelerator_has_bf16(device) else "float32"


def describe(device=None) -> dict:
    """Where a figure was measured, for every benchmark line: the backend and device kind, and
    the host CPU's model and matrix ISA (the host also runs an accelerator's launches)."""
    device = _or_first_device(device)
    cpu = cpu_info()
    return {
        "backend": device.platform,
        "device_kind": device.device_kind,
        "cpu_model": cpu.model,
        "cpu_matrix_isa": cpu.matrix_isa,
        "bf16_matrix_units": bf16_matrix_units(device),
    }

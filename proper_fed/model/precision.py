"""Which precision to train and serve in, chosen from the hardware found (`dtype = "auto"`).

bf16 is fast only where the hardware computes it natively: on a CPU without AVX512-BF16 / AMX a bf16 matmul
runs 50-80 times slower than fp32 (STACK.md), so "auto" picks bf16 autocast only on CUDA GPUs that support
bf16 and on x86 CPUs with `avx512_bf16` or `amx_bf16`, fp32 otherwise. The same rule picks the 4-bit compute
dtype. Every run records the result (`Precision.to_dict`) with the flags behind it.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
AUTOCAST_BF16 = "fp32-autocast-bf16"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags worth recording beside the choice (what the CPU offers for fp32 and bf16 math).
REPORTED_CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one backbone on one device, and why."""

    requested: str
    dtype: str  # fp32 | bf16 | fp32-autocast-bf16
    device: str  # cpu | cuda
    native_bf16: bool
    hardware: str  # CPU model or GPU name
    flags: tuple[str, ...]  # the CPU flags (or CUDA capability) the choice was made from

    @property
    def uses_bf16(self) -> bool:
        return self.dtype != "fp32"

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_flags() -> dict[str, bool]:
    """The CPU's capability flags as torch's cpuinfo reads them (torch >= 2.13), with a fallback for older
    torch that can only tell AVX512-BF16."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            found = caps()
            # a read-only mappingproxy in torch 2.13, with a few non-flag entries (cache sizes, names)
            return (
                {k: v for k, v in found.items() if isinstance(v, bool)} if isinstance(found, Mapping) else {}
            )
        except RuntimeError:  # not an x86 CPU, or cpuinfo failed
            return {}
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return {"avx512_bf16": bool(probe())} if probe is not None else {}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math is native (fast) on `device`. Not `is_bf16_available`-style checks: those only say
    that bf16 runs, which it does everywhere, emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return any(flags.get(f, False) for f in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`requested` as the config gives it ("auto", "fp32", "bf16", "fp32-autocast-bf16") -> what to run.

    A forced bf16 precision on hardware without native bf16 is honoured, with a warning that it will be
    much slower than fp32."""
    native = native_bf16(device)
    dtype = (AUTOCAST_BF16 if native else "fp32") if requested == AUTO else requested
    if device.type == "cuda":
        idx = device.index or 0
        hardware = torch.cuda.get_device_name(idx) if torch.cuda.is_available() else "cuda"
        major, minor = torch.cuda.get_device_capability(idx) if torch.cuda.is_available() else (0, 0)
        flags: tuple[str, ...] = (f"sm_{major}{minor}",) + (("bf16",) if native else ())
    else:
        hardware = cpu_name()
        found = cpu_flags()
        flags = tuple(f for f in REPORTED_CPU_FLAGS if found.get(f, False))
    if dtype != "fp32" and not native:
        log.warning(
            "dtype=%r on %s, which has no native bf16 (flags: %s): bf16 math is emulated there and runs "
            "about 50 times slower than fp32; use dtype='auto' or 'fp32'",
            requested,
            hardware,
            ", ".join(flags) or "none",
        )
    return Precision(requested, dtype, device.type, native, hardware, flags)


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype the 4-bit layers dequantize to and multiply in."""
    return torch.bfloat16 if precision.uses_bf16 else torch.float32

"""Devices and compute dtypes: one rule for every package.

bf16 is fast only where the hardware has it: on a CPU without native bf16 (no AVX512_BF16 /
AMX / Arm BF16) it is emulated and can be orders of magnitude slower than fp32. What each
workload picks under `auto` is its own decision; whether the hardware *has* bf16 is decided here.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above the first with bf16 dot products.
_ONEDNN_BF16_ISA_MARKS = ("BF16", "FP16", "AVX10", "AMX")


def _isa_capped_below_bf16() -> bool:
    """True when torch or oneDNN was told to stay below bf16 instructions.

    `ATEN_CPU_CAPABILITY=avx2` and `ONEDNN_MAX_CPU_ISA=AVX2` make a bf16 CPU behave like an
    AVX2-only one (bf16 matmuls fall back to emulation, ~100x slower than fp32), which is also
    how the test suite is run as the other kind of CPU.
    """
    capped_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if capped_isa and capped_isa not in ("ALL", "DEFAULT") and not any(m in capped_isa for m in _ONEDNN_BF16_ISA_MARKS):
        return True
    return platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (x86 AVX512_BF16 or AMX, Arm BF16)
    and neither torch nor oneDNN is capped below them."""
    if _isa_capped_below_bf16():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in _BF16_CPU_FLAGS) or "bf16" in flags
    try:  # no /proc (macOS, Windows): ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def has_native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None -> cuda when available, else cpu; a bare `cuda` under torchrun is this rank's GPU."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where the hardware runs it natively, else float32; names as in DTYPE_NAMES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for anything but float32 (weights stay fp32, matmuls run in `dtype`)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

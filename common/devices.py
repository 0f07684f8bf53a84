"""Devices and compute dtypes: one rule for every package.

bf16 is fast only where the hardware has it: on a CPU without native bf16 (no AVX512_BF16 /
AMX / Arm BF16) it is emulated and can be orders of magnitude slower than fp32. `auto` means the
same everywhere (`resolve_dtype`): bf16 on CUDA, fp32 on a CPU that emulates bf16, and on a CPU
with native bf16 the faster of the two for the workload, measured when the caller can run it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from lvd.common.errors import InputFormatError

log = logging.getLogger(__name__)

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


def resolve_dtype(
    dtype: str | torch.dtype | None,
    device: torch.device,
    *,
    measure: Callable[[torch.dtype], object] | None = None,
    task: str = "compute dtype",
    shape: Mapping | None = None,
) -> torch.dtype:
    """The compute dtype `dtype` names on `device` (names as in DTYPE_NAMES).

    `auto` is one rule for every workload: bfloat16 on CUDA; float32 on a CPU that emulates bf16;
    on a CPU with native bf16, bfloat16, unless the caller passes `measure` (one run of its
    workload at a given dtype): then whichever of float32 and bfloat16 ran faster here, measured
    once per machine, task and shape (`lvd.common.calibration`). A busy machine makes bf16 lose
    more than fp32 does, so workloads that can be timed cheaply should be.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if not has_native_bf16(device):
            return torch.float32
        if measure is None:
            return torch.bfloat16
        from lvd.common.calibration import choose  # calibration builds on this module

        candidates = {"float32": lambda: measure(torch.float32), "bfloat16": lambda: measure(torch.bfloat16)}
        choice = choose(task, dict(shape or {}), candidates, device=device, repeats=1)
        log.info("%s auto: %s", task, choice.describe())
        return DTYPE_NAMES[choice.name]
    if name not in DTYPE_NAMES:
        raise InputFormatError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for anything but float32 (weights stay fp32, matmuls run in `dtype`)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

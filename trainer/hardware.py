"""What this machine computes fast: shared by training (mixed precision) and serving (dtype)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated.

    Linux only (``/proc/cpuinfo``); anywhere else the answer is False, which keeps fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str) -> str:
    """The serving dtype ``auto`` means: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32."""
    if str(device).startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"

"""How many rows the running batch gets: as many as the KV cache budget holds at the longest length a
row can reach, capped by ``max_batch_size`` when one is given.

The cache is one slot per row at the full context (``kv.py``): a batch of ``rows`` can hold
``rows x n_positions x kv_bytes_per_token`` bytes when every row is full, and the plan keeps that
within the budget. On CPU only the blocks rows hold are committed, so the budget bounds the cache's
memory; it is not taken up front.

The budget, unless given (``kv_cache_bytes``): on CUDA half the device memory free once the model is
loaded (the rest is for activations, adapters and the allocator's slack); on CPU a quarter of the
memory the kernel reports available (within the container's cgroup limit, if any), at most
``CPU_BUDGET_MAX``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

MAX_ROWS = 256  # the hard ceiling (prefill and decode index rows with small tensors)
CUDA_FREE_FRACTION = 0.5
CPU_AVAILABLE_FRACTION = 0.25
CPU_BUDGET_MAX = 8 << 30
CPU_BUDGET_FALLBACK = 2 << 30  # where /proc/meminfo cannot be read


@dataclass(frozen=True)
class BatchPlan:
    rows: int  # the batch's capacity
    kv_budget_bytes: int
    kv_bytes_per_token: int  # one position of one row, every layer, K and V
    row_tokens: int  # the longest a row can get (the model's context)
    cap: int | None  # max_batch_size, when one was given
    budget_source: str  # where kv_budget_bytes came from
    limited_by: str  # "kv_budget" | "max_batch_size" | "ceiling"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_bytes_per_token(n_layer: int, kv_width: int, kv_dtype: torch.dtype) -> int:
    """K and V of every layer for one position; ``kv_width`` = KV heads x head dim (GPT-2: the model's
    width; grouped-query attention: fewer KV heads than query heads)."""
    return 2 * n_layer * kv_width * torch.empty((), dtype=kv_dtype).element_size()


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (a container's), None without one:
    /proc/meminfo shows the host's memory, not the container's."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _mem_available() -> int | None:
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        available = None
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def default_kv_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, how they were found) for the cache on ``device``, measured now (after the model loaded)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION), f"{CUDA_FREE_FRACTION:g} x {free >> 20} MiB free on {device}"
    available = _mem_available()
    if available is None:
        return CPU_BUDGET_FALLBACK, "fallback (memory not readable)"
    budget = min(int(available * CPU_AVAILABLE_FRACTION), CPU_BUDGET_MAX)
    return (
        budget,
        f"min({CPU_AVAILABLE_FRACTION:g} x {available >> 20} MiB available, {CPU_BUDGET_MAX >> 30} GiB)",
    )


def plan_batch(
    *,
    device: torch.device,
    per_token: int,
    row_tokens: int,
    max_batch_size: int | None = None,
    kv_cache_bytes: int | None = None,
) -> BatchPlan:
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    if kv_cache_bytes is not None:
        budget, source = int(kv_cache_bytes), "kv_cache_bytes"
    else:
        budget, source = default_kv_budget(device)
    fits = max(1, budget // (per_token * row_tokens))  # one row always: a request must be servable
    rows, limited = fits, "kv_budget"
    if max_batch_size is not None and max_batch_size < rows:
        rows, limited = max_batch_size, "max_batch_size"
    if rows > MAX_ROWS:
        rows, limited = MAX_ROWS, "ceiling"
    return BatchPlan(rows, budget, per_token, row_tokens, max_batch_size, source, limited)

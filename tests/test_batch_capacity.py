"""The batch's capacity comes from the KV budget (``service/engine/capacity.py``), on a real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine import Engine, GenerationRequest, SamplingParams
from service.engine.capacity import MAX_ROWS, default_kv_budget, kv_bytes_per_token, plan_batch

CPU = torch.device("cpu")


def test_rows_are_what_the_budget_holds_at_full_context_capped():
    per = kv_bytes_per_token(6, 768, torch.float32)
    assert per == 2 * 6 * 768 * 4  # distilgpt2 with an fp32 cache: 36 KiB per row-position
    assert kv_bytes_per_token(6, 768, torch.float16) == per // 2
    row = per * 1024
    plan = plan_batch(device=CPU, per_token=per, row_tokens=1024, kv_cache_bytes=10 * row + row // 2)
    assert (plan.rows, plan.limited_by, plan.budget_source) == (10, "kv_budget", "kv_cache_bytes")
    capped = plan_batch(device=CPU, per_token=per, row_tokens=1024, max_batch_size=4, kv_cache_bytes=10 * row)
    assert (capped.rows, capped.limited_by, capped.cap) == (4, "max_batch_size", 4)
    small = plan_batch(device=CPU, per_token=per, row_tokens=1024, kv_cache_bytes=row // 3)
    assert small.rows == 1  # one row always: every request that fits the context can be served
    huge = plan_batch(device=CPU, per_token=per, row_tokens=1024, kv_cache_bytes=10_000 * row)
    assert (huge.rows, huge.limited_by) == (MAX_ROWS, "ceiling")
    with pytest.raises(ValueError):
        plan_batch(device=CPU, per_token=per, row_tokens=1024, max_batch_size=0)


def test_the_default_cpu_budget_is_measured_from_available_memory():
    budget, source = default_kv_budget(CPU)
    available = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    assert 0 < budget <= min(available // 4, 8 << 30) * 1.1 and "available" in source


def test_engine_rows_follow_the_budget_and_the_cache_stays_within_it(tiny_base: Path, tmp_path: Path):
    per = kv_bytes_per_token(2, 64, torch.float32)  # the tiny base: 2 layers, 64 wide, 256 positions
    budget = 3 * per * 256 + 100
    eng = Engine(tiny_base, tmp_path, kv_cache_bytes=budget)
    assert eng.max_batch_size == eng.plan.rows == 3 and eng.stats()["batch_plan"]["limited_by"] == "kv_budget"
    # three rows at full context: the cache grows to the whole context in every slot, within budget
    for i in range(3):
        ids = eng.tokenizer.encode("Once upon a time")
        eng.add(GenerationRequest(f"r{i}", ids, None, SamplingParams(max_new_tokens=256 - len(ids))))
    eng.add(GenerationRequest("r3", [1, 2], None, SamplingParams(max_new_tokens=4, temperature=0)))
    eng.step()
    assert eng.stats()["rows"] == 3 and eng.stats()["waiting"] == 1  # the fourth waits for a row
    assert eng.runner.kv_bytes() <= budget
    assert Engine(tiny_base, tmp_path, kv_cache_bytes=budget, max_batch_size=2).max_batch_size == 2

"""The Kubernetes Inference Gateway's model-server gauges, read from a real server under load.

The endpoint picker of gateway-api-inference-extension scrapes ``/metrics`` and routes on queue
length, running rows, KV-cache usage and which adapters run or wait. The server here holds two rows
(``--max-batch-size 2``) and gets four OpenAI completions on two adapters at once, so requests wait,
rows run and both adapters are named; after the load every gauge reads 0 and the lists are empty.
The distilgpt2 shape (random weights): the tiny base decodes too fast to be caught in the act.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.server import running_server

MAX_LORA = 3
TOKENS = 120  # per request: a few seconds for two rows of the distilgpt2 shape on CPU


def _make_lora(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    get_peft_model(load_base_model(base), cfg).save_pretrained(out)
    return out


def gauges(url: str) -> dict:
    """The four protocol gauges; the info gauge as its newest series (older label sets linger)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    info: list[tuple[float, dict[str, str]]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loraserve_lora_requests_info":
                info.append((s.value, s.labels))
            elif s.name in (
                "loraserve_num_requests_waiting",
                "loraserve_num_requests_running",
                "loraserve_kv_cache_usage_perc",
            ):
                key = s.name.removeprefix("loraserve_")
                samples[key] = samples.get(key, 0.0) + s.value
    if not info:  # the worker has not finished its first pass yet
        return dict(samples, info_time=None)
    updated, labels = max(info, key=lambda x: x[0])
    return dict(samples, info_time=updated, **labels)


@pytest.mark.slow
def test_gateway_gauges_follow_the_load_and_return_to_zero(distil_base: Path, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for seed, name in enumerate(("alpha", "beta"), start=1):
        shutil.copytree(_make_lora(distil_base, tmp_path / "src" / name, seed), adapters / name)
    args = ["--max-batch-size", "2", "--max-loaded-adapters", str(MAX_LORA)]
    with running_server(distil_base, adapters, tmp_path / "data", args=args) as srv:
        deadline = time.monotonic() + 10
        while (idle := gauges(srv.url))["info_time"] is None:
            assert time.monotonic() < deadline, "no loraserve_lora_requests_info 10 s after ready"
            time.sleep(0.1)
        assert idle["max_lora"] == str(MAX_LORA)

        answers: list[httpx.Response] = []

        def complete(model: str, i: int) -> None:
            body = {"model": model, "prompt": f"Count {i}:", "max_tokens": TOKENS, "temperature": 0}
            answers.append(httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120))

        threads = [
            threading.Thread(target=complete, args=(name, i))
            for i, name in enumerate(("alpha", "beta", "alpha", "beta"))
        ]
        for t in threads:
            t.start()
        seen: list[dict] = []
        kv_seen: list[dict] = []  # /health/ready's KV blocks
        while any(t.is_alive() for t in threads):
            seen.append(gauges(srv.url))
            kv_seen.append(httpx.get(f"{srv.url}/health/ready", timeout=10).json()["kv_cache"])
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert {r.json()["model"] for r in answers} == {"alpha", "beta"}  # the adapter stays in `model`

        assert max(g["num_requests_running"] for g in seen) == 2
        assert max(g["num_requests_waiting"] for g in seen) >= 1
        # at most 2 rows x 1024 positions, each holding its prompt plus up to TOKENS tokens, in blocks of
        # one 4 KiB page of a 64-wide head (32 positions in bf16, 16 in fp32): (TOKENS + 8) is a whole
        # number of blocks either way
        dtype = httpx.get(f"{srv.url}/health/ready", timeout=10).json()["dtype"]
        block = 4096 // (64 * (4 if dtype == "float32" else 2))
        assert 0 < max(g["kv_cache_usage_perc"] for g in seen) <= 2 * (TOKENS + 8) / (2 * 1024)
        assert {kv["block_tokens"] for kv in kv_seen} == {block}
        assert {kv["blocks_total"] for kv in kv_seen} == {2 * 1024 // block}
        assert 0 < max(kv["blocks_used"] for kv in kv_seen) <= 2 * (TOKENS + 8) // block
        running = {n for g in seen for n in g["running_lora_adapters"].split(",") if n}
        waiting = {n for g in seen for n in g["waiting_lora_adapters"].split(",") if n}
        assert running == {"alpha", "beta"}
        assert waiting and waiting <= {"alpha", "beta"}
        assert all(g["max_lora"] == str(MAX_LORA) for g in seen)
        assert max(g["info_time"] for g in seen) > idle["info_time"]  # the value is the update time

        deadline = time.monotonic() + 5
        while (after := gauges(srv.url))["num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the idle worker refreshes its gauges every half second
        after = gauges(srv.url)
        assert after["num_requests_running"] == 0 and after["num_requests_waiting"] == 0
        assert after["kv_cache_usage_perc"] == 0
        assert httpx.get(f"{srv.url}/health/ready", timeout=10).json()["kv_cache"]["blocks_used"] == 0
        assert after["running_lora_adapters"] == "" and after["waiting_lora_adapters"] == ""
        assert after["info_time"] >= time.time() - 5

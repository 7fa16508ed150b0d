"""Pinned residency: pinned adapters load at once, are never evicted and survive a worker restart;
the loaded-adapter metrics say exactly what the cache holds, read by a live Prometheus; and a churn
of 1,000 loads and evictions of distinct adapters leaves the worker's memory flat.

The engine part drives ``Engine`` in-process on the tiny base; the rest is the real server on
loopback (``testing.server``) with tiny uploaded adapters (``testing.weights.lora_files``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loracore.artifact import CONFIG_FILE, WEIGHTS_FILE
from testing.server import running_server
from testing.weights import lora_files, upload_files

TINY = (2, 64)  # n_layer, n_embd of the tiny base (tests/conftest.py TINY_SHAPE)


def _write_adapter(adapter_dir: Path, name: str, seed: int, r: int = 2) -> None:
    config, weights = lora_files(*TINY, r=r, seed=seed)
    folder = adapter_dir / name
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(config)
    (folder / WEIGHTS_FILE).write_bytes(weights)


# --- the engine's cache ---------------------------------------------------------------------------


def _serve(engine, rid: str, adapter: str) -> None:
    from service.engine import GenerationRequest, SamplingParams

    engine.add(GenerationRequest(rid, [1, 2, 3], adapter, SamplingParams(max_new_tokens=2, temperature=0)))
    while engine.has_active():
        for ev in engine.step().events:
            assert ev.error is None, ev.error


def test_pinned_adapters_load_at_once_and_are_never_evicted(tiny_base: Path, tmp_path: Path) -> None:
    from service.engine import AdapterCacheFull, Engine, GenerationRequest, SamplingParams

    adapters = tmp_path / "adapters"
    for i, name in enumerate("abcde"):
        _write_adapter(adapters, name, seed=i)
    engine = Engine(tiny_base, adapters, max_loaded_adapters=2)
    cache = engine.adapters

    cache.set_pins(frozenset({"a"}))  # loaded with no request naming it
    assert [(e["name"], e["pinned"]) for e in cache.stats()["loaded"]] == [("a", True)]
    for i, name in enumerate("bcdbc"):  # LRU churn through the one free entry
        _serve(engine, f"r{i}", name)
    assert sorted(cache.loaded()) == ["a", "c"]
    assert cache.stats()["evictions"] == 4

    cache.set_pins(frozenset({"a", "b"}))  # b evicts c, the idle unpinned entry
    assert sorted(cache.loaded()) == ["a", "b"] and cache.free_slots() == 0
    with pytest.raises(AdapterCacheFull, match="pinned adapters take 2 of the 2 slots"):
        engine.add(GenerationRequest("full", [1, 2], "d", SamplingParams(max_new_tokens=2)))
    _serve(engine, "pinned-ok", "b")  # a pinned one serves

    cache.set_pins(frozenset({"b"}))  # a unpinned: evictable again, d can load
    _serve(engine, "d-now", "d")
    assert sorted(cache.loaded()) == ["b", "d"]

    # a new version of a pinned name is loaded and pinned by the next sync; the old one is evictable
    (adapters / "b" / WEIGHTS_FILE).unlink()
    (adapters / "b" / WEIGHTS_FILE).write_bytes(lora_files(*TINY, r=2, seed=99)[1])
    cache.sync_pins()
    pinned = [e for e in cache.stats()["loaded"] if e["pinned"]]
    assert [e["name"] for e in pinned] == ["b"] and len(cache.entries) == 2
    assert pinned[0]["version"] == cache.disk_version("b").id


# --- the real server ------------------------------------------------------------------------------


def scrape(url: str) -> dict:
    """The loaded-adapter metrics of one ``/metrics`` scrape."""
    out: dict = {"loaded": {}, "num": None, "max": None, "load_count": 0.0, "misses": 0.0, "evictions": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "loraserve_lora_adapter_loaded":
                out["loaded"][(s.labels["adapter_name"], s.labels["version"])] = s.labels
            elif s.name == "loraserve_num_loaded_lora_adapters":
                out["num"] = s.value
            elif s.name == "loraserve_max_loaded_lora_adapters":
                out["max"] = s.value
            elif s.name == "loraserve_lora_adapter_load_seconds_count":
                out["load_count"] += s.value
            elif s.name == "loraserve_adapter_cache_misses_total":
                out["misses"] += s.value
            elif s.name == "loraserve_adapter_cache_evictions_total":
                out["evictions"] += s.value
    return out


def resident(url: str) -> dict[str, bool]:
    """Adapter name -> pinned, as the metrics say."""
    return {name: labels["pinned"] == "true" for (name, _), labels in scrape(url)["loaded"].items()}


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:.0f} s")
        time.sleep(0.1)


def worker_pid(data: Path) -> int | None:
    try:
        return json.loads((data / "worker-status.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):  # rewritten by a starting worker
        return None


def generate(client: httpx.Client, adapter: str) -> httpx.Response:
    return client.post("/generate", json={"prompt": "hi", "adapter": adapter, "max_new_tokens": 1})


@pytest.mark.slow
def test_pins_over_http_metrics_in_prometheus_and_pins_survive_a_worker_restart(
    tiny_base: Path, tmp_path: Path
) -> None:
    from tests.helpers.prometheus import by_label, query, running_prometheus, wait_for

    adapters, data = tmp_path / "adapters", tmp_path / "data"
    with running_server(tiny_base, adapters, data, args=["--max-loaded-adapters", "2"]) as srv:
        c = srv.client()
        r = c.put("/adapters/a", files=upload_files(*lora_files(*TINY, r=2, seed=1)), data={"pinned": "true"})
        assert r.status_code == 201 and r.json()["pinned"] is True, r.text
        for seed, name in enumerate("bc", start=2):
            r = c.put(f"/adapters/{name}", files=upload_files(*lora_files(*TINY, r=4, seed=seed)))
            assert r.status_code == 201 and r.json()["pinned"] is False, r.text
        # loaded at once: no request named it
        assert wait_until(lambda: resident(srv.url) == {"a": True}, 10, "a loaded as pinned")

        r = c.put("/adapters/b/pin")
        assert r.status_code == 200 and r.json()["pinned"] is True, r.text
        r = c.put("/adapters/c/pin")
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "adapter_pin_limit" and "--max-loaded-adapters 2" in err["message"], err
        assert c.put("/adapters/nope/pin").json()["error"]["code"] == "adapter_not_found"
        r = c.put("/adapters/d", files=upload_files(*lora_files(*TINY, seed=4)), data={"pinned": "true"})
        assert r.status_code == 409 and c.get("/adapters/d").status_code == 404, r.text  # nothing written
        r = c.put("/adapters/d", files=upload_files(*lora_files(*TINY, seed=4)), data={"pinned": "maybe"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "pinned", r.text
        assert wait_until(lambda: resident(srv.url) == {"a": True, "b": True}, 10, "a and b pinned")
        # every slot pinned: an unpinned adapter can never load, and says so at once
        r = generate(c, "c")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_cache_full", r.text
        assert generate(c, "b").status_code == 200

        target = srv.url.removeprefix("http://")
        with running_prometheus(target, tmp_path / "prom") as prom:

            def loaded_in_prometheus() -> dict[str, str]:
                result = query(prom, "loraserve_lora_adapter_loaded == 1")
                return {s["metric"]["adapter_name"]: s["metric"]["pinned"] for s in result}

            wait_for(prom, "loraserve_lora_adapter_loaded", lambda r: len(r) == 2)
            assert loaded_in_prometheus() == {"a": "true", "b": "true"}
            ranks = by_label(query(prom, "sum by (rank) (loraserve_lora_adapter_loaded)"), "rank")
            assert ranks == {"2": 1.0, "4": 1.0}
            assert by_label(query(prom, "loraserve_num_loaded_lora_adapters"), "job") == {"loraserve": 2.0}
            assert by_label(query(prom, "loraserve_max_loaded_lora_adapters"), "job") == {"loraserve": 2.0}
            count = query(prom, "sum(loraserve_lora_adapter_load_seconds_count)")
            assert float(count[0]["value"][1]) >= 2

            r = c.delete("/adapters/b/pin")
            assert r.status_code == 200 and r.json()["pinned"] is False, r.text
            assert generate(c, "c").status_code == 200  # b, unpinned, is evicted for c
            want = {"a": "true", "c": "false"}
            wait_for(
                prom,
                "loraserve_lora_adapter_loaded",
                lambda r: len(r) == 2 and loaded_in_prometheus() == want,
            )
            assert loaded_in_prometheus() == want
            total = query(
                prom, "sum(loraserve_lora_adapter_loaded) - sum(loraserve_num_loaded_lora_adapters)"
            )
            assert float(total[0]["value"][1]) == 0

        # the pins survive a worker restart: the new worker loads a before any request
        old = worker_pid(data)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: worker_pid(data) not in (old, None) and resident(srv.url) == {"a": True},
            120,
            "a reloaded",
        )
        listed = {a["name"]: a["pinned"] for a in c.get("/adapters").json()["adapters"]}
        assert listed == {"a": True, "b": False, "c": False}
        # a delete drops the pin
        assert c.delete("/adapters/a").status_code == 200
        assert json.loads((adapters / ".pins.json").read_text()) == {"pinned": []}
        c.close()


CYCLES = 1000  # load/evict cycles of distinct adapters, measured after a warm-up pass over the same ones
PER_REQUEST = 8  # adapters per request: a composition of 8 loads 8 (and evicts the 8 before)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
def test_a_thousand_load_evict_cycles_leave_memory_flat_and_metrics_exact(
    tiny_base: Path, tmp_path: Path
) -> None:
    """1,000 distinct adapter names over one r=64 file (hard links: ~200 KB of weights per load, so
    keeping the evicted ones would add ~200 MB), 8 cache slots, each request a composition of 8 of them.

    A warm-up pass serves every name once first: the per-adapter series of the request metrics
    (``generated_tokens_total{adapter}``, ...) are created then, and they stay by design (one set per
    adapter name served, not per load). The measured pass loads and evicts each of them again."""
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    _write_adapter(adapters, "proto", seed=7, r=64)
    names = [f"churn-{i:04d}" for i in range(CYCLES)]
    for name in names:
        (adapters / name).mkdir()
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            os.link(adapters / "proto" / f, adapters / name / f)
    groups = [names[i : i + PER_REQUEST] for i in range(0, CYCLES, PER_REQUEST)]
    args = ["--max-loaded-adapters", str(PER_REQUEST), "--max-batch-size", "2"]
    with running_server(tiny_base, adapters, data, args=args) as srv, srv.client() as c:
        pid = worker_pid(data)
        assert pid is not None

        def churn() -> None:
            for group in groups:
                body = {
                    "prompt": "hi",
                    "adapters": [{"name": n, "weight": 0.1} for n in group],
                    "max_new_tokens": 1,
                }
                r = c.post("/generate", json=body)
                assert r.status_code == 200, r.text

        churn()
        warm = rss_bytes(pid)
        t0 = time.monotonic()
        churn()
        seconds = time.monotonic() - t0
        after = rss_bytes(pid)
        growth = after / warm - 1
        print(
            f"{CYCLES} load/evict cycles in {seconds:.1f} s; worker RSS {warm >> 20} -> {after >> 20} MiB "
            f"({growth:+.2%})"
        )
        assert growth < 0.02, f"worker RSS grew {growth:.2%} over {CYCLES} cycles ({warm} -> {after} bytes)"

        # the cache holds exactly what the metrics say: the last group, and loads - evictions of them
        m = wait_until(lambda: (m := scrape(srv.url))["num"] == PER_REQUEST and m, 10, "a full cache")
        assert {name for name, _ in m["loaded"]} == set(groups[-1]) and len(m["loaded"]) == PER_REQUEST
        assert m["max"] == PER_REQUEST and m["misses"] == m["load_count"] == 2 * CYCLES
        assert m["misses"] - m["evictions"] == m["num"] == PER_REQUEST
        assert worker_pid(data) == pid  # one worker throughout

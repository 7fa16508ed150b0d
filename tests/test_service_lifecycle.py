"""The server as an operator meets it: start-up on random weights (``make run``), API keys,
overload and deadlines, and SIGTERM taking down every process it started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.__main__ import metrics_dir, parse_settings
from service.settings import Settings
from testing.procs import cmdline, group_members
from testing.server import REPO, Server, running_server
from trainer.hardware import default_dtype

KEY = "test-key-0123456789"
LONG = 4000  # tokens: a request that runs for seconds on the tiny base (measured 5.7 s, idle 2-core box)


def test_refuses_unavailable_weights_unless_random_allowed(tmp_path: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model",
        "distilgpt2",
        "--adapter-dir",
        str(tmp_path / "a"),
        "--data-dir",
        str(tmp_path / "d"),
        "--port",
        "18999",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "distilgpt2" in done.stderr and "--allow-random-weights" in done.stderr


def test_random_weights_api_key_and_sigterm(tmp_path: Path):
    """``make run`` on a machine without distilgpt2: random weights, loudly, and readiness says so."""
    data = tmp_path / "data"
    with running_server(
        "distilgpt2", tmp_path / "adapters", data, api_key=KEY, args=["--allow-random-weights"]
    ) as srv:
        ready = httpx.get(f"{srv.url}/health/ready").json()  # open without the key
        batch = ready.pop("batch")  # what the batch's capacity was derived from (distilgpt2's KV shape)
        element = 4 if ready["dtype"] == "float32" else 2  # the cache follows the weights' dtype
        assert batch["kv_bytes_per_token"] == 2 * 6 * 768 * element and batch["row_tokens"] == 1024
        assert batch["rows"] >= 1 and batch["cap"] is None and batch["limited_by"] != "max_batch_size"
        # the KV reservation in blocks of one 4 KiB page per 64-wide head, none in use while idle
        kv = ready.pop("kv_cache")
        block = 4096 // (64 * element)
        assert kv["block_bytes"] == block * batch["kv_bytes_per_token"] and kv["block_tokens"] == block
        assert kv["blocks_total"] == batch["rows"] * 1024 // block
        assert (kv["blocks_used"], kv["usage"]) == (0, 0)
        assert ready == {
            "status": "ready",
            "role": "all",
            "model": "distilgpt2",
            "device": "cpu",
            "dtype": default_dtype("cpu"),
            "weights": "random",
            "random_weights": True,
            "detail": None,
        }
        assert "RANDOM WEIGHTS" in srv.log_path.read_text()
        assert (data / "models").is_dir()

        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        for method, path in (
            ("GET", "/adapters"),
            ("POST", "/generate"),
            ("GET", "/train"),
            ("GET", "/adapters/x"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
        ):
            r = httpx.request(method, f"{srv.url}{path}", json={"prompt": "hi"})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "missing_api_key" and "WWW-Authenticate" in r.headers
            r = httpx.request(method, f"{srv.url}{path}", headers={"X-API-Key": KEY + "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{srv.url}/adapters", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{srv.url}/adapters", headers={"X-API-Key": KEY}).status_code == 200
        with srv.client() as client:
            r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

        # Every part of the tree is there before SIGTERM: manager, generation worker, API server, job runner.
        members = group_members(srv.proc.pid)
        cmdlines = [cmdline(pid) for pid, _ in members]
        assert len(members) >= 5, cmdlines
        assert sum("spawn_main" in c for c in cmdlines) >= 2  # generation worker + job runner
    # Leaving the block sent SIGTERM and checked that the whole group is gone.
    assert srv.stop_seconds is not None and srv.stop_seconds < 10
    assert srv.proc.returncode == 0
    assert "signal SIGTERM: shutting down" in srv.log_path.read_text()


def test_overload_and_deadline(distil_base: Path, tmp_path: Path):
    """One row, one queue slot, a 1 s deadline: long requests time out (504), the rest get 503.

    The distilgpt2 shape, not the tiny base: a decode step of the tiny model can take well under a
    millisecond on an idle machine, so 240 tokens could beat any deadline short enough to test.
    """
    args = ["--max-batch-size", "1", "--max-queue", "1", "--request-timeout", "1.0"]
    server = running_server(distil_base, tmp_path / "a", tmp_path / "d", args=args)
    with server as srv, srv.client() as client:
        body = {"prompt": "Count:", "max_new_tokens": 240, "temperature": 0, "raw": True}
        start = time.monotonic()
        r = client.post("/generate", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 5

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: client.post("/generate", json=body), range(6)))
        codes = sorted(r.status_code for r in results)
        assert set(codes) <= {503, 504} and codes.count(503) >= 3, codes
        for r in results:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "overloaded"

        with client.stream("POST", "/generate", json=dict(body, stream=True)) as r:
            lines = [line for line in r.iter_lines() if line]
        if r.status_code == 200:  # the first token came before the deadline, the end did not
            assert '"code":"timeout"' in lines[-1].replace(" ", "") and "data: [DONE]" not in lines
        else:  # a slow machine: not even the first token in time
            assert r.status_code == 504

        # The worker dropped what timed out, so short requests go through again (retried: the
        # deadline is tight for a loaded machine).
        small = [
            client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1, "temperature": 0}).status_code
            for _ in range(5)
        ]
        assert 200 in small, small


def _samples(text: str, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_metrics_folder_precedence(tmp_path: Path):
    """A preset PROMETHEUS_MULTIPROC_DIR wins, then --metrics-dir / LORASERVE_METRICS_DIR, then data-dir."""
    plain = Settings(data_dir=tmp_path / "d")
    assert metrics_dir(plain, {}) == tmp_path / "d" / "prometheus"
    chosen = parse_settings(["--data-dir", str(tmp_path / "d"), "--metrics-dir", str(tmp_path / "m")])
    assert metrics_dir(chosen, {}) == tmp_path / "m"
    assert metrics_dir(chosen, {"PROMETHEUS_MULTIPROC_DIR": "/scratch/x"}) == Path("/scratch/x")
    assert metrics_dir(chosen, {"PROMETHEUS_MULTIPROC_DIR": ""}) == tmp_path / "m"  # empty is unset


@dataclass
class ScratchServer:
    srv: Server
    scratch: Path  # the preset PROMETHEUS_MULTIPROC_DIR
    data: Path
    base: Path


@pytest.fixture(scope="module")
def scratch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScratchServer]:
    """A server as the container runs it (metrics on local scratch named by PROMETHEUS_MULTIPROC_DIR,
    with an earlier run's files there), on a tiny base with a long context so a request can run long."""
    from trainer.model import make_random_base

    root = tmp_path_factory.mktemp("scratch-server")
    base = make_random_base(root / "tiny-long", n_layer=2, n_embd=64, n_head=2, n_positions=4096, seed=0)
    scratch = root / "scratch" / "metrics"
    scratch.mkdir(parents=True)
    (scratch / "counter_999999.db").write_bytes(b"an earlier run's values")  # unreadable if left there
    (scratch / "notes.txt").write_text("not a metrics file")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(scratch)}
    # a long deadline: admission would refuse two LONG rows that a loaded machine cannot finish in
    # the default 120 s, and these tests are about what happens once a request runs
    args = ["--max-new-tokens-cap", str(LONG), "--request-timeout", "900", "--max-batch-size", "16"]
    with running_server(base, root / "adapters", root / "data", env=env, args=args) as srv:
        yield ScratchServer(srv, scratch, root / "data", base)


def test_preset_metrics_folder_is_used_and_emptied_at_start(scratch_server: ScratchServer):
    """As in the container: metrics on local scratch named by PROMETHEUS_MULTIPROC_DIR, not the data dir."""
    scratch = scratch_server.scratch
    assert not (scratch / "counter_999999.db").exists()
    assert (scratch / "notes.txt").read_text() == "not a metrics file"  # only *.db files are removed
    with scratch_server.srv.client() as client:
        before = client.get("/metrics").text
        r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        after = client.get("/metrics").text
    ok = (("endpoint", "/generate"), ("status", "200"))
    requests = [_samples(t, "loraserve_requests_total").get(ok, 0) for t in (before, after)]
    assert requests[1] - requests[0] == 1
    tokens = [
        _samples(t, "loraserve_generated_tokens_total").get((("adapter", "__base__"),), 0)
        for t in (before, after)
    ]
    assert tokens[1] - tokens[0] == 3
    files = sorted(p.name for p in scratch.glob("*.db"))
    assert any(f.startswith("counter_") for f in files) and any(f.startswith("histogram_") for f in files)
    writers = {int(f.rsplit("_", 1)[1].removesuffix(".db")) for f in files}
    assert len(writers) >= 2, files  # the API server and the generation worker write there
    assert not (scratch_server.data / "prometheus").exists()


def test_a_client_that_leaves_stops_its_non_streamed_generation(scratch_server: ScratchServer):
    """Non-streamed /generate and /v1/completions: the worker drops the job when the client goes away.

    Each request asks for LONG tokens (sampled with a seed that runs to the length, measured) and the
    client gives up after half a second; the worker must stop generating for it at once, long before
    LONG tokens, and the route counts a 499.
    """
    srv = scratch_server.srv
    cases = [
        ("/generate", {"prompt": "Count:", "max_new_tokens": LONG, "raw": True}, 1),
        (
            "/v1/completions",
            {"model": str(scratch_server.base), "prompt": "Count:", "max_tokens": LONG, "n": 2},
            2,
        ),
    ]
    for path, body, rows in cases:
        body = {**body, "temperature": 1.0, "seed": 7}
        before = _scrape(srv)
        timeout = httpx.Timeout(30.0, read=0.5)
        with httpx.Client(base_url=srv.url, timeout=timeout) as client, pytest.raises(httpx.ReadTimeout):
            client.post(path, json=body)
        left = time.monotonic()
        while (now := _scrape(srv))["running"] > 0:
            assert time.monotonic() - left < 10, f"{path}: still generating 10 s after the client left"
            time.sleep(0.1)
        stopped_after = time.monotonic() - left
        generated = now["tokens"] - before["tokens"]
        assert generated < rows * LONG // 2, (path, generated)
        assert stopped_after < 5, (path, stopped_after)
        assert now["requests"].get((path, "499"), 0) - before["requests"].get((path, "499"), 0) == 1
        time.sleep(0.5)
        assert _scrape(srv)["tokens"] == now["tokens"]  # nothing more for it later either


def _scrape(srv: Server) -> dict:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    running = _samples(text, "loraserve_num_requests_running")
    requests = _samples(text, "loraserve_requests_total")
    return {
        "running": sum(running.values()),
        "tokens": _samples(text, "loraserve_generated_tokens_total").get((("adapter", "__base__"),), 0),
        "requests": {(dict(k)["endpoint"], dict(k)["status"]): v for k, v in requests.items()},
    }

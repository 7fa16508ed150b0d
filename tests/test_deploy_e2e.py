"""End to end: a real Prometheus (Debian's `prometheus` binary) scrapes the real server on loopback.

The test starts the service on the tiny random-weights base, starts Prometheus with the repo's own
scrape config and alert rules (retargeted to the server's port, 1 s intervals, a temporary storage
folder), makes a known number of `/generate` requests, and asks Prometheus, through its HTTP API,
how many there were. Then every dashboard query runs against the live data. Both processes are
bounded in time and stopped by their pids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from testing.server import running_server
from tests.helpers.prometheus import binary, by_label, query, running_prometheus, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "loraserve.json"
sys.path.insert(0, str(ROOT / "scripts"))

import check_dashboards  # noqa: E402

GENERATE_OK = 5  # /generate requests answered 200
GENERATE_404 = 1  # one naming an adapter that does not exist
# Dashboard queries over the serving path must return data once those requests were made.
MUST_HAVE_DATA = (
    "loraserve_requests_total",
    "loraserve_request_duration_seconds_bucket",
    "loraserve_time_to_first_token_seconds_bucket",
    "loraserve_generated_tokens_total",
    "loraserve_prompt_tokens_total",
    "loraserve_batch_size_bucket",
    "loraserve_queue_wait_seconds_bucket",
    "loraserve_model_info",
    "loraserve_num_requests_running",
    "loraserve_kv_cache_usage_perc",
    "loraserve_lora_requests_info",
    "loraserve_num_loaded_lora_adapters",
    "loraserve_max_loaded_lora_adapters",
)


@pytest.mark.slow
def test_prometheus_scrapes_the_service_and_counts_generate_requests(tiny_base: Path, tmp_path: Path) -> None:
    promtool = binary("promtool")  # fail before the slow part if it is missing
    with running_server(tiny_base, tmp_path / "adapters", tmp_path / "data", api_key="e2e-key") as srv:
        target = srv.url.removeprefix("http://")
        with running_prometheus(target, tmp_path / "prom") as prom:
            up = wait_for(prom, 'up{job="loraserve"}', lambda r: by_label(r, "instance").get(target) == 1.0)
            assert by_label(up, "instance") == {target: 1.0}, "Prometheus never scraped the service"

            with srv.client() as client:
                for i in range(GENERATE_OK):
                    r = client.post("/generate", json={"prompt": f"hello {i}", "max_new_tokens": 4})
                    assert r.status_code == 200, r.text
                r = client.post("/generate", json={"prompt": "hi", "adapter": "no-such-adapter"})
                assert r.status_code == 404, r.text
                metrics_text = client.get("/metrics").text

            expr = 'sum by (status) (loraserve_requests_total{job="loraserve", endpoint="/generate"})'
            want = {"200": GENERATE_OK, "404": GENERATE_404}
            result = wait_for(prom, expr, lambda r: by_label(r, "status") == want)
            assert by_label(result, "status") == want
            total = query(prom, 'sum(loraserve_requests_total{endpoint="/generate"})')
            assert float(total[0]["value"][1]) == GENERATE_OK + GENERATE_404

            # Tokens per adapter: the base model's rows carry the label "__base__".
            tokens = by_label(query(prom, "sum by (adapter) (loraserve_generated_tokens_total)"), "adapter")
            assert set(tokens) == {"__base__"} and 0 < tokens["__base__"] <= GENERATE_OK * 4

            # Every dashboard query runs on the live data; the serving panels have some.
            time.sleep(2)  # at least two samples of every series inside the rate window
            dashboard = json.loads(DASHBOARD.read_text())
            empty = []
            for q in check_dashboards.dashboard_queries(dashboard, DASHBOARD.name):
                expr = q.expr.replace("[1m]", "[30s]")  # rate windows that this short run fills
                result = query(prom, expr)
                if not result and any(m in expr for m in MUST_HAVE_DATA):
                    empty.append(q.where)
            assert not empty, f"dashboard queries with no data after serving requests: {empty}"

            # The repo's rules load and evaluate without errors on real series.
            rules = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
            assert health and set(health.values()) == {"ok"}, health

    # The exposition itself passes Prometheus' own lint (names, suffixes, help, types).
    lint = subprocess.run([promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

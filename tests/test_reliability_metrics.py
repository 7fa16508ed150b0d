"""``/metrics`` stays bounded under mixed traffic over many adapters, against the real server.

Fifty adapters, six clients each naming a random one per request, a batch of four rows: the adapters
running and waiting change many times a second. In multiprocess mode a label set can never be
dropped, so a gauge labelled with those combinations (``loraserve_lora_requests_info`` was one) would
add a series for each combination it ever saw. The test runs a first phase in which every adapter
is used, counts the series, runs a second phase of the same traffic (seeing combinations the first
did not), and counts again: the same series, and at most one ``lora_requests_info`` series in every
scrape, naming what runs now. The residency gauge (``loraserve_lora_adapter_loaded``) names what the
cache holds now: at most ``--max-loaded-adapters`` series in every scrape, whichever adapters they are.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.server import Server, running_server
from testing.weights import lora_files, upload_files

N_ADAPTERS = 50
CLIENTS = 6
INFO = "loraserve_lora_requests_info"
LOADED = "loraserve_lora_adapter_loaded"
MAX_LOADED = 8
MAX_PHASE_S = 90


@pytest.fixture(scope="module")
def srv(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("rel-metrics")
    args = ["--max-batch-size", "4", "--max-loaded-adapters", str(MAX_LOADED), "--request-timeout", "60"]
    with running_server(tiny_base, root / "adapters", root / "data", args=args) as s:
        with s.client() as c:
            for i in range(N_ADAPTERS):
                r = c.put(f"/adapters/a{i:02d}", files=upload_files(*lora_files(2, 64, seed=i)))
                assert r.status_code == 201, r.text
        yield s


def _series(text: str) -> tuple[set[tuple], list[dict[str, str]], int]:
    """Every series of a scrape as (sample name, labels) but the residency gauge's, the labels of the info
    gauge's series, and the number of residency series."""
    keys, info, loaded = set(), [], 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == LOADED:
                loaded += 1
                continue
            keys.add((s.name, tuple(sorted(s.labels.items()))))
            if s.name == INFO:
                info.append(s.labels)
    return keys, info, loaded


class Traffic:
    """``CLIENTS`` threads sending short greedy requests on random adapters; a scraper reads the info
    gauge all along."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.statuses: list[int] = []
        self.combos: set[tuple[str, str]] = set()
        self.most_info_series = 0
        self.most_loaded_series = 0

    def scrape(self) -> tuple[set[tuple], list[dict[str, str]]]:
        keys, info, loaded = _series(httpx.get(f"{self.srv.url}/metrics", timeout=30).text)
        self.most_info_series = max(self.most_info_series, len(info))
        self.most_loaded_series = max(self.most_loaded_series, loaded)
        for labels in info:
            self.combos.add((labels["running_lora_adapters"], labels["waiting_lora_adapters"]))
        return keys, info

    def run(self, enough: Callable[[], bool], seed: int, first: Sequence[str] = ()) -> None:
        """Send requests until ``enough()`` says so (checked between scrapes, at most ``MAX_PHASE_S``),
        naming every adapter of ``first`` once before the random ones."""
        todo = list(first)
        lock = threading.Lock()
        done = threading.Event()

        def client(k: int) -> None:
            rng = random.Random(seed * 100 + k)
            with self.srv.client(timeout=60) as c:
                while True:
                    with lock:
                        if not todo and done.is_set():
                            return
                        name = todo.pop() if todo else f"a{rng.randrange(N_ADAPTERS):02d}"
                    body = {"prompt": "Count:", "adapter": name, "max_new_tokens": rng.randint(1, 12)}
                    r = c.post("/generate", json={**body, "temperature": 0})
                    with lock:
                        self.statuses.append(r.status_code)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + MAX_PHASE_S
        while any(t.is_alive() for t in threads):
            self.scrape()
            if enough() or time.monotonic() > deadline:
                done.set()
            time.sleep(0.3)
        for t in threads:
            t.join()

    def settled(self) -> set[tuple]:
        """The series once the worker is idle again (its idle state written)."""
        deadline = time.monotonic() + 10
        while True:
            keys, info = self.scrape()
            if info and not info[0]["running_lora_adapters"] and not info[0]["waiting_lora_adapters"]:
                return keys
            assert time.monotonic() < deadline, f"the info gauge never returned to idle: {info}"
            time.sleep(0.2)


def test_series_stay_bounded_under_changing_adapter_mixes(srv: Server) -> None:
    traffic = Traffic(srv)
    t0 = time.monotonic()
    # phase 1: every adapter named once, and the mixes have changed a few times
    traffic.run(lambda: len(traffic.combos) >= 10, seed=1, first=[f"a{i:02d}" for i in range(N_ADAPTERS)])
    first, combos_first = traffic.settled(), set(traffic.combos)
    # phase 2: at least as long again, until it has shown mixes the first phase never did
    t1 = time.monotonic()
    end = t1 + (t1 - t0)
    traffic.run(lambda: time.monotonic() >= end and len(traffic.combos - combos_first) >= 10, seed=2)
    second = traffic.settled()

    assert set(traffic.statuses) == {200}, sorted(set(traffic.statuses))
    new_combos = traffic.combos - combos_first
    # a gauge keeping every label set would have grown by these
    assert len(combos_first) >= 10 and len(new_combos) >= 10, (len(combos_first), len(new_combos))
    assert traffic.most_info_series == 1  # one series: the current state
    assert traffic.most_loaded_series == MAX_LOADED  # what the cache holds now, never more
    assert second == first, {"new": sorted(second - first)[:20], "gone": sorted(first - second)[:20]}
    adapters_named = {dict(labels).get("adapter") for _, labels in first}
    assert {f"a{i:02d}" for i in range(N_ADAPTERS)} <= adapters_named  # every adapter has its counters


def test_the_info_gauge_is_the_workers_current_state_or_nothing(tmp_path: Path) -> None:
    """``WorkerStatusCollector`` reads the status file the worker writes: idle, busy, stale, gone."""
    import os
    import subprocess
    import sys

    from service.metrics import WorkerStatusCollector
    from service.worker_status import Load, write_status

    path, now = tmp_path / "worker-status.json", time.time()
    collector = WorkerStatusCollector(path, clock=lambda: now)

    def samples(name: str = INFO) -> list[tuple[dict[str, str], float]]:
        (family,) = [f for f in collector.collect() if f.name == name]
        return [(s.labels, s.value) for s in family.samples]

    def status(load: Load, **extra) -> None:
        write_status(path, {"status": "ready", "max_loaded_adapters": 8, "load": load.to_dict(), **extra})

    assert samples() == []  # no worker yet
    status(Load(0, 0, now - 100))
    idle = {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert samples() == [(idle, now)]  # idle stands until the worker writes again: the scrape's time
    status(Load(1, 2, now - 0.1, running_adapters=("a", "b"), waiting_adapters=("c",)))
    busy = {"max_lora": "8", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
    assert samples() == [(busy, round(now - 0.1, 3))]
    # what the adapter cache holds: one series per version, the count and the capacity
    cache = [
        {"name": "a", "version": "f" * 64, "pinned": True, "rank": 8},
        {"name": "b", "version": "e" * 64, "pinned": False, "rank": None},
    ]
    status(Load(0, 0, now), adapter_cache=cache)
    assert samples(LOADED) == [
        ({"adapter_name": "a", "version": "f" * 64, "pinned": "true", "rank": "8"}, 1.0),
        ({"adapter_name": "b", "version": "e" * 64, "pinned": "false", "rank": ""}, 1.0),
    ]
    assert samples("loraserve_num_loaded_lora_adapters") == [({}, 2.0)]
    assert samples("loraserve_max_loaded_lora_adapters") == [({}, 8.0)]
    status(Load(1, 2, now - 60, running_adapters=("a",)), adapter_cache=cache)
    assert samples() == []  # a busy state not refreshed for a minute: the worker is hung
    assert samples(LOADED) == [] and samples("loraserve_num_loaded_lora_adapters") == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    write_status(path, {"status": "ready", "load": Load(0, 0, now).to_dict()})
    body = path.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {int(gone.stdout)}')
    path.write_text(body)
    assert samples() == []  # the worker's process is gone
    write_status(path, {"status": "starting"})
    assert samples() == []

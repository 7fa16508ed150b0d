"""Every Prometheus metric the service exports, defined once.

LitServe runs the API servers, the generation worker and the job runner in separate processes,
so metrics use prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR must be set (and
the folder wiped) by the main process *before* this module is imported anywhere; ``/metrics``
serves a registry holding a MultiProcessCollector, so each family appears exactly once, and a
``WorkerStatusCollector``. A multiprocess gauge can never drop a label set, so a gauge whose labels
name adapters would keep every combination it ever had; those are ``StatusGauge``s instead, read
from the worker's status file at scrape time: one series, the current state.
The Grafana dashboard and the alert rules in deploy/ name these metrics; a test keeps them honest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.worker_status import pid_alive, read_cache, read_load, read_status

if TYPE_CHECKING:
    from service.engine.cache import CacheActivity
    from service.engine.types import StepReport

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# --- HTTP (API server processes) -------------------------------------------------------------
REQUESTS = Counter("loraserve_requests_total", "HTTP requests answered", ["endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "loraserve_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS
)

# --- generation (worker process) -------------------------------------------------------------
QUEUE_WAIT_SECONDS = Histogram(
    "loraserve_queue_wait_seconds", "time from arrival to joining a batch", buckets=FAST_BUCKETS
)
TTFT_SECONDS = Histogram(
    "loraserve_time_to_first_token_seconds",
    "arrival to first generated token",
    ["adapter"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "loraserve_inter_token_latency_seconds",
    "time between generated tokens of one request",
    buckets=FAST_BUCKETS,
)
BATCH_SIZE = Histogram("loraserve_batch_size", "rows in a decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
PROMPT_TOKENS = Counter("loraserve_prompt_tokens_total", "prompt tokens processed", ["adapter"])
GENERATED_TOKENS = Counter("loraserve_generated_tokens_total", "tokens generated", ["adapter"])
# The next four are the Kubernetes Inference Gateway's model-server protocol (its endpoint picker
# is told these names; deploy/k8s/overlays/inference-gateway): keep names and meanings as they are.
REQUESTS_RUNNING = Gauge(
    "loraserve_num_requests_running", "requests in the running batch", multiprocess_mode="livesum"
)
REQUESTS_WAITING = Gauge(
    "loraserve_num_requests_waiting",
    "requests the worker admitted that are not yet in the batch",
    multiprocess_mode="livesum",
)
KV_CACHE_USAGE = Gauge(
    "loraserve_kv_cache_usage_perc",
    "fraction (0-1) of the KV cache's blocks (batch rows x context length) holding live tokens",
    multiprocess_mode="livemax",
)
# The prefix cache (service/engine/prefix.py): vLLM's prefix_cache_queries / prefix_cache_hits, in tokens.
PREFIX_CACHE_QUERIES = Counter(
    "loraserve_prefix_cache_queries_total", "prompt tokens of the rows that looked up the prefix cache"
)
PREFIX_CACHE_HITS = Counter(
    "loraserve_prefix_cache_hits_total", "prompt tokens whose KV came from the prefix cache (not prefilled)"
)
PREFIX_CACHE_BYTES = Gauge(
    "loraserve_prefix_cache_bytes",
    "bytes the prefix cache's blocks hold (within the KV cache budget)",
    multiprocess_mode="livemax",
)
# The Inference Gateway's optional cache_config_info (vLLM's): value 1; block_size in tokens, num_gpu_blocks
# the blocks the KV budget holds (running rows and cached prefixes share them). Exported with the prefix
# cache on only: a prefix-aware picker has nothing to find on a server with it off.
CACHE_CONFIG_INFO = Gauge(
    "loraserve_cache_config_info",
    "constant 1, labelled with the KV cache's block size (tokens) and the blocks its budget holds",
    ["block_size", "num_gpu_blocks"],
    multiprocess_mode="livemax",
)


@dataclass(frozen=True)
class StatusGauge:
    """A gauge exported from the worker's status file (``WorkerStatusCollector``), not from the
    multiprocess files: at most one series, the worker's current state."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]


# vLLM's lora_requests_info: the value is the time of the last update, the labels say what runs.
# One series: the state the worker last published (it rewrites it every LOAD_EVERY_S while busy and
# when it turns idle; an idle state stands until the worker writes another, so its time is the scrape's).
LORA_REQUESTS_INFO = StatusGauge(
    "loraserve_lora_requests_info",
    "time of the last update; labels: adapters a batch can hold, adapters running and waiting",
    ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
)

# What the adapter cache holds (vLLM's lora_adapter_loaded, llm-d's routing on residency): one series
# per loaded version, 1 while resident; a version evicted is gone at the next scrape.
LORA_ADAPTER_LOADED = StatusGauge(
    "loraserve_lora_adapter_loaded",
    "1 for each adapter version resident in the generation worker's adapter cache",
    ("adapter_name", "version", "pinned", "rank"),
)
NUM_LOADED_LORA_ADAPTERS = StatusGauge(
    "loraserve_num_loaded_lora_adapters", "adapter versions resident in the adapter cache", ()
)
MAX_LOADED_LORA_ADAPTERS = StatusGauge(
    "loraserve_max_loaded_lora_adapters", "capacity of the adapter cache (--max-loaded-adapters)", ()
)
STATUS_GAUGES = (LORA_REQUESTS_INFO, LORA_ADAPTER_LOADED, NUM_LOADED_LORA_ADAPTERS, MAX_LOADED_LORA_ADAPTERS)

WORKER_RESTARTS = Counter(
    "loraserve_worker_restarts_total", "generation workers that died and were restarted (main process)"
)

# --- adapters (worker process) ---------------------------------------------------------------
# (how many are loaded: NUM_LOADED_LORA_ADAPTERS above, from the status file)
ADAPTER_LOAD_SECONDS = Histogram(
    "loraserve_lora_adapter_load_seconds", "time to load one adapter version from disk", buckets=FAST_BUCKETS
)
ADAPTER_CACHE_HITS = Counter("loraserve_adapter_cache_hits_total", "adapter lookups served from memory")
ADAPTER_CACHE_MISSES = Counter(
    "loraserve_adapter_cache_misses_total", "adapter lookups that loaded from disk"
)
ADAPTER_CACHE_EVICTIONS = Counter("loraserve_adapter_cache_evictions_total", "adapters evicted (LRU)")

# --- model (worker process) ------------------------------------------------------------------
MODEL_INFO = Gauge(
    "loraserve_model_info",
    "constant 1, labelled with what the worker serves",
    ["model", "device", "dtype", "weights"],
    multiprocess_mode="mostrecent",
)
GPU_MEMORY_BYTES = Gauge(
    "loraserve_gpu_memory_bytes",
    "CUDA memory of the generation worker",
    ["kind"],
    multiprocess_mode="mostrecent",
)

# --- training jobs (job runner process) ------------------------------------------------------
TRAIN_JOBS = Gauge(
    "loraserve_train_jobs", "training jobs by status", ["status"], multiprocess_mode="mostrecent"
)
TRAIN_JOBS_FINISHED = Counter("loraserve_train_jobs_finished_total", "training jobs that ended", ["status"])
TRAIN_STEPS = Counter("loraserve_train_steps_total", "optimizer steps taken by training jobs")
TRAIN_LOSS = Gauge(
    "loraserve_train_loss", "latest training loss of the running job", multiprocess_mode="mostrecent"
)
TRAIN_TOKENS_PER_SECOND = Gauge(
    "loraserve_train_tokens_per_second",
    "training throughput of the running job",
    multiprocess_mode="mostrecent",
)
TRAIN_YIELD_SECONDS = Counter(
    "loraserve_train_yield_seconds_total",
    "seconds training jobs paused between optimizer steps for live serving (as the trainer reports them)",
)
TRAIN_YIELDING = Gauge(
    "loraserve_train_yielding",
    "1 while the job runner asks training to yield to a busy generation worker",
    multiprocess_mode="mostrecent",
)
TRAIN_JOB_SECONDS = Histogram(
    "loraserve_train_job_duration_seconds",
    "wall time of finished training jobs",
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
)


def record_step(report: StepReport) -> None:
    """Export what one engine step measured (the engine itself writes no metrics)."""
    for seconds in report.queue_wait_seconds:
        QUEUE_WAIT_SECONDS.observe(seconds)
    for label, n in report.prompt_tokens.items():
        PROMPT_TOKENS.labels(adapter=label).inc(n)
    if report.decode_rows:
        BATCH_SIZE.observe(report.decode_rows)
    for label, seconds in report.first_token_seconds:
        TTFT_SECONDS.labels(adapter=label).observe(seconds)
    for seconds in report.inter_token_seconds:
        INTER_TOKEN_SECONDS.observe(seconds)
    for label, n in report.generated_tokens.items():
        GENERATED_TOKENS.labels(adapter=label).inc(n)
    REQUESTS_RUNNING.set(report.running)
    if report.prefix.queried_tokens:
        PREFIX_CACHE_QUERIES.inc(report.prefix.queried_tokens)
    if report.prefix.hit_tokens:
        PREFIX_CACHE_HITS.inc(report.prefix.hit_tokens)
    record_adapter_activity(report.adapters)


def record_adapter_activity(cache: CacheActivity) -> None:
    """Export what the adapter cache did: in a step, or loading pinned adapters between steps."""
    if cache.hits:
        ADAPTER_CACHE_HITS.inc(cache.hits)
    if cache.misses:
        ADAPTER_CACHE_MISSES.inc(cache.misses)
    if cache.evictions:
        ADAPTER_CACHE_EVICTIONS.inc(cache.evictions)
    for seconds in cache.load_seconds:
        ADAPTER_LOAD_SECONDS.observe(seconds)


def record_load(waiting: int, stats: dict) -> None:
    """Export the worker's load between steps for the Inference Gateway's endpoint picker.

    ``stats`` is ``Engine.stats()``; ``waiting`` also counts what the worker holds in front of the
    engine. Which adapters run and wait goes to the status file (``LORA_REQUESTS_INFO``).
    """
    REQUESTS_WAITING.set(waiting)
    REQUESTS_RUNNING.set(stats["rows"])
    KV_CACHE_USAGE.set(stats["kv_cache"]["usage"])
    PREFIX_CACHE_BYTES.set(stats["kv_cache"].get("prefix_bytes", 0))


def _family(g: StatusGauge) -> GaugeMetricFamily:
    return GaugeMetricFamily(g.name, g.documentation, labels=g.labelnames)


class WorkerStatusCollector(Collector):
    """The ``StatusGauge``s, from the generation worker's status file at each scrape.

    Nothing is exported while the worker is not ready, its process is gone, or its busy load is stale
    (``worker_status.read_load``): a dead or hung worker has no current state to report.
    """

    def __init__(self, status_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.status_path = Path(status_path)
        self.clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for g in STATUS_GAUGES:
            yield _family(g)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = _family(LORA_REQUESTS_INFO)
        loaded, count, limit = (_family(g) for g in STATUS_GAUGES[1:])
        status = read_status(self.status_path)
        now = self.clock()
        load = read_load(status, now)
        ready = status is not None and status.get("status") == "ready" and pid_alive(status.get("pid"))
        if ready and load is not None:
            busy = bool(load.waiting or load.running)
            family.add_metric(
                [
                    str(status.get("max_loaded_adapters", "")),  # type: ignore[union-attr]  (ready: not None)
                    ",".join(load.running_adapters),
                    ",".join(load.waiting_adapters),
                ],
                load.time if busy else now,
            )
            entries = read_cache(status)
            for e in entries:
                pinned = "true" if e.pinned else "false"
                rank = "" if e.rank is None else str(e.rank)
                loaded.add_metric([e.name, e.version, pinned, rank], 1)
            count.add_metric([], len(entries))
            capacity = status.get("max_loaded_adapters")  # type: ignore[union-attr]  (ready: not None)
            if isinstance(capacity, int):
                limit.add_metric([], capacity)
        yield family
        yield loaded
        yield count
        yield limit

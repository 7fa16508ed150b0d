"""The generation worker: LitServe spawns it (one per device) and it owns the engine.

``EngineAPI.setup`` builds the ``Engine`` and publishes the worker's status file (readiness, loaded
adapters and the load the job runner yields to; format: ``service.worker_status``); ``EngineLoop``
drives the engine.
The loop is continuous batching: between two engine steps it drains the queue, admits newcomers
while the engine has capacity and answers finished rows at once. When nothing is running it *blocks*
on the queue (LitServe's ContinuousBatchingLoop spins a core there, and admits requests from another
thread while ``step`` runs, which a single-threaded engine cannot allow).

Streamed and non-streamed requests are the same job on the same queue and share engine batches;
the ``stream`` flag only decides whether the worker sends every text delta or one final event
(``service.wire``). The API side is ``service.gateway``; LitServe's internals are ``service.litserve_glue``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import litserve as ls

from loracore.artifact import split_ref
from service.adapters.pins import PinsFile
from service.litserve_glue import QueueLoop, StopServing, WorkerQueue, engine_api_options
from service.wire import Cancel, Event, Job, TokenLogprob, WireError, request_from_dict
from service.worker_status import LOAD_EVERY_S, Load, LoadedEntry, write_status

if TYPE_CHECKING:  # the engine (and torch) load in the worker process only, inside _Driver
    from service.engine import TokenEvent

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle worker blocks on the queue before checking deadlines again
MAX_DRAIN = 256  # queue items taken between two steps, so a flood cannot starve running rows
THREADS_EVERY_S = 0.25  # how often the job runner's word on CPU threads is read (a trainer starts in seconds)
PIN_CHECK_S = 0.5  # how often pinned names are checked for a newer version (a pins change: every pass)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker needs, resolved by the main process (picklable: it crosses a spawn)."""

    model_path: str
    model_name: str  # what the user asked for
    origin: str  # "hub" | "local" | "random"
    random_weights: bool
    adapter_dir: str
    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "float16" | "bfloat16"
    max_batch_size: int | None  # a cap; None: what the KV budget holds (``engine.capacity``)
    kv_cache_bytes: int | None
    max_loaded_adapters: int
    status_path: str
    generation_threads_path: str | None = None  # the job runner's word while a trainer shares the CPU
    log_level: str = "info"
    max_context: int | None = None  # the longest row served (loracore.families.served_context)
    prefix_cache: bool = True  # --prefix-cache on (engine.prefix)


def _exit_on_sigterm(signum, frame) -> None:
    from multiprocessing import util

    util._run_finalizers(0)  # unlink this process's named semaphores (else resource_tracker warns)
    os._exit(0)  # a full interpreter teardown with torch loaded takes seconds


class EngineAPI(ls.LitAPI):
    """The LitAPI of the generation worker: ``setup`` builds the engine, ``EngineLoop`` drives it."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(**engine_api_options(config.max_batch_size or 1, EngineLoop()))
        self.config = config
        self.engine = None

    def setup(self, device: str) -> None:
        import torch

        from service import metrics
        from service.engine import Engine

        cfg = self.config
        if not logging.getLogger().handlers:  # a spawned process starts without our logging setup
            logging.basicConfig(
                level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        status = {
            "status": "starting",
            "model": cfg.model_name,
            "model_path": cfg.model_path,
            "device": device,
            "dtype": cfg.dtype,
            "weights": cfg.origin,
            "random_weights": cfg.random_weights,
        }
        write_status(cfg.status_path, status)
        try:
            self.engine = Engine(
                cfg.model_path,
                cfg.adapter_dir,
                device=device,
                dtype=getattr(torch, cfg.dtype),
                max_batch_size=cfg.max_batch_size,
                kv_cache_bytes=cfg.kv_cache_bytes,
                max_loaded_adapters=cfg.max_loaded_adapters,
                max_context=cfg.max_context,
                prefix_cache=cfg.prefix_cache,
            )
        except Exception as exc:
            write_status(
                cfg.status_path, dict(status, status="failed", detail=f"{type(exc).__name__}: {exc}")
            )
            raise
        # LitServe stops workers with SIGTERM: run the finalizers, skip the slow teardown (see below).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        plan = self.engine.plan
        capacity = self.engine.adapters.capacity
        self.status = dict(status, status="ready", batch=plan.to_dict(), max_loaded_adapters=capacity)
        idle = Load(0, 0, time.time()).to_dict()
        write_status(
            cfg.status_path,
            dict(self.status, loaded_adapters=[], load=idle, kv_cache=self.engine.stats()["kv_cache"]),
        )
        log.info(
            "batch capacity %d rows (limited by %s): KV budget %d MiB (%s), %d KiB per row-position x %d",
            plan.rows,
            plan.limited_by,
            plan.kv_budget_bytes >> 20,
            plan.budget_source,
            plan.kv_bytes_per_token >> 10,
            plan.row_tokens,
        )
        metrics.MODEL_INFO.labels(cfg.model_name, device, cfg.dtype, cfg.origin).set(1)
        kv = self.engine.kv_use()
        if self.engine.prefix is not None:
            budget_blocks = plan.kv_budget_bytes // kv["block_bytes"]
            metrics.CACHE_CONFIG_INFO.labels(str(kv["block_tokens"]), str(budget_blocks)).set(1)
        if cfg.random_weights:
            log.warning(
                "generation worker serves RANDOM WEIGHTS of %s: output is meaningless", cfg.model_name
            )
        log.info("generation worker ready: %s on %s (%s)", cfg.model_name, device, cfg.dtype)

    def predict(self, x: Any) -> Any:  # pragma: no cover - EngineLoop never calls it
        raise NotImplementedError("EngineLoop drives the engine directly")


@dataclass
class DecodeRate:
    """Generated tokens per second of engine time, smoothed over windows of ``WINDOW_S`` busy seconds:
    what admission divides the queued work by. Engine time only, so idle time does not dilute it, and a
    machine starved by other work shows up as a lower rate."""

    WINDOW_S = 1.0
    WEIGHT = 0.3  # of the newest window

    value: float | None = None
    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        if self.seconds >= self.WINDOW_S:
            rate = self.tokens / self.seconds
            self.value = rate if self.value is None else self.WEIGHT * rate + (1 - self.WEIGHT) * self.value
            self.tokens, self.seconds = 0, 0.0


@dataclass
class _Live:
    """A job the worker has taken from the queue and still owes an answer."""

    uid: str
    consumer: int
    job: Job
    text: list[str] = field(default_factory=list)
    # jobs with logprobs: the tokens not yet sent (a token whose text is still held back waits for
    # the next event that carries text)
    logprobs: list[TokenLogprob] | None = None
    # jobs with prompt_logprobs: the prompt's tokens, until the first event sent carries them
    prompt: list[TokenLogprob] | None = None

    def take_prompt(self) -> list[TokenLogprob] | None:
        out, self.prompt = self.prompt, None
        return out

    def take_logprobs(self) -> list[TokenLogprob] | None:
        out = self.logprobs
        if out is not None:
            self.logprobs = []
        return out


class EngineLoop(QueueLoop):
    """Continuous batching over LitServe's request queue, one engine step at a time, in one thread."""

    def serve(self, lit_api: EngineAPI, queue: WorkerQueue) -> None:
        _Driver(lit_api, queue).serve()


class _Driver:
    """Owns the engine in the worker and writes its metrics: each engine step's report
    (``metrics.record_step``) and, between steps, its load (``metrics.record_load``)."""

    def __init__(self, lit_api: EngineAPI, queue: WorkerQueue) -> None:
        from service import metrics
        from service.engine import (
            AdapterCacheFull,
            AdapterNotFound,
            AdapterWeight,
            GenerationRequest,
            PromptTooLong,
        )

        self.api, self.engine, self.queue = lit_api, lit_api.engine, queue
        self.metrics = metrics
        self.AdapterNotFound, self.PromptTooLong = AdapterNotFound, PromptTooLong
        self.AdapterCacheFull = AdapterCacheFull
        self.GenerationRequest = GenerationRequest
        self.AdapterWeight = AdapterWeight
        self.waiting: deque[_Live] = deque()  # taken from LitServe's queue, not yet given to the engine
        self.running: dict[str, _Live] = {}  # given to the engine (waiting there or in the batch)
        self.busy = False  # as last published
        self.status_at = 0.0
        self.rate = DecodeRate()
        self.pins = PinsFile(lit_api.config.adapter_dir)
        self.pins_at = 0.0
        self.cache_published = -1  # the adapter cache's ``changes`` as last written to the status file
        import torch

        self.torch = torch
        self.full_threads = torch.get_num_threads()
        self.threads_at = 0.0
        self.threads_published = self.full_threads

    # --- the loop, in execution order -----------------------------------------------------------
    def serve(self) -> None:
        while True:
            idle = not self.engine.has_active() and not self.waiting
            if not self.receive(block=idle):
                log.info("generation worker: stop requested")
                return
            self.expire()
            self.sync_pins()
            self.share_cpu()
            self.admit()
            stats = self.engine.stats()
            # a cancel, an expiry or a deleted adapter's lookup changes these between steps too
            self.metrics.record_load(len(self.waiting) + stats["waiting"], stats)
            if self.engine.has_active():
                self.step()
            elif self.waiting:
                time.sleep(0.01)  # nothing running and nothing admitted: do not spin
            self.publish_status()

    def receive(self, block: bool) -> bool:
        """Move queue items into ``waiting`` (or apply cancels); False when LitServe asks us to stop.

        Blocks (without spinning) only while the worker has nothing else to do.
        """
        for n in range(MAX_DRAIN):
            try:
                item = self.queue.take(IDLE_WAIT_S if block and n == 0 else None)
            except StopServing:
                return False
            if item is None:
                return True
            message = request_from_dict(item.payload)
            if isinstance(message, Cancel):
                self.cancel(message.job_id)
            else:
                self.waiting.append(_Live(item.uid, item.consumer, message))
        return True

    def sync_pins(self) -> None:
        """Apply a change of the pins file at once, and load pinned adapters still missing (or replaced
        by a newer version) every ``PIN_CHECK_S``: pinned adapters are loaded before any request names
        them, also after a restart."""
        cache = self.engine.adapters
        now = time.monotonic()
        if self.pins.changed():
            cache.set_pins(self.pins.names)
        elif cache.pins and now - self.pins_at >= PIN_CHECK_S:
            cache.sync_pins()
        else:
            return
        self.pins_at = now
        self.metrics.record_adapter_activity(cache.take_activity())

    def share_cpu(self) -> None:
        """While a trainer runs beside generation on the CPU, the job runner names the threads generation
        keeps (``jobs.trainer_process.generation_threads``): a decode step that spreads over the core
        the trainer works on waits for it. Read between steps, at most every ``THREADS_EVERY_S``."""
        path = self.api.config.generation_threads_path
        now = time.monotonic()
        if path is None or now - self.threads_at < THREADS_EVERY_S:
            return
        self.threads_at = now
        try:
            want = int(Path(path).read_text())
        except (OSError, ValueError):  # no trainer beside us (or a half-written word): every thread
            want = self.full_threads
        want = max(1, min(want, self.full_threads))
        if want != self.torch.get_num_threads():
            self.torch.set_num_threads(want)
            log.info("generation worker: %d CPU threads (a trainer %s)", want,
                     "runs beside it" if want < self.full_threads else "no longer runs")  # fmt: skip

    def expire(self) -> None:
        """Answer 504 for every job past its deadline, queued or running."""
        now = time.monotonic()
        for live in [w for w in self.waiting if w.job.deadline <= now]:
            self.waiting.remove(live)
            self.fail(live, WireError.of("timeout", "the request waited past its deadline"))
        for live in [r for r in self.running.values() if r.job.deadline <= now]:
            self.drop(live.job.id)
            self.fail(live, WireError.of("timeout", "generation ran past the request deadline"))

    def admit(self) -> None:
        """Hand waiting jobs to the engine while it has room; a job the engine refuses fails alone."""
        while self.waiting and self.engine.has_capacity():
            live = self.waiting.popleft()
            job = live.job
            try:
                self.engine.add(
                    self.GenerationRequest(
                        job.id,
                        list(job.prompt_ids),
                        job.adapter,
                        job.params,
                        arrival=job.arrived,
                        adapters=(
                            None
                            if job.adapters is None
                            else tuple(self.AdapterWeight(n, w) for n, w in job.adapters)
                        ),
                    )
                )
            except Exception as exc:
                self.fail(live, self.refusal(job, exc))
            else:
                if job.params.logprobs is not None:
                    live.logprobs = []
                self.running[job.id] = live

    def step(self) -> None:
        try:
            report = self.engine.step()
        except Exception as exc:  # the whole step failed: every job gets the error, nobody hangs
            log.exception("engine.step failed")
            for live in list(self.running.values()):
                self.drop(live.job.id)
                self.fail(live, WireError.of("generation_failed", f"{type(exc).__name__}: {exc}"))
            return
        self.metrics.record_step(report)
        self.rate.add(sum(report.generated_tokens.values()), report.prefill_seconds + report.decode_seconds)
        for ev in report.events:
            live = self.running.get(ev.id)
            if live is None:  # cancelled or expired meanwhile
                continue
            if ev.finished:
                del self.running[ev.id]
            if live.logprobs is not None and ev.logprob is not None:
                live.logprobs.append(self.token_logprob(ev))
            if ev.prompt_logprobs is not None:
                live.prompt = self.prompt_logprobs(ev)
            if ev.error_code is not None or ev.finish_reason == "error":
                # error_code says why (adapter_not_found: deleted after the request was accepted)
                code = ev.error_code or "generation_failed"
                self.fail(live, WireError.of(code, ev.error or code.replace("_", " ")))
            elif ev.finished:
                live.text.append(ev.text)
                self.send(
                    live,
                    Event(
                        ev.id,
                        finished=True,
                        text=ev.text if live.job.stream else "".join(live.text),
                        finish_reason=ev.finish_reason,
                        usage={"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens},
                        logprobs=live.take_logprobs(),
                        prompt_logprobs=live.take_prompt(),
                    ),
                )
            elif live.job.stream:
                if ev.text:
                    self.send(
                        live,
                        Event(
                            ev.id,
                            finished=False,
                            text=ev.text,
                            logprobs=live.take_logprobs(),
                            prompt_logprobs=live.take_prompt(),
                        ),
                    )
            else:
                live.text.append(ev.text)

    # --- helpers --------------------------------------------------------------------------------
    def token_logprob(self, ev: TokenEvent) -> TokenLogprob:
        """The wire form of an event's log-probabilities, each token spelled by its bytes."""
        spell = self.engine.token_bytes
        top = [TokenLogprob.of(t, spell(t), lp) for t, lp in ev.top_logprobs or []]
        return TokenLogprob.of(ev.token_id, spell(ev.token_id), ev.logprob, top)

    def prompt_logprobs(self, ev: TokenEvent) -> list[TokenLogprob]:
        """The wire form of an event's prompt log-probabilities (the first token's is None)."""
        spell = self.engine.token_bytes
        return [
            TokenLogprob.of(
                t, spell(t), lp, None if lp is None else [TokenLogprob.of(a, spell(a), v) for a, v in top]
            )
            for t, lp, top in ev.prompt_logprobs or []
        ]

    def cancel(self, job_id: str) -> None:
        for live in self.waiting:
            if live.job.id == job_id:
                self.waiting.remove(live)
                return
        self.drop(job_id)

    def drop(self, job_id: str) -> None:
        """Take a job out of the engine; no further events are sent for it."""
        if self.running.pop(job_id, None) is None:
            return
        try:
            self.engine.cancel(job_id)
        except Exception:
            log.exception("engine.cancel failed for %s", job_id)

    def refusal(self, job: Job, exc: Exception) -> WireError:
        """Why ``engine.add`` refused a job, as an error code (its status is in ``service.wire``)."""
        if isinstance(exc, self.AdapterNotFound):
            return WireError.of("adapter_not_found", str(exc))
        if isinstance(exc, self.AdapterCacheFull):
            return WireError.of("adapter_cache_full", str(exc))
        if isinstance(exc, self.PromptTooLong):
            return WireError.of("prompt_too_long", str(exc))
        if isinstance(exc, ValueError):
            return WireError.of("invalid_request", str(exc))
        log.exception("engine.add failed for %s", job.id)
        return WireError.of("generation_failed", f"{type(exc).__name__}: {exc}")

    def fail(self, live: _Live, error: WireError) -> None:
        self.send(live, Event.failure(live.job.id, error))

    def send(self, live: _Live, event: Event) -> None:
        self.queue.reply(live.consumer, live.uid, event.to_dict())

    def publish_status(self) -> None:
        """Rewrite the status file (load and loaded adapters) every ``LOAD_EVERY_S`` while busy, at
        once when the worker turns busy or idle (the job runner pauses training on it), and when the
        adapter cache changed while idle (a pinned adapter loaded)."""
        busy = bool(self.waiting or self.running)
        now = time.monotonic()
        changes = self.engine.adapters.changes
        idle_change = not busy and changes != self.cache_published  # busy: the next refresh carries it
        threads_change = self.torch.get_num_threads() != self.threads_published
        if (
            busy == self.busy
            and not idle_change
            and not threads_change
            and not (busy and now - self.status_at >= LOAD_EVERY_S)
        ):
            return
        self.busy, self.status_at, self.cache_published = busy, now, changes
        self.threads_published = self.torch.get_num_threads()
        stats = self.engine.stats()
        # Jobs carry name@version; routers and dashboards know adapters by name.
        waiting_adapters = {adapter_name(w.job.adapter) for w in self.waiting if w.job.adapter}
        waiting_adapters.update(adapter_name(a) for a in stats["waiting_adapters"])
        load = Load(
            len(self.waiting) + stats["waiting"],
            stats["rows"],
            time.time(),
            self.rate.value,
            tuple(sorted({adapter_name(a) for a in stats["running_adapters"]})),
            tuple(sorted(waiting_adapters)),
        )
        loaded = sorted(stats["adapters_loaded"])
        cache = stats["adapter_cache"]
        refs = sum(e["refs"] for e in cache["loaded"])  # 0 once idle, or a reference leaked
        write_status(
            self.api.config.status_path,
            dict(
                self.api.status,
                loaded_adapters=loaded,
                adapter_cache=[LoadedEntry.of(e).to_dict() for e in cache["loaded"]],
                pinned_adapters=cache["pinned"],
                adapter_pins=refs,
                load=load.to_dict(),
                kv_cache=stats["kv_cache"],
                threads=self.torch.get_num_threads(),
            ),
        )


def adapter_name(ref: str) -> str:
    """The adapter's name in a reference (``name`` or ``name@<version id>``)."""
    return split_ref(ref)[0]

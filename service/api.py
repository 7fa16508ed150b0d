"""The generation pipe between HTTP and the engine, on both sides of LitServe's queue.

API-server process (never holds the model):
    ``prepare_job`` validates a request with the tokenizer and the adapter folder only (unknown
    adapter 404, prompt over the context 400, ``max_new_tokens`` over the cap 422) *before* it is
    queued, so a bad request never reaches, and never fails, a batch. ``EngineClient`` bounds the
    requests in flight (503 + Retry-After beyond), puts the job on LitServe's request queue and
    reads the worker's events back from LitServe's response buffer.

Generation worker (spawned by LitServe, one per device):
    ``EngineAPI.setup`` builds the ``Engine``; ``EngineLoop`` drives it. The loop is continuous
    batching: between two engine steps it drains the queue, admits newcomers while the engine has
    capacity and answers finished rows at once. When nothing is running it *blocks* on the queue
    (LitServe's ContinuousBatchingLoop spins a core there, and admits requests from another thread
    while ``step`` runs, which a single-threaded engine cannot allow).

Streamed and non-streamed requests are the same job on the same queue and share engine batches;
the ``stream`` flag only decides whether the worker sends every text delta or one final event.
The messages between the two sides (job, cancel, event) are the dataclasses of ``service.wire``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar

import litserve as ls
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from service.errors import ApiError, error_body
from service.wire import Cancel, Event, Job, WireError, request_from_dict
from trainer.publish import write_atomic

log = logging.getLogger(__name__)

ENGINE_PATH = "/_engine"  # LitServe needs a route for the LitAPI; the app removes it (see app.py)
IDLE_WAIT_S = 0.5  # how long an idle worker blocks on the queue before checking deadlines again
MAX_DRAIN = 256  # queue items taken between two steps, so a flood cannot starve running rows
STATUS_EVERY_S = 1.0  # at most this often the worker rewrites its status file while busy
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks that its client is still there

T = TypeVar("T")


# =====================================================================================================
# API-server side
# =====================================================================================================


@dataclass(frozen=True)
class ModelLimits:
    """What the API process knows about the base without loading it: context size and tokenizer."""

    context: int
    tokenizer: Any

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token covers more characters than this (its vocabulary string is at least that long:
        byte-level BPE spells each byte as one character)."""
        return max(len(token) for token in self.tokenizer.get_vocab())

    def check_prompt_chars(self, text: str, param: str = "prompt") -> None:
        """400 for a text that cannot fit the context, decided without tokenizing it.

        Tokenizing runs on the API process's event loop: a multi-megabyte prompt would stall every
        other request (liveness included) for seconds before being refused anyway.
        """
        most = self.context * self.max_token_chars
        if len(text) > most:
            raise api_error(
                WireError(
                    "prompt_too_long",
                    f"the prompt has {len(text)} characters, more than the model's context of "
                    f"{self.context} tokens can hold: shorten the prompt",
                    param,
                )
            )


def prepare_job(
    *,
    prompt_text: str,
    adapter: str | None,
    params: dict[str, Any],
    stream: bool,
    limits: ModelLimits,
    adapter_dir: Path,
    max_new_tokens_cap: int,
    request_timeout: float,
    adapter_param: str = "adapter",
    max_tokens_param: str = "max_new_tokens",
) -> Job:
    """Validate one generation request and turn it into a worker job; raises ApiError (4xx).

    ``prompt_text`` is final (already rendered with a template when the route wants one);
    ``params`` are SamplingParams fields. Every check here uses only the disk and the tokenizer.
    """
    from service.adapters import store

    if adapter is not None:
        store.check_name(adapter, adapter_param)
        if not store.exists(adapter_dir, adapter):
            missing = f"adapter {adapter!r} does not exist"
            raise api_error(WireError("adapter_not_found", missing, adapter_param))
    max_new = params["max_new_tokens"]
    if max_new > max_new_tokens_cap:
        raise ApiError(
            422,
            "max_new_tokens_too_large",
            f"{max_tokens_param} is {max_new}; this server allows at most {max_new_tokens_cap}",
            max_tokens_param,
        )
    limits.check_prompt_chars(prompt_text)
    prompt_ids = limits.tokenizer.encode(prompt_text)
    prompt_len = max(1, len(prompt_ids))  # the engine starts an empty prompt from BOS
    if prompt_len + max_new > limits.context:
        room = limits.context - prompt_len
        hint = (
            f"lower {max_tokens_param} to {room} or shorten the prompt" if room > 0 else "shorten the prompt"
        )
        raise api_error(
            WireError(
                "prompt_too_long",
                f"the prompt has {prompt_len} tokens and {max_tokens_param} is {max_new}, which exceeds "
                f"the model's context of {limits.context} tokens: {hint}",
                "prompt",
            )
        )
    now = time.monotonic()
    return Job(
        id=f"gen-{uuid.uuid4().hex[:24]}",
        prompt_ids=prompt_ids,
        adapter=adapter,
        params=params,
        stream=stream,
        arrived=now,
        deadline=now + request_timeout,
    )


class Overloaded(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            503,
            "overloaded",
            f"the server is at its limit of {limit} generation requests in flight; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


@dataclass
class Submission:
    """One job on its way through the worker; ``next_event`` returns what the worker sends back."""

    client: EngineClient
    job: Job
    uid: str
    item: ResponseBufferItem
    done: bool = False

    @property
    def job_id(self) -> str:
        return self.job.id

    def remaining(self, grace: float = 1.0) -> float:
        """Seconds left before the API side gives up (a little after the worker's own deadline)."""
        return max(0.0, self.job.deadline + grace - time.monotonic())

    async def next_event(self) -> Event:
        """The next worker event; after a final one (result or error) the submission is done.

        Raises TimeoutError when the deadline passes first (the caller answers 504 and closes).
        """
        queue = self.item.response_queue
        while not queue:
            self.item.event.clear()
            await asyncio.wait_for(self.item.event.wait(), self.remaining())
        data, status = queue.popleft()
        if status == LitAPIStatus.ERROR or not isinstance(data, dict):  # LitServe-level failure
            self.done = True
            return Event.failure(self.job_id, WireError.of("generation_failed", _describe_error(data)))
        event = Event.from_dict(data)
        if event.finished:
            self.done = True
        return event

    async def next_or_504(self) -> Event:
        """``next_event``, with a passed deadline answered as 504 in the error envelope."""
        try:
            return await self.next_event()
        except TimeoutError:
            message = f"no result within the server's deadline of {self.client.server.timeout} s"
            raise api_error(WireError.of("timeout", message)) from None

    async def final(self, check: Callable[[Event], None]) -> Event:
        """Wait for the finished event; ``check`` raises for an error event (each route words its own)."""
        while True:
            event = await self.next_or_504()
            check(event)
            if event.finished:
                return event

    def close(self) -> None:
        """Forget the job and free its slot; if it has not finished, tell the worker to drop it."""
        if self.uid not in self.client.server.response_buffer:
            return
        self.client.server.response_buffer.pop(self.uid, None)
        if not self.done:
            self.done = True
            self.client.cancel(self.job_id)
        self.client.release()


class EngineClient:
    """Submits jobs from an API-server process to the generation worker through LitServe's queues.

    The in-flight counter is shared memory created before LitServe forks its API servers, so the
    bound holds across all of them.
    """

    def __init__(self, server: ls.LitServer, max_in_flight: int) -> None:
        self.server = server
        self.max_in_flight = max_in_flight
        self._in_flight = mp.get_context("fork").Value("i", 0)

    @property
    def in_flight(self) -> int:
        return self._in_flight.value

    def reserve(self) -> None:
        with self._in_flight.get_lock():
            if self._in_flight.value >= self.max_in_flight:
                raise Overloaded(self.max_in_flight)
            self._in_flight.value += 1

    def release(self) -> None:
        with self._in_flight.get_lock():
            self._in_flight.value = max(0, self._in_flight.value - 1)

    def submit(self, job: Job, consumer_id: int) -> Submission:
        """Queue ``job`` (the caller has reserved a slot); its events come back to ``consumer_id``."""
        uid = str(uuid.uuid4())
        item = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
        self.server.response_buffer[uid] = item
        try:
            queue = self.server._get_request_queue(ENGINE_PATH)
            queue.put((consumer_id, uid, time.monotonic(), job.to_dict()))
        except Exception as exc:  # the manager is gone: the server is shutting down
            self.server.response_buffer.pop(uid, None)
            self.release()
            raise ApiError(
                503,
                "unavailable",
                "the generation worker is not reachable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from exc
        return Submission(self, job, uid, item)

    def cancel(self, job_id: str) -> None:
        try:
            self.server._get_request_queue(ENGINE_PATH).put(
                (None, None, time.monotonic(), Cancel(job_id).to_dict())
            )
        except Exception:  # the manager is gone: the server is shutting down
            log.debug("could not send cancel for %s", job_id, exc_info=True)


class ClientDisconnected(ApiError):
    """The client closed the connection while its answer was being made (nginx's 499, for metrics)."""

    def __init__(self) -> None:
        super().__init__(
            499, "client_closed_request", "the client closed the connection before the answer was ready"
        )


async def _disconnected(request: Any) -> None:
    """Return once the client has gone away (polls Starlette's ``Request.is_disconnected``)."""
    try:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
    except Exception:  # cannot tell: never call a client gone on a guess
        log.debug("disconnect check failed; not watching this request", exc_info=True)
        await asyncio.Event().wait()


async def unless_disconnected(awaitable: Awaitable[T], request: Any) -> T:
    """Await ``awaitable`` unless the client of ``request`` goes away first.

    Then ``awaitable`` is cancelled and ``ClientDisconnected`` raised, and the caller's ``finally``
    closes its submissions, which cancels their jobs in the worker. Without this a non-streamed
    request whose client left would generate on to its last token or its deadline (a stream notices
    by itself: Starlette stops the response when the client disconnects).
    """
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientDisconnected()


def _describe_error(data: Any) -> str:
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:
            return "the generation worker failed"
    detail = getattr(data, "detail", None) or str(data)
    return f"the generation worker failed: {detail}" if detail else "the generation worker failed"


def api_error(error: WireError) -> ApiError:
    """The ApiError a route answers for ``error``, its status from the one table (``service.wire``)."""
    return ApiError(error.status, error.code, error.message, error.param)


def error_payload(error: WireError) -> dict[str, Any]:
    """The error envelope for ``error``, for an SSE line once the stream's 200 has been sent."""
    return error_body(error.status, error.code, error.message, error.param)


def raise_for_event(event: Event) -> None:
    """Turn a worker error event into the ApiError the route answers with."""
    if event.error is not None:
        raise api_error(event.error)


# =====================================================================================================
# Worker side
# =====================================================================================================


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
    max_batch_size: int
    max_loaded_adapters: int
    status_path: str
    log_level: str = "info"


def write_status(path: str | Path, status: dict[str, Any]) -> None:
    """The worker's status for readiness and adapter listings, written atomically."""
    body = dict(status, pid=os.getpid(), updated=datetime.now(UTC).isoformat())
    write_atomic(Path(path), json.dumps(body, indent=2) + "\n")


def read_status(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _exit_on_sigterm(signum, frame) -> None:
    from multiprocessing import util

    util._run_finalizers(0)  # unlink this process's named semaphores (else resource_tracker warns)
    os._exit(0)  # a full interpreter teardown with torch loaded takes seconds


class EngineAPI(ls.LitAPI):
    """The LitAPI of the generation worker: ``setup`` builds the engine, ``EngineLoop`` drives it."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(
            api_path=ENGINE_PATH, stream=True, max_batch_size=config.max_batch_size, loop=EngineLoop()
        )
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
                max_loaded_adapters=cfg.max_loaded_adapters,
            )
        except Exception as exc:
            write_status(
                cfg.status_path, dict(status, status="failed", detail=f"{type(exc).__name__}: {exc}")
            )
            raise
        # LitServe stops workers with SIGTERM: run the finalizers, skip the slow teardown (see below).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.status = dict(status, status="ready")
        write_status(cfg.status_path, dict(self.status, loaded_adapters=[]))
        metrics.MODEL_INFO.labels(cfg.model_name, device, cfg.dtype, cfg.origin).set(1)
        if cfg.random_weights:
            log.warning(
                "generation worker serves RANDOM WEIGHTS of %s: output is meaningless", cfg.model_name
            )
        log.info("generation worker ready: %s on %s (%s)", cfg.model_name, device, cfg.dtype)

    def predict(self, x: Any) -> Any:  # pragma: no cover - EngineLoop never calls it
        raise NotImplementedError("EngineLoop drives the engine directly")


@dataclass
class _Live:
    """A job the worker has taken from the queue and still owes an answer."""

    uid: str
    consumer: int
    job: Job
    text: list[str] = field(default_factory=list)


class EngineLoop(LitLoop):
    """Continuous batching over LitServe's request queue, one engine step at a time, in one thread."""

    def __call__(
        self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner
    ):
        _Driver(self, lit_api, request_queue, transport).serve()


class _Driver:
    """Owns the engine in the worker. The engine records its own batch, token and latency metrics;
    the driver adds the queue it keeps in front of the engine (``requests_waiting``)."""

    def __init__(self, loop: EngineLoop, lit_api: EngineAPI, request_queue, transport) -> None:
        from service import metrics
        from service.engine import AdapterNotFound, GenerationRequest, PromptTooLong, SamplingParams

        self.loop, self.api, self.engine = loop, lit_api, lit_api.engine
        self.queue, self.transport = request_queue, transport
        self.metrics = metrics
        self.AdapterNotFound, self.PromptTooLong = AdapterNotFound, PromptTooLong
        self.GenerationRequest, self.SamplingParams = GenerationRequest, SamplingParams
        self.waiting: deque[_Live] = deque()  # taken from LitServe's queue, not yet given to the engine
        self.running: dict[str, _Live] = {}  # given to the engine (waiting there or in the batch)
        self.loaded: list[str] = []
        self.status_at = 0.0

    # --- the loop, in execution order -----------------------------------------------------------
    def serve(self) -> None:
        while True:
            idle = not self.engine.has_active() and not self.waiting
            if not self.receive(block=idle):
                log.info("generation worker: stop requested")
                return
            self.expire()
            self.admit()
            self.metrics.REQUESTS_WAITING.set(len(self.waiting) + self.engine.stats()["waiting"])
            if self.engine.has_active():
                self.step()
            elif self.waiting:
                time.sleep(0.01)  # nothing running and nothing admitted: do not spin
            self.publish_status(force=idle)

    def receive(self, block: bool) -> bool:
        """Move queue items into ``waiting`` (or apply cancels); False when LitServe asks us to stop.

        Blocks (without spinning) only while the worker has nothing else to do.
        """
        for n in range(MAX_DRAIN):
            try:
                item = self.queue.get(timeout=IDLE_WAIT_S) if block and n == 0 else self.queue.get_nowait()
            except Empty:
                return True
            except (EOFError, OSError):  # the manager died: the server is going away
                return False
            if item == _SENTINEL_VALUE or item is None:
                return False
            consumer, uid, _, payload = item
            message = request_from_dict(payload)
            if isinstance(message, Cancel):
                self.cancel(message.job_id)
            else:
                self.waiting.append(_Live(uid, consumer, message))
        return True

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
                        self.SamplingParams(**job.params),
                        arrival=job.arrived,
                    )
                )
            except Exception as exc:
                self.fail(live, self.refusal(job, exc))
            else:
                self.running[job.id] = live

    def step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # the whole step failed: every job gets the error, nobody hangs
            log.exception("engine.step failed")
            for live in list(self.running.values()):
                self.drop(live.job.id)
                self.fail(live, WireError.of("generation_failed", f"{type(exc).__name__}: {exc}"))
            return
        for ev in events:
            live = self.running.get(ev.id)
            if live is None:  # cancelled or expired meanwhile
                continue
            if ev.finished:
                del self.running[ev.id]
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
                    ),
                )
            elif live.job.stream:
                if ev.text:
                    self.send(live, Event(ev.id, finished=False, text=ev.text))
            else:
                live.text.append(ev.text)

    # --- helpers --------------------------------------------------------------------------------
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
        if isinstance(exc, self.PromptTooLong):
            return WireError.of("prompt_too_long", str(exc))
        if isinstance(exc, ValueError):
            return WireError.of("invalid_request", str(exc))
        log.exception("engine.add failed for %s", job.id)
        return WireError.of("generation_failed", f"{type(exc).__name__}: {exc}")

    def fail(self, live: _Live, error: WireError) -> None:
        self.send(live, Event.failure(live.job.id, error))

    def send(self, live: _Live, event: Event) -> None:
        self.loop.put_response(
            self.transport,
            live.consumer,
            live.uid,
            event.to_dict(),
            LitAPIStatus.OK,
            LoopResponseType.STREAMING,
        )

    def publish_status(self, force: bool = False) -> None:
        """Rewrite the status file when the set of loaded adapters changed (rate-limited while busy)."""
        now = time.monotonic()
        if not force and now - self.status_at < STATUS_EVERY_S:
            return
        self.status_at = now
        loaded = sorted(self.engine.stats()["adapters_loaded"])
        if loaded != self.loaded:
            self.loaded = loaded
            write_status(self.api.config.status_path, dict(self.api.status, loaded_adapters=loaded))

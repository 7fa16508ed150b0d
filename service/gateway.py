"""The API-process side of generation: validate, bound, submit, await the worker's events.

API-server processes never hold the model. ``prepare_job`` validates a request with the tokenizer
and the adapter folder only (unknown adapter 404, prompt over the context 400, ``max_new_tokens``
over the cap 422) *before* it is queued, so a bad request never reaches, and never fails, a batch.
``EngineClient`` admits by load (503 + Retry-After at once when the batch and queue are full or the
work in flight could not end before the deadline) and puts the job on the worker's queue; a
``Submission`` reads the job's events back (``service.wire``) and, when closed early, tells the worker
to drop the job. When the worker dies, each waiting submission answers 503 ``worker_restarted``.
``unless_disconnected`` notices a client that went away while a non-streamed request waits. The
worker side is ``service.worker``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import multiprocessing as mp
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request

from loracore.template import DEFAULT_TEMPLATE, Template
from service import structured
from service.errors import ApiError, domain_error, error_body, http_status
from service.litserve_glue import (
    Reply,
    Server,
    WorkerLost,
    close_reply,
    consumer_id,
    describe_failure,
    next_reply,
    open_reply,
    put_request,
)
from service.wire import Cancel, Event, Job, ResolvedTarget, SamplingParams, WireError
from service.worker_status import read_load, read_status

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60
STATUS_EVERY_S = 0.25  # how stale the worker's load (rows, decode rate) may be when admitting
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streamed request checks that its client is still there

T = TypeVar("T")


@dataclass(frozen=True)
class ModelLimits:
    """What the API process knows about the base without loading it: context size and tokenizer."""

    context: int
    tokenizer: Any
    vocab_size: int | None = None  # the model's (config.json); None: the tokenizer's size
    template: Any = None  # the base's own chat template (loracore.template.ChatTemplate), None if it has none

    @property
    def vocab(self) -> int:
        return self.vocab_size if self.vocab_size is not None else len(self.tokenizer)

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


async def fetch_missing(request: Request, refs: list[tuple[str | None, str]]) -> None:
    """The adapters a request names, each (reference, param), that the adapter directory lacks, fetched
    from ``--adapter-source`` before they are resolved (``service.adapters.source``); nothing without
    a source. 502/504/422 from the fetch name the source."""
    fetcher = getattr(request.app.state, "adapter_fetcher", None)
    if fetcher is not None:
        await fetcher.ensure_all(refs)


def resolve_target(adapter_dir: Path, ref: str, param: str) -> ResolvedTarget:
    """The version ``ref`` names with its own template, resolved once for the request
    (``store.resolve_target``): 422 for a malformed ref, 404 ``adapter_not_found`` naming it."""
    from service.adapters import store

    store.check_ref(ref, param)
    try:
        return store.resolve_target(adapter_dir, ref, param)
    except ApiError as exc:
        raise api_error(WireError("adapter_not_found", exc.message, param)) from None


def resolve_targets(
    adapter_dir: Path,
    adapter: str | None,
    composition: list[tuple[str, float]] | None,
    adapter_param: str = "adapter",
) -> tuple[ResolvedTarget | None, list[tuple[ResolvedTarget, float]] | None]:
    """A request's adapter (``adapter_param``) or composition (``adapters.<i>.name``), each resolved once
    (every name's form is checked first: a malformed one is a 422 before any is looked up)."""
    from service.adapters import store

    for i, (name, _) in enumerate(composition or []):
        store.check_ref(name, f"adapters.{i}.name")
    target = resolve_target(adapter_dir, adapter, adapter_param) if adapter is not None else None
    if composition is None:
        return target, None
    parts = [
        (resolve_target(adapter_dir, name, f"adapters.{i}.name"), weight)
        for i, (name, weight) in enumerate(composition)
    ]
    return target, parts


def template_of(
    target: ResolvedTarget | None,
    composition: list[tuple[ResolvedTarget, float]] | None = None,
    base: Template | None = None,
) -> Template:
    """The prompt template a request renders with (``loracore.template.choose_template``): the base's own
    chat template ``base`` when it has one, else its adapter's, a composition's first adapter's, or the
    default one for the base."""
    if base is not None:
        return base
    if composition:
        return composition[0][0].template
    return target.template if target is not None else DEFAULT_TEMPLATE


def prepare_job(
    *,
    prompt_text: str | list[int],
    target: ResolvedTarget | None,
    params: SamplingParams,
    stream: bool,
    limits: ModelLimits,
    max_new_tokens_cap: int,
    request_timeout: float,
    max_tokens_param: str = "max_new_tokens",
    composition: list[tuple[ResolvedTarget, float]] | None = None,
) -> Job:
    """Validate one generation request and turn it into a worker job; raises ApiError (4xx).

    ``prompt_text`` is final (already rendered with the target's template when the route wants one),
    or the prompt's token ids (OpenAI's completions accept them; each must be in the vocabulary);
    ``params`` are the request's ``SamplingParams``; ``target`` is the adapter (None: the base) and
    ``composition`` the ``(adapter, weight)`` entries of a weighted composition (then ``target`` is
    None), both resolved once by ``resolve_targets``: the job names exactly those versions. Every check
    here uses only the tokenizer.
    """
    max_new = params.max_new_tokens
    if max_new > max_new_tokens_cap:
        raise ApiError(
            422,
            "max_new_tokens_too_large",
            f"{max_tokens_param} is {max_new}; this server allows at most {max_new_tokens_cap}",
            max_tokens_param,
        )
    bias = params.logit_bias
    outside = sorted(t for t in bias if not 0 <= t < limits.vocab)
    if outside:
        raise ApiError(
            422,
            "invalid_request",
            f"logit_bias has token id {outside[0]}, outside the model's vocabulary of {limits.vocab} tokens "
            f"(ids 0..{limits.vocab - 1})",
            "logit_bias",
        )
    if isinstance(prompt_text, str):
        limits.check_prompt_chars(prompt_text)
        prompt_ids = limits.tokenizer.encode(prompt_text)
    else:
        prompt_ids = list(prompt_text)
        outside = [t for t in prompt_ids if not 0 <= t < limits.vocab]
        if outside:
            raise ApiError(
                422,
                "invalid_request",
                f"the prompt has token id {outside[0]}, outside the model's vocabulary of {limits.vocab} "
                f"tokens (ids 0..{limits.vocab - 1})",
                "prompt",
            )
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
        adapter=target.ref if target is not None else None,
        params=params,
        stream=stream,
        arrived=now,
        deadline=now + request_timeout,
        adapters=tuple((t.ref, w) for t, w in composition) if composition is not None else None,
    )


def json_schema_text(schema: Any, param: str) -> str:
    """The canonical text of a request's JSON schema (what the job carries); 422 naming the problem,
    with the keyword the grammar compiler refused, before anything is queued."""
    try:
        return structured.check(schema)
    except structured.SchemaError as exc:
        raise ApiError(422, "invalid_json_schema", str(exc), param) from None


class Overloaded(ApiError):
    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(503, "overloaded", message, headers={"Retry-After": str(retry_after)})


def _retry_after(seconds: float) -> int:
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds)))


@dataclass
class Submission:
    """One job on its way through the worker; ``next_event`` returns what the worker sends back."""

    client: EngineClient
    job: Job
    reply: Reply
    generation: int = 0  # the worker generation it was queued to (``Server.worker_generation``)
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
        server = self.client.server
        try:
            data, ok = await next_reply(
                self.reply, self.remaining, lambda: server.worker_generation() != self.generation
            )
        except WorkerLost:
            # not done: close() still cancels it, in case it waits in the queue for the new worker
            message = "the generation worker stopped while handling this request and is restarting; retry"
            return Event.failure(self.job_id, WireError.of("worker_restarted", message))
        if not ok or not isinstance(data, dict):  # LitServe-level failure
            self.done = True
            return Event.failure(self.job_id, WireError.of("generation_failed", describe_failure(data)))
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
        if not close_reply(self.client.server, self.reply):
            return
        if not self.done:
            self.done = True
            self.client.cancel(self.job_id)
        self.client.release(self.job)


class EngineClient:
    """Submits jobs from an API-server process to the generation worker through LitServe's queues.

    Admission is by load. A job is refused early (503 ``overloaded`` with Retry-After) when the
    batch and the queue are full (``batch rows + max_queue`` requests in flight), or when the work in
    flight plus its own (their ``max_new_tokens``) would take longer than its deadline at the decode
    rate the worker measures: a refusal now instead of a 504 later for work that could not finish.
    The counters are shared memory created before LitServe forks its API servers, so the bounds hold
    across all of them. The batch's rows and the decode rate come from the worker's status file.
    """

    def __init__(
        self,
        server: Server,
        *,
        max_queue: int,
        status_path: Path,
        max_batch_size: int | None = None,
    ) -> None:
        self.server = server
        self.max_queue = max_queue
        self.status_path = status_path
        self.max_batch_size = max_batch_size
        fork = mp.get_context("fork")
        self._in_flight = fork.Value("i", 0)
        self._work = fork.Value("q", 0, lock=False)  # max_new_tokens in flight; under _in_flight's lock
        self._status: tuple[float, dict[str, Any]] = (-1.0, {})

    def worker_status(self) -> dict[str, Any]:
        """The worker's status file, read at most every ``STATUS_EVERY_S`` by this process."""
        at, status = self._status
        now = time.monotonic()
        if now - at >= STATUS_EVERY_S:
            status = read_status(self.status_path) or status
            self._status = (now, status)
        return status

    @property
    def batch_rows(self) -> int:
        rows = (self.worker_status().get("batch") or {}).get("rows")
        if isinstance(rows, int) and rows > 0:
            return rows
        return self.max_batch_size or 1  # before the worker has published its plan

    @property
    def max_in_flight(self) -> int:
        return self.batch_rows + self.max_queue

    @property
    def in_flight(self) -> int:
        return self._in_flight.value

    def reserve(self, job: Job) -> None:
        """Take a slot for ``job`` or raise Overloaded; ``release(job)`` gives it back."""
        limit = self.max_in_flight
        load = read_load(self.worker_status())
        rate = load.tokens_per_s if load is not None else None
        cost = int(job.params.max_new_tokens)
        with self._in_flight.get_lock():
            n, work = self._in_flight.value, self._work.value
            if n >= limit:
                drain = (work / n) / rate if rate and n else RETRY_AFTER_S
                raise Overloaded(
                    f"the server is at its limit of {limit} generation requests in flight; retry shortly",
                    _retry_after(drain),
                )
            if rate and n:  # an idle server always admits: a request alone is never refused
                need = (work + cost) / rate
                left = job.deadline - time.monotonic()
                if need > left:
                    raise Overloaded(
                        f"the server would not finish this request within its deadline: {work + cost} "
                        f"tokens in flight with this one take about {need:.0f} s at the current "
                        f"{rate:.0f} tokens/s, and {max(0.0, left):.0f} s remain; retry later or ask "
                        "for fewer tokens",
                        _retry_after(need - left),
                    )
            self._in_flight.value = n + 1
            self._work.value = work + cost

    def release(self, job: Job) -> None:
        with self._in_flight.get_lock():
            self._in_flight.value = max(0, self._in_flight.value - 1)
            self._work.value = max(0, self._work.value - int(job.params.max_new_tokens))

    def submit(self, job: Job, request: Any) -> Submission:
        """Queue ``job`` (the caller has reserved a slot); its events come back to the API server
        that received ``request``."""
        if not self.server.worker_up():
            self.release(job)
            raise api_error(
                WireError.of("worker_restarted", "the generation worker is restarting (loading the model)")
            )
        generation = self.server.worker_generation()
        reply = open_reply(self.server)
        try:
            put_request(self.server, consumer_id(request), reply.uid, job.to_dict())
        except Exception as exc:  # the manager is gone: the server is shutting down
            close_reply(self.server, reply)
            self.release(job)
            raise ApiError(
                503,
                "unavailable",
                "the generation worker is not reachable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from exc
        return Submission(self, job, reply, generation)

    def cancel(self, job_id: str) -> None:
        try:
            put_request(self.server, None, None, Cancel(job_id).to_dict())
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


def api_error(error: WireError) -> ApiError:
    """The ApiError a route answers for ``error``, its status (and Retry-After) from the one table
    (``service.errors``)."""
    return domain_error(error.code, error.message, error.param)


def error_payload(error: WireError) -> dict[str, Any]:
    """The error envelope for ``error``, for an SSE line once the stream's 200 has been sent."""
    return error_body(http_status(error.code), error.code, error.message, error.param)


def raise_for_event(event: Event) -> None:
    """Turn a worker error event into the ApiError the route answers with."""
    if event.error is not None:
        raise api_error(event.error)

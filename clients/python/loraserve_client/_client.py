"""``Client`` and ``AsyncClient``: each owns an httpx client, sends ``_core`` ops with retries, and iterates
server-sent events. Every endpoint method is a one-liner over ``_core``; the two classes differ only in I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx

from . import _core
from ._core import DEFAULT_TIMEOUT, DONE, SKIP, GenerateParams, Op, PathLike, RetryPolicy
from ._exceptions import APIConnectionError, APIStatusError, LoraserveError
from ._progress import ProgressArg, ProgressDisplay
from .types import AdapterInfo, Dataset, GeneratedToken, Generation, Job, JobEvent, PromptToken, Usage

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")
Rows = Iterable[Mapping[str, Any]]
TimeoutArg = float | httpx.Timeout | None


class _Config:
    """Settings shared by both clients (no I/O)."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: TimeoutArg,
        retries: int | RetryPolicy,
        headers: Mapping[str, str] | None,
    ):
        self.base_url = _core.resolve_base_url(base_url)
        self.api_key = _core.resolve_api_key(api_key)
        self.timeout = httpx.Timeout(timeout)
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_retries=retries)
        self.headers = _core.default_headers(self.api_key, headers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


# ============================================================== sync


class Client(_Config):
    """A loraserve server. ``with Client() as client: client.generate("Hi")``.

    ``base_url`` defaults to ``$LORASERVE_URL`` or http://127.0.0.1:8000, ``api_key`` to
    ``$LORASERVE_API_KEY`` (sent as ``Authorization: Bearer``). ``timeout``: seconds or an ``httpx.Timeout``
    (default 60 s, 5 s to connect). ``retries``: how many times to repeat a request after a connection error
    or 429/502/503/504, or a ``RetryPolicy``. ``transport``: an httpx transport (tests pass
    ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 2,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retries, headers)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self.adapters = Adapters(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)

    # ---- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport
    def _send(self, op: Op[Any], *, stream: bool = False) -> httpx.Response:
        """Send ``op`` with retries and return its 2xx response: read and closed, or open when ``stream``."""
        attempt = 0
        while True:
            request = _core.build_request(self._http, op)
            error: LoraserveError
            try:
                response = self._http.send(request, stream=True)
                if not (stream and response.is_success):
                    try:
                        response.read()
                    finally:
                        response.close()
            except httpx.RequestError as exc:
                error = _core.connection_error(exc, request)
            else:
                if response.is_success:
                    return response
                error = _core.status_error(response)
            delay = self.retry.delay(op, attempt, error)
            if delay is None:
                raise error
            _core.log_retry(op, attempt, delay, error)
            time.sleep(delay)
            attempt += 1

    def _request(self, op: Op[T]) -> T:
        return op.parse(self._send(op))

    # ---- endpoints
    def health(self) -> dict[str, Any]:
        return self._request(_core.health())

    def generate(
        self, prompt: str, adapter: str | None = None, **params: Unpack[GenerateParams]
    ) -> Generation:
        """Complete ``prompt`` with ``adapter`` (None: the base model). Parameters: ``max_new_tokens``,
        ``temperature`` (0 is greedy), ``top_p``, ``top_k``, ``seed``, ``stop`` (str or list), ``raw`` (skip
        the adapter's prompt template), ``logprobs``, ``frequency_penalty``, ``presence_penalty``,
        ``logit_bias`` (token id -> bias), ``json_schema`` (JSON output following a schema, True: any
        JSON object); unset ones take the server's defaults."""
        return self._request(_core.generate(prompt, adapter, params))

    def stream(self, prompt: str, adapter: str | None = None, **params: Unpack[GenerateParams]) -> TextStream:
        """Like ``generate``, but iterate the text as it is produced: ``for delta in client.stream(...)``.
        After the loop the stream has ``text``, ``finish_reason`` and ``usage``."""
        return TextStream(self, _core.generate_stream(prompt, adapter, params), _core.GenerationStreamState())

    def train(
        self,
        adapter: str,
        data: Rows | PathLike | None = None,
        *,
        dataset: str | None = None,
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        validation: Rows | PathLike | None = None,
        validation_dataset: str | None = None,
        method: str | None = None,
        init_adapter: str | None = None,
    ) -> TrainingJob:
        """Queue training of ``adapter`` on ``data`` (rows, or a .jsonl path uploaded first as a dataset) or
        on an uploaded ``dataset`` id. ``config`` is a partial trainer config, e.g. ``{"training":
        {"num_train_epochs": 5}}``. ``validation`` (rows or a path, uploaded likewise) or
        ``validation_dataset`` are evaluated on instead of a held-out part of the rows; the adapter
        published is the best evaluation's. ``method`` is "sft" (default) or "dpo" (preference rows
        ``{"prompt", "chosen", "rejected"}``); ``init_adapter`` ("name" or "name@version") starts from an
        existing adapter's weights. Returns at once; ``.wait()`` on the result to follow it."""
        if _core.is_path(data):
            dataset, data = self.datasets.upload(data).dataset, None  # type: ignore[arg-type]
        if _core.is_path(validation):
            validation_dataset, validation = self.datasets.upload(validation).dataset, None  # type: ignore[arg-type]
        op = _core.train(
            adapter,
            data=data,  # type: ignore[arg-type]
            dataset=dataset,
            config=config,
            overwrite=overwrite,
            validation=validation,  # type: ignore[arg-type]
            validation_dataset=validation_dataset,
            method=method,
            init_adapter=init_adapter,
        )
        return TrainingJob(self, self._request(op))

    def job(self, job_id: str) -> TrainingJob:
        """A handle on an existing job (fetches its current state)."""
        return TrainingJob(self, self.jobs.get(job_id))


class _Resource:
    def __init__(self, client: Any):
        self._client = client


class Adapters(_Resource):
    _client: Client

    def list(self) -> list[AdapterInfo]:
        return self._client._request(_core.list_adapters())

    def get(self, name: str) -> AdapterInfo:
        return self._client._request(_core.get_adapter(name))

    def upload(
        self, name: str, folder: PathLike, *, template: Mapping[str, Any] | None = None
    ) -> AdapterInfo:
        """Publish a PEFT adapter folder under ``name`` (replacing an adapter of that name)."""
        return self._client._request(_core.upload_adapter(name, folder, template))

    def delete(self, name: str) -> str:
        return self._client._request(_core.delete_adapter(name))

    def pin(self, name: str) -> AdapterInfo:
        """Keep ``name`` loaded on the server and never evicted (at most ``--max-loaded-adapters``)."""
        return self._client._request(_core.pin_adapter(name))

    def unpin(self, name: str) -> AdapterInfo:
        return self._client._request(_core.pin_adapter(name, pinned=False))

    def export(self, adapters: str | Sequence[str], format: str, out: PathLike) -> Path:
        """Download ``adapters`` (a name, ``name@<version>``, or ``["alpha:0.6", "beta:0.4"]``) as ``format``
        (gguf, merged, peft) to ``out``: a .gguf file, a model folder (merged) or a .zip (peft)."""
        op = _core.export_adapter(adapters, format)
        part = _core.export_target(out)
        response = self._client._send(op, stream=True)
        try:
            with open(part, "wb") as fh:
                for block in response.iter_bytes(1 << 20):
                    fh.write(block)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            response.close()
        return _core.finish_export(format, part, out)


class Datasets(_Resource):
    _client: Client

    def upload(self, source: PathLike | Rows) -> Dataset:
        """Store training rows (a .jsonl/.json path or a list of rows) for ``train(dataset=id)``."""
        return self._client._request(_core.upload_dataset(source))


class Jobs(_Resource):
    _client: Client

    def list(self, status: str | None = None) -> list[Job]:
        return self._client._request(_core.list_jobs(status))

    def get(self, job_id: str) -> Job:
        return self._client._request(_core.get_job(job_id))

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: stops at the next step (the answer may still say running)."""
        return self._client._request(_core.cancel_job(job_id))

    def pause(self, job_id: str) -> Job:
        """Queued: paused at once. Running: checkpoints at the next step and frees its slot (the answer may
        still say running, with ``pause_requested``)."""
        return self._client._request(_core.pause_job(job_id))

    def resume(self, job_id: str) -> Job:
        """Paused: queued again; it resumes from the pause's checkpoint with the same loss curve."""
        return self._client._request(_core.resume_job(job_id))

    def logs(self, job_id: str) -> str:
        return self._client._request(_core.job_logs(job_id))

    def events(self, job_id: str) -> EventStream[JobEvent]:
        """Iterate the job's progress events as they happen; the iteration ends when the job ends."""
        return EventStream(self._client, _core.job_events(job_id), _core.JobEventState())

    def wait(
        self,
        job_id: str,
        *,
        progress: ProgressArg = True,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        check: bool = True,
        reconnect_for: float = 300.0,
    ) -> Job:
        """Poll until the job ends and return its final state. ``check``: raise ``JobFailedError`` unless it
        succeeded. ``timeout`` (seconds): raise ``JobTimeoutError`` (the job keeps running). A server that
        is unreachable or overloaded for less than ``reconnect_for`` seconds in a row (a restart) is waited
        out."""
        waiter = _core.Waiter(job_id, progress, timeout, poll_interval, reconnect_for)
        try:
            while True:
                try:
                    if waiter.seen(self.get(job_id)):
                        return waiter.finish(check)
                except (APIConnectionError, APIStatusError) as exc:
                    waiter.failed(exc)
                time.sleep(waiter.pause())
        finally:
            waiter.close()


class TrainingJob:
    """A queued training job: ``job = client.train(...); job.wait()``. ``job.job`` is the last state seen."""

    def __init__(self, client: Client, job: Job):
        self._client = client
        self.job = job

    @property
    def id(self) -> str:
        return self.job.job_id

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def adapter(self) -> str | None:
        return self.job.adapter

    def refresh(self) -> Job:
        self.job = self._client.jobs.get(self.id)
        return self.job

    def wait(
        self,
        progress: ProgressArg = True,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
        check: bool = True,
        reconnect_for: float = 300.0,
    ) -> Job:
        """See ``jobs.wait``; ``job.job`` follows every state seen, also when this raises."""
        display = ProgressDisplay(progress)

        def seen(job: Job) -> None:
            self.job = job
            display.update(job)

        try:
            self._client.jobs.wait(
                self.id,
                progress=seen,
                timeout=timeout,
                poll_interval=poll_interval,
                check=check,
                reconnect_for=reconnect_for,
            )
        finally:
            display.close()
        return self.job

    def events(self) -> EventStream[JobEvent]:
        return self._client.jobs.events(self.id)

    def cancel(self) -> Job:
        self.job = self._client.jobs.cancel(self.id)
        return self.job

    def pause(self) -> Job:
        self.job = self._client.jobs.pause(self.id)
        return self.job

    def resume(self) -> Job:
        self.job = self._client.jobs.resume(self.id)
        return self.job

    def logs(self) -> str:
        return self._client.jobs.logs(self.id)

    def __repr__(self) -> str:
        return f"TrainingJob({self.id!r}, adapter={self.adapter!r}, status={self.status!r})"


ItemT = TypeVar("ItemT")


class _StreamBase(Generic[ItemT]):
    def __init__(self, client: Any, op: Op[Any], state: Any):
        self._client = client
        self._op = op
        self.state = state
        self._response: httpx.Response | None = None
        self._started = False

    def _item(self, data: str) -> Any:
        return self.state.feed(data, self._response)


class EventStream(_StreamBase[ItemT]):
    """Server-sent events of one request. Iterate it once; ``with`` (or reaching the end) closes it. The
    request is sent when the iteration (or the ``with`` block) starts."""

    def _open(self) -> httpx.Response:
        if self._response is None:
            self._response = self._client._send(self._op, stream=True)
        return self._response

    def __enter__(self) -> EventStream[ItemT]:
        self._open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Iterator[ItemT]:
        if self._started:
            raise RuntimeError("a stream can be iterated only once")
        self._started = True
        response = self._open()
        decoder = _core.SSEDecoder()
        try:
            try:
                for line in response.iter_lines():
                    data = decoder.feed(line)
                    item = SKIP if data is None else self._item(data)
                    if item is DONE:
                        return
                    if item is not SKIP:
                        yield item
                data = decoder.flush()
                item = SKIP if data is None else self._item(data)
                if item is not DONE and item is not SKIP:
                    yield item
            except httpx.RequestError as exc:
                raise _core.connection_error(exc, response.request) from exc
        finally:
            self.close()


class TextStream(EventStream[str]):
    """Text deltas of a streamed generation; ``text``, ``finish_reason`` and ``usage`` once iterated."""

    state: _core.GenerationStreamState

    @property
    def text(self) -> str:
        return self.state.text

    @property
    def finish_reason(self) -> str | None:
        return self.state.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self.state.usage

    @property
    def tokens(self) -> list[GeneratedToken] | None:
        """With ``logprobs``: every token streamed so far, with its log-probabilities."""
        return self.state.tokens

    @property
    def prompt_logprobs(self) -> list[PromptToken] | None:
        """With ``prompt_logprobs``: every prompt token, from the stream's first event."""
        return self.state.prompt_logprobs


# ============================================================== async


class AsyncClient(_Config):
    """The asyncio twin of ``Client``, the same methods awaited: ``async with AsyncClient() as c: ...``"""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = 2,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, timeout, retries, headers)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )
        self.adapters = AsyncAdapters(self)
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, op: Op[Any], *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = _core.build_request(self._http, op)
            error: LoraserveError
            try:
                response = await self._http.send(request, stream=True)
                if not (stream and response.is_success):
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.RequestError as exc:
                error = _core.connection_error(exc, request)
            else:
                if response.is_success:
                    return response
                error = _core.status_error(response)
            delay = self.retry.delay(op, attempt, error)
            if delay is None:
                raise error
            _core.log_retry(op, attempt, delay, error)
            await asyncio.sleep(delay)
            attempt += 1

    async def _request(self, op: Op[T]) -> T:
        return op.parse(await self._send(op))

    async def health(self) -> dict[str, Any]:
        return await self._request(_core.health())

    async def generate(
        self, prompt: str, adapter: str | None = None, **params: Unpack[GenerateParams]
    ) -> Generation:
        return await self._request(_core.generate(prompt, adapter, params))

    def stream(
        self, prompt: str, adapter: str | None = None, **params: Unpack[GenerateParams]
    ) -> AsyncTextStream:
        """``async for delta in client.stream(...)``."""
        return AsyncTextStream(
            self, _core.generate_stream(prompt, adapter, params), _core.GenerationStreamState()
        )

    async def train(
        self,
        adapter: str,
        data: Rows | PathLike | None = None,
        *,
        dataset: str | None = None,
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        validation: Rows | PathLike | None = None,
        validation_dataset: str | None = None,
        method: str | None = None,
        init_adapter: str | None = None,
    ) -> AsyncTrainingJob:
        if _core.is_path(data):
            dataset, data = (await self.datasets.upload(data)).dataset, None  # type: ignore[arg-type]
        if _core.is_path(validation):
            validation_dataset, validation = (await self.datasets.upload(validation)).dataset, None  # type: ignore[arg-type]
        op = _core.train(
            adapter,
            data=data,  # type: ignore[arg-type]
            dataset=dataset,
            config=config,
            overwrite=overwrite,
            validation=validation,  # type: ignore[arg-type]
            validation_dataset=validation_dataset,
            method=method,
            init_adapter=init_adapter,
        )
        return AsyncTrainingJob(self, await self._request(op))

    async def job(self, job_id: str) -> AsyncTrainingJob:
        return AsyncTrainingJob(self, await self.jobs.get(job_id))


class AsyncAdapters(_Resource):
    _client: AsyncClient

    async def list(self) -> list[AdapterInfo]:
        return await self._client._request(_core.list_adapters())

    async def get(self, name: str) -> AdapterInfo:
        return await self._client._request(_core.get_adapter(name))

    async def upload(
        self, name: str, folder: PathLike, *, template: Mapping[str, Any] | None = None
    ) -> AdapterInfo:
        return await self._client._request(_core.upload_adapter(name, folder, template))

    async def delete(self, name: str) -> str:
        return await self._client._request(_core.delete_adapter(name))

    async def pin(self, name: str) -> AdapterInfo:
        return await self._client._request(_core.pin_adapter(name))

    async def unpin(self, name: str) -> AdapterInfo:
        return await self._client._request(_core.pin_adapter(name, pinned=False))

    async def export(self, adapters: str | Sequence[str], format: str, out: PathLike) -> Path:
        op = _core.export_adapter(adapters, format)
        part = _core.export_target(out)
        response = await self._client._send(op, stream=True)
        try:
            with open(part, "wb") as fh:
                async for block in response.aiter_bytes(1 << 20):
                    fh.write(block)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            await response.aclose()
        return _core.finish_export(format, part, out)


class AsyncDatasets(_Resource):
    _client: AsyncClient

    async def upload(self, source: PathLike | Rows) -> Dataset:
        return await self._client._request(_core.upload_dataset(source))


class AsyncJobs(_Resource):
    _client: AsyncClient

    async def list(self, status: str | None = None) -> list[Job]:
        return await self._client._request(_core.list_jobs(status))

    async def get(self, job_id: str) -> Job:
        return await self._client._request(_core.get_job(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._client._request(_core.cancel_job(job_id))

    async def pause(self, job_id: str) -> Job:
        return await self._client._request(_core.pause_job(job_id))

    async def resume(self, job_id: str) -> Job:
        return await self._client._request(_core.resume_job(job_id))

    async def logs(self, job_id: str) -> str:
        return await self._client._request(_core.job_logs(job_id))

    def events(self, job_id: str) -> AsyncEventStream[JobEvent]:
        return AsyncEventStream(self._client, _core.job_events(job_id), _core.JobEventState())

    async def wait(
        self,
        job_id: str,
        *,
        progress: ProgressArg = True,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        check: bool = True,
        reconnect_for: float = 300.0,
    ) -> Job:
        waiter = _core.Waiter(job_id, progress, timeout, poll_interval, reconnect_for)
        try:
            while True:
                try:
                    if waiter.seen(await self.get(job_id)):
                        return waiter.finish(check)
                except (APIConnectionError, APIStatusError) as exc:
                    waiter.failed(exc)
                await asyncio.sleep(waiter.pause())
        finally:
            waiter.close()


class AsyncTrainingJob:
    """The asyncio twin of ``TrainingJob``."""

    def __init__(self, client: AsyncClient, job: Job):
        self._client = client
        self.job = job

    id = TrainingJob.id
    status = TrainingJob.status
    adapter = TrainingJob.adapter
    __repr__ = TrainingJob.__repr__

    async def refresh(self) -> Job:
        self.job = await self._client.jobs.get(self.id)
        return self.job

    async def wait(
        self,
        progress: ProgressArg = True,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
        check: bool = True,
        reconnect_for: float = 300.0,
    ) -> Job:
        """See ``jobs.wait``; ``job.job`` follows every state seen, also when this raises."""
        display = ProgressDisplay(progress)

        def seen(job: Job) -> None:
            self.job = job
            display.update(job)

        try:
            await self._client.jobs.wait(
                self.id,
                progress=seen,
                timeout=timeout,
                poll_interval=poll_interval,
                check=check,
                reconnect_for=reconnect_for,
            )
        finally:
            display.close()
        return self.job

    def events(self) -> AsyncEventStream[JobEvent]:
        return self._client.jobs.events(self.id)

    async def cancel(self) -> Job:
        self.job = await self._client.jobs.cancel(self.id)
        return self.job

    async def pause(self) -> Job:
        self.job = await self._client.jobs.pause(self.id)
        return self.job

    async def resume(self) -> Job:
        self.job = await self._client.jobs.resume(self.id)
        return self.job

    async def logs(self) -> str:
        return await self._client.jobs.logs(self.id)


class AsyncEventStream(_StreamBase[ItemT]):
    """``async for item in stream``; ``async with`` (or reaching the end) closes it."""

    async def _open(self) -> httpx.Response:
        if self._response is None:
            self._response = await self._client._send(self._op, stream=True)
        return self._response

    async def __aenter__(self) -> AsyncEventStream[ItemT]:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()

    async def __aiter__(self) -> AsyncIterator[ItemT]:
        if self._started:
            raise RuntimeError("a stream can be iterated only once")
        self._started = True
        response = await self._open()
        decoder = _core.SSEDecoder()
        try:
            try:
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    item = SKIP if data is None else self._item(data)
                    if item is DONE:
                        return
                    if item is not SKIP:
                        yield item
                data = decoder.flush()
                item = SKIP if data is None else self._item(data)
                if item is not DONE and item is not SKIP:
                    yield item
            except httpx.RequestError as exc:
                raise _core.connection_error(exc, response.request) from exc
        finally:
            await self.aclose()


class AsyncTextStream(AsyncEventStream[str]):
    state: _core.GenerationStreamState

    text = TextStream.text
    finish_reason = TextStream.finish_reason
    usage = TextStream.usage
    tokens = TextStream.tokens
    prompt_logprobs = TextStream.prompt_logprobs

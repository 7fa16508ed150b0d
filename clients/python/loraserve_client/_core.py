"""Everything that does no I/O, shared by ``Client`` and ``AsyncClient``.

An endpoint is an ``Op``: how to build its request and how to parse its response. The two clients only send
ops (``_send``) and sleep between retries; they hold no endpoint logic of their own. The retry policy, error
mapping, server-sent-event decoding and the bookkeeping of ``wait()`` live here too; the progress display is
``_progress.py`` and the exceptions (with ``Retry-After`` parsing) are ``_exceptions.py``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

import httpx

from ._exceptions import (
    STATUS_ERRORS,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    JobFailedError,
    JobTimeoutError,
    LoraserveError,
)
from ._progress import ProgressArg, ProgressDisplay
from .types import AdapterInfo, Dataset, GeneratedToken, Generation, Job, JobEvent, PromptToken, Usage

__version__ = "0.1.0"
log = logging.getLogger("loraserve_client")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Generation and uploads can take long; a dead host should not.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Statuses that say the server refused the request before doing anything: safe to repeat any request.
REFUSED_STATUSES = frozenset({429, 503})

T = TypeVar("T")
PathLike = str | os.PathLike


# ---------------------------------------------------------------- configuration


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or os.environ.get("LORASERVE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if httpx.URL(url).scheme not in ("http", "https"):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get("LORASERVE_API_KEY") or None)


def default_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"loraserve-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


# ---------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on connection errors and on 429/502/503/504.

    The delay is the server's ``Retry-After`` when it sends one (up to ``max_retry_after``; a longer wait is
    not retried but raised, with ``retry_after`` on the error), else exponential backoff with jitter:
    ``min(initial_delay * 2**attempt, max_delay) * (1 - jitter * random())``.
    """

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    jitter: float = 0.25

    def backoff(self, attempt: int) -> float:
        return min(self.initial_delay * 2**attempt, self.max_delay) * (1 - self.jitter * random.random())

    def delay(self, op: Op[Any], attempt: int, error: LoraserveError) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to raise ``error`` now."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, APIConnectionError):
            retryable = getattr(error, "_retryable", True)
            # A request that may have reached the server is repeated only when repeating it is harmless.
            if not retryable or (error.sent and not op.idempotent):
                return None
            return self.backoff(attempt)
        if isinstance(error, APIStatusError) and error.status_code in RETRY_STATUSES:
            if not op.idempotent and error.status_code not in REFUSED_STATUSES:
                return None
            after = error.retry_after
            if after is None:
                return self.backoff(attempt)
            return after if after <= self.max_retry_after else None
        return None


def log_retry(op: Op[Any], attempt: int, delay: float, error: LoraserveError) -> None:
    log.info("%s %s failed (%s); retry %d in %.2fs", op.method, op.path, error, attempt + 1, delay)


# ---------------------------------------------------------------- ops: request building and parsing


@dataclass
class Op(Generic[T]):
    """One endpoint call: the request to build and how to read a successful response.

    ``idempotent`` ops are retried on any retryable failure; the others only when the server certainly did
    nothing (the connection never opened, or 429/503).
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True
    timeout: httpx.Timeout | None = None


def build_request(http: httpx.Client | httpx.AsyncClient, op: Op[Any]) -> httpx.Request:
    """Built afresh for every attempt: a multipart body is a stream and is consumed by sending it."""
    return http.build_request(
        op.method,
        op.path,
        params=op.params,
        json=op.json,
        content=op.content,
        files=op.files,
        data=op.data,
        headers=op.headers,
        timeout=op.timeout if op.timeout is not None else httpx.USE_CLIENT_DEFAULT,
    )


def read_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        req = response.request
        raise LoraserveError(
            f"{req.method} {req.url} answered {response.status_code} with a body that is not JSON: "
            f"{response.text[:200]!r}"
        ) from exc


def _model(cls: Any) -> Callable[[httpx.Response], Any]:
    return lambda response: cls.model_validate(read_json(response))


def _segment(value: str, what: str) -> str:
    """One URL path segment; names that would change the path itself are refused here."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value:
        raise ValueError(f"invalid {what}: {value!r}")
    return urllib.parse.quote(value, safe="")


class GenerateParams(TypedDict, total=False):
    """Sampling parameters of ``generate``/``stream``; any left out (or None) take the server's defaults."""

    max_new_tokens: int | None
    temperature: float | None  # 0 is greedy
    top_p: float | None
    top_k: int | None  # 0 disables top-k
    seed: int | None  # makes sampling reproducible
    stop: str | list[str] | None  # a matched stop string ends the text and is not included
    raw: bool  # True: send the prompt as is, without the adapter's template
    logprobs: int | None  # 0-20: per generated token its logprob and the k most likely tokens
    prompt_logprobs: int | None  # 0-20: per prompt token its logprob and the k most likely there
    frequency_penalty: float | None  # -2..2
    presence_penalty: float | None  # -2..2
    logit_bias: Mapping[int, float] | None  # token id -> -100..100
    json_schema: dict[str, Any] | bool | None  # the text is JSON following this schema; True: any object
    adapters: Mapping[str, float] | None  # a weighted composition {name: weight} instead of one adapter


def generate_body(
    prompt: str, adapter: str | None, params: Mapping[str, Any], stream: bool
) -> dict[str, Any]:
    """Only what the caller set is sent, so the server's defaults apply to the rest."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    unknown = set(params) - set(GenerateParams.__annotations__)
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"prompt": prompt, "adapter": adapter}
    body.update(
        {
            k: v
            for k, v in params.items()
            if v is not None and k not in ("stop", "raw", "logit_bias", "adapters")
        }
    )
    bias = params.get("logit_bias")
    if bias is not None:  # JSON object keys are strings
        body["logit_bias"] = {str(token): value for token, value in bias.items()}
    adapters = params.get("adapters")
    if adapters is not None:
        body["adapters"] = [{"name": name, "weight": weight} for name, weight in adapters.items()]
    stop = params.get("stop")
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if params.get("raw"):
        body["raw"] = True
    if stream:
        body["stream"] = True
    return body


def generate(prompt: str, adapter: str | None, params: Mapping[str, Any]) -> Op[Generation]:
    return Op("POST", "/generate", _model(Generation), json=generate_body(prompt, adapter, params, False))


def generate_stream(prompt: str, adapter: str | None, params: Mapping[str, Any]) -> Op[None]:
    body = generate_body(prompt, adapter, params, True)
    return Op("POST", "/generate", _no_parse, json=body, headers={"Accept": "text/event-stream"})


def health() -> Op[dict[str, Any]]:
    return Op("GET", "/health", read_json)


def list_adapters() -> Op[list[AdapterInfo]]:
    return Op("GET", "/adapters", lambda r: [AdapterInfo.model_validate(a) for a in read_json(r)["adapters"]])


def get_adapter(name: str) -> Op[AdapterInfo]:
    return Op("GET", f"/adapters/{_segment(name, 'adapter name')}", _model(AdapterInfo))


def delete_adapter(name: str) -> Op[str]:
    return Op(
        "DELETE", f"/adapters/{_segment(name, 'adapter name')}", lambda r: read_json(r).get("deleted", name)
    )


def pin_adapter(name: str, pinned: bool = True) -> Op[AdapterInfo]:
    """Keep the adapter loaded on the server (never evicted), or let it be evicted again."""
    return Op(
        "PUT" if pinned else "DELETE", f"/adapters/{_segment(name, 'adapter name')}/pin", _model(AdapterInfo)
    )


def upload_adapter(name: str, folder: PathLike, template: Mapping[str, Any] | None = None) -> Op[AdapterInfo]:
    """A PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors``, and the prompt template from
    ``loraserve.json`` when the folder has one (``template`` overrides it)."""
    folder = Path(folder)
    files = {}
    for field_name, filename, ctype in (
        ("adapter_config", "adapter_config.json", "application/json"),
        ("adapter_model", "adapter_model.safetensors", "application/octet-stream"),
    ):
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {filename} is missing")
        files[field_name] = (filename, path.read_bytes(), ctype)
    if template is None and (folder / "loraserve.json").is_file():
        template = json.loads((folder / "loraserve.json").read_text(encoding="utf-8")).get("template")
    data = {"template": json.dumps(template)} if template else None
    # PUT replaces with the same content when repeated, so it is safe to retry.
    return Op(
        "PUT", f"/adapters/{_segment(name, 'adapter name')}", _model(AdapterInfo), files=files, data=data
    )


EXPORT_FORMATS = ("gguf", "merged", "peft")
# An export is built before its first byte is sent (a merged model: seconds to minutes).
EXPORT_TIMEOUT = httpx.Timeout(60.0, connect=5.0, read=900.0)


def export_adapter(adapters: str | Sequence[str], format: str) -> Op[None]:
    """Download op of an export. ``adapters``: ``"name"`` / ``"name@<version>"`` (one adapter), or
    ``["alpha:0.6", "beta:0.4"]`` (``name[@version][:weight]``, a weighted composition)."""
    refs = [adapters] if isinstance(adapters, str) else list(adapters)
    if not refs:
        raise ValueError("name at least one adapter to export")
    if len(refs) == 1 and ":" not in refs[0] and "," not in refs[0]:
        path = f"/adapters/{_segment(refs[0], 'adapter name')}/export"
        return Op("GET", path, _no_parse, params={"format": format}, timeout=EXPORT_TIMEOUT)
    params = {"format": format, "adapters": ",".join(refs)}
    return Op("GET", "/export", _no_parse, params=params, timeout=EXPORT_TIMEOUT)


def export_target(out: PathLike) -> Path:
    """Where a download is written before it is put in place (beside ``out``, so the rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")


def finish_export(format: str, part: Path, out: PathLike) -> Path:
    """Put a finished download in place: a merged model is unpacked into the folder ``out`` (a standard
    Hugging Face folder), a gguf file or a peft zip is renamed to ``out``."""
    out = Path(out)
    try:
        if format != "merged":
            part.replace(out)
            return out
        staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.dir")
        with zipfile.ZipFile(part) as zf:
            zf.extractall(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.replace(out)
        return out
    finally:
        part.unlink(missing_ok=True)


def is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def jsonl_bytes(source: PathLike | Iterable[Mapping[str, Any]]) -> bytes:
    """JSONL for ``POST /datasets`` from a .jsonl file, a .json file holding a list, or rows."""
    if is_path(source):
        raw = Path(source).read_bytes()
        if not raw.lstrip().startswith(b"["):
            return raw
        rows = json.loads(raw)
    else:
        rows = _rows(source)
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _rows(rows: Iterable[Mapping[str, Any]]) -> list[Any]:
    if isinstance(rows, Mapping | str | bytes):
        raise TypeError("rows must be a list of objects, e.g. [{'prompt': ..., 'response': ...}]")
    return list(rows)


def upload_dataset(source: PathLike | Iterable[Mapping[str, Any]]) -> Op[Dataset]:
    # Each POST stores a new dataset, so it is repeated only when the server certainly did not store it.
    return Op(
        "POST",
        "/datasets",
        _model(Dataset),
        content=jsonl_bytes(source),
        headers={"Content-Type": "application/x-ndjson"},
        idempotent=False,
    )


def new_idempotency_key() -> str:
    return f"loraserve-client-{uuid.uuid4().hex}"


def train(
    adapter: str,
    *,
    data: Iterable[Mapping[str, Any]] | None,
    dataset: str | None,
    config: Mapping[str, Any] | None,
    overwrite: bool,
    validation: Iterable[Mapping[str, Any]] | None = None,
    validation_dataset: str | None = None,
    idempotency_key: str | None = None,
    method: str | None = None,
    init_adapter: str | None = None,
) -> Op[Job]:
    """``POST /train`` with one Idempotency-Key for the call: a retry after a lost answer returns the job the
    first attempt queued instead of queueing a second one."""
    if (data is None) == (dataset is None):
        raise ValueError(
            "pass exactly one of data= (rows or a JSONL path) or dataset= (an id from datasets.upload)"
        )
    body: dict[str, Any] = {"adapter": adapter, "overwrite": bool(overwrite)}
    if data is not None:
        body["data"] = _rows(data)
    else:
        body["dataset"] = dataset
    if validation is not None and validation_dataset is not None:
        raise ValueError(
            "pass at most one of validation= (rows or a JSONL path) or validation_dataset= (an id)"
        )
    if validation is not None:
        body["validation_data"] = _rows(validation)
    elif validation_dataset is not None:
        body["validation_dataset"] = validation_dataset
    if config:
        body["config"] = dict(config)
    if method is not None:
        body["method"] = method
    if init_adapter is not None:
        body["init_adapter"] = init_adapter
    headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
    return Op("POST", "/train", _model(Job), json=body, headers=headers)


def list_jobs(status: str | None) -> Op[list[Job]]:
    params = {"status": status} if status else None
    return Op("GET", "/train", lambda r: [Job.model_validate(j) for j in read_json(r)["jobs"]], params=params)


def get_job(job_id: str) -> Op[Job]:
    return Op("GET", f"/train/{_segment(job_id, 'job id')}", _model(Job))


def cancel_job(job_id: str) -> Op[Job]:
    return Op("DELETE", f"/train/{_segment(job_id, 'job id')}", _model(Job))


def pause_job(job_id: str) -> Op[Job]:
    # Pausing a paused job answers it as it is, so a retry is safe.
    return Op("POST", f"/train/{_segment(job_id, 'job id')}/pause", _model(Job))


def resume_job(job_id: str) -> Op[Job]:
    # Resuming a queued or running job answers it as it is, so a retry is safe.
    return Op("POST", f"/train/{_segment(job_id, 'job id')}/resume", _model(Job))


def job_logs(job_id: str) -> Op[str]:
    return Op(
        "GET", f"/train/{_segment(job_id, 'job id')}/logs", lambda r: r.text, headers={"Accept": "text/plain"}
    )


def job_events(job_id: str) -> Op[None]:
    # The server sends a ping comment at least every 15 s, so the client's read timeout still applies.
    return Op(
        "GET",
        f"/train/{_segment(job_id, 'job id')}/events",
        _no_parse,
        headers={"Accept": "text/event-stream"},
    )


def _no_parse(response: httpx.Response) -> None:
    return None


# ---------------------------------------------------------------- errors


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed error for a 4xx/5xx, with code/message/param from the envelope when the body has one."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    code = param = kind = None
    envelope = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict):
        code, param, kind = envelope.get("code"), envelope.get("param"), envelope.get("type")
        message = str(envelope.get("message") or code or response.reason_phrase)
    elif isinstance(body, dict) and "detail" in body:
        message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    else:
        message = response.text.strip()[:500] or response.reason_phrase or "error"
    cls = STATUS_ERRORS.get(response.status_code, APIStatusError)
    return cls(response.status_code, code, message, param, type=kind, response=response, body=body)


def connection_error(exc: httpx.RequestError, request: httpx.Request) -> APIConnectionError:
    where = f"{request.method} {request.url}"
    path = f"{request.method} {request.url.raw_path.decode()}"
    # Only a failed connect proves the request never left this machine.
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__.replace("Timeout", "").lower() or "request"
        error: APIConnectionError = APITimeoutError(f"{where}: {kind} timed out", request=request, sent=sent)
    elif not sent:
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        error = APIConnectionError(
            f"cannot connect to {origin} ({path}): {exc or type(exc).__name__}", request=request, sent=sent
        )
    else:
        error = APIConnectionError(f"{where}: {exc or type(exc).__name__}", request=request, sent=sent)
        if not isinstance(
            exc, httpx.TransportError
        ):  # e.g. a body that cannot be decoded: repeating won't help
            error._retryable = False  # type: ignore[attr-defined]
    error.__cause__ = exc
    error.__suppress_context__ = True
    return error


# ---------------------------------------------------------------- server-sent events

DONE = object()  # "data: [DONE]": the stream's end marker
SKIP = object()  # an event that carries nothing for the caller


class SSEDecoder:
    """Lines in, the ``data`` of each complete event out (``event:``, ``id:`` and comments are ignored)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        data, self._data = self._data, []
        return "\n".join(data) if data else None


def _event_json(data: str, response: httpx.Response | None) -> Any:
    if data.strip() == "[DONE]":
        return DONE
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise LoraserveError(f"unreadable server-sent event: {data[:200]!r}") from exc
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        status = response.status_code if response is not None else 500
        cls = STATUS_ERRORS.get(status, APIStatusError)
        raise cls(
            status,
            err.get("code"),
            str(err.get("message") or err.get("code")),
            err.get("param"),
            type=err.get("type"),
            response=response,
            body=payload,
        )
    return payload


class GenerationStreamState:
    """Turns ``POST /generate`` stream events into text deltas and keeps what the last ones said."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.tokens: list[GeneratedToken] | None = None  # with logprobs: every token so far
        self.prompt_logprobs: list[PromptToken] | None = None  # with prompt_logprobs: on the first event

    def feed(self, data: str, response: httpx.Response | None = None) -> Any:
        payload = _event_json(data, response)
        if payload is DONE:
            return DONE
        if payload.get("tokens") is not None:
            self.tokens = (self.tokens or []) + [GeneratedToken.model_validate(t) for t in payload["tokens"]]
        if payload.get("prompt_logprobs") is not None:
            self.prompt_logprobs = [PromptToken.model_validate(t) for t in payload["prompt_logprobs"]]
        self.id = payload.get("id") or self.id
        self.finish_reason = payload.get("finish_reason") or self.finish_reason
        if payload.get("usage"):
            self.usage = Usage.model_validate(payload["usage"])
        delta = payload.get("text") or ""
        if not delta:
            return SKIP
        self.parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self.parts)


class JobEventState:
    def feed(self, data: str, response: httpx.Response | None = None) -> Any:
        payload = _event_json(data, response)
        return payload if payload is DONE else JobEvent.model_validate(payload)


# ---------------------------------------------------------------- waiting for jobs


class Waiter:
    """The bookkeeping of ``wait()``, shared by both clients (which only fetch the job and sleep): the
    deadline, the progress display, and riding out a server restart: connection errors and 429/502/503/504
    are tolerated for up to ``reconnect_for`` seconds in a row (the job lives on in the server's store)."""

    def __init__(
        self,
        job_id: str,
        progress: ProgressArg,
        timeout: float | None,
        poll_interval: float,
        reconnect_for: float,
    ):
        self.job_id = job_id
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.reconnect_for = reconnect_for
        self.display = ProgressDisplay(progress)
        self.job: Job | None = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._outage_since: float | None = None

    def seen(self, job: Job) -> bool:
        """Record a fetched state; True when the job has ended."""
        self.job, self._outage_since = job, None
        self.display.update(job)
        return job.done

    def failed(self, error: LoraserveError) -> None:
        """A poll failed after the client's own retries: raise ``error`` unless it is a tolerated outage."""
        transient = isinstance(error, APIConnectionError) or (
            isinstance(error, APIStatusError)
            and (error.status_code in RETRY_STATUSES or error.status_code >= 500)
        )
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if not transient or now - self._outage_since > self.reconnect_for:
            raise error
        log.info("job %s: %s; still waiting", self.job_id, error)

    def pause(self) -> float:
        """Seconds to sleep before the next poll; raises ``JobTimeoutError`` once the deadline has passed."""
        if self._deadline is None:
            return self.poll_interval
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise JobTimeoutError(self.job_id, self.job, self.timeout or 0.0)
        return min(self.poll_interval, left)

    def finish(self, check: bool) -> Job:
        assert self.job is not None
        if check and self.job.status != "succeeded":
            raise JobFailedError(self.job)
        return self.job

    def close(self) -> None:
        self.display.close()

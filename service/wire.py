"""What crosses LitServe's queue between the API processes and the generation worker, and the one
table from an error code the worker reports to its HTTP status.

The queue pickles plain dicts, so each message has ``to_dict``/``from_dict``; both sides speak the
dataclasses:
    Job     a validated request (API -> worker): prompt ids, adapter, SamplingParams fields, deadline
    Cancel  drop a job (API -> worker): its client went away, or the API side gave up on it
    Event   worker -> API: a text delta (streamed jobs only), the final result, or a ``WireError``

Beside the queue, the worker publishes its state in a status file (``service/worker_status.py``):
readiness, the loaded adapters and its load, for the API processes and the job runner.

A streamed job gets every text delta and then a final event with the last delta; a non-streamed one
gets only the final event, with the whole text. An error event is final too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorKind:
    status: int
    param: str | None = None  # the request field an error of this kind points at, if any
    retry_after: int | None = None  # seconds, sent as Retry-After: the condition passes by itself


# Every error code the worker sends, with its status. A code missing here (one a newer engine might
# add) is a server-side failure: 500.
ERRORS: dict[str, ErrorKind] = {
    "adapter_not_found": ErrorKind(404, "adapter"),  # e.g. deleted between acceptance and admission
    "prompt_too_long": ErrorKind(400, "prompt"),
    "invalid_request": ErrorKind(422),  # sampling parameters the engine refused
    "timeout": ErrorKind(504),  # the request's deadline passed
    "generation_failed": ErrorKind(500),  # the engine, or LitServe's transport, failed
    # the worker that had the request died; a new one is starting (the API side sends this)
    "worker_restarted": ErrorKind(503, retry_after=5),
}


def http_status(code: str) -> int:
    """The HTTP status for an error code; 500 for a code the table does not know."""
    kind = ERRORS.get(code)
    return kind.status if kind is not None else 500


@dataclass(frozen=True)
class WireError:
    code: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, code: str, message: str) -> WireError:
        """An error with the param its kind points at (``adapter``, ``prompt``, or none)."""
        kind = ERRORS.get(code)
        return cls(code, message, kind.param if kind is not None else None)

    @property
    def status(self) -> int:
        return http_status(self.code)

    @property
    def retry_after(self) -> int | None:
        kind = ERRORS.get(self.code)
        return kind.retry_after if kind is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WireError:
        return cls(data["code"], data["message"], data.get("param"))


@dataclass(frozen=True)
class Job:
    id: str
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    params: dict[str, Any]  # SamplingParams fields (the worker builds the engine's type)
    stream: bool
    arrived: float  # time.monotonic() in the API process; the worker shares the clock (one host)
    deadline: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt_ids": list(self.prompt_ids),
            "adapter": self.adapter,
            "params": dict(self.params),
            "stream": self.stream,
            "arrived": self.arrived,
            "deadline": self.deadline,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            prompt_ids=list(data["prompt_ids"]),
            adapter=data["adapter"],
            params=dict(data["params"]),
            stream=bool(data["stream"]),
            arrived=float(data["arrived"]),
            deadline=float(data["deadline"]),
        )


@dataclass(frozen=True)
class Cancel:
    job_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"cancel": self.job_id}


def request_from_dict(data: dict[str, Any]) -> Job | Cancel:
    """What the worker took off the queue."""
    if "cancel" in data:
        return Cancel(data["cancel"])
    return Job.from_dict(data)


@dataclass(frozen=True)
class Event:
    id: str
    finished: bool
    text: str = ""
    finish_reason: str | None = None  # final result: "eos" | "stop" | "length"
    usage: dict[str, int] | None = None  # final result: prompt_tokens, completion_tokens
    error: WireError | None = None

    @classmethod
    def failure(cls, job_id: str, error: WireError) -> Event:
        return cls(job_id, finished=True, error=error)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "finished": self.finished, "text": self.text}
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        if self.usage is not None:
            out["usage"] = dict(self.usage)
        if self.error is not None:
            out["error"] = self.error.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        error = data.get("error")
        return cls(
            id=data["id"],
            finished=bool(data["finished"]),
            text=data.get("text", ""),
            finish_reason=data.get("finish_reason"),
            usage=data.get("usage"),
            error=WireError.from_dict(error) if error else None,
        )

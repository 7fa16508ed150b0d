"""What crosses LitServe's queue between the API processes and the generation worker, and the error
codes the worker reports (their HTTP statuses: the one table in ``service.errors``).

The queue pickles plain dicts, so each message has ``to_dict``/``from_dict``; both sides speak the
dataclasses:
    Job     a validated request (API -> worker): prompt ids, adapter or composition, SamplingParams
            fields, deadline
    Cancel  drop a job (API -> worker): its client went away, or the API side gave up on it
    Event   worker -> API: a text delta (streamed jobs only), the final result, or a ``WireError``;
            with ``logprobs`` requested, the ``TokenLogprob`` of every token generated since the
            previous event; with ``prompt_logprobs``, the first event sent carries the prompt's

Beside the queue, the worker publishes its state in a status file (``service/worker_status.py``):
readiness, the loaded adapters and its load, for the API processes and the job runner.

A streamed job gets every text delta and then a final event with the last delta; a non-streamed one
gets only the final event, with the whole text. An error event is final too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loracore.artifact import VERSION_SEP
from loracore.template import Template

# Bounds of the sampling parameters a job may carry (the routes' schemas and the engine check them)
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's chat limit; its completions allow 5)
MAX_PENALTY = 2.0  # frequency/presence penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]
MAX_LOGIT_BIAS_TOKENS = 300  # tokens one request may bias (bounds the per-row update and the body)
# A composed request (``Job.adapters``): how many adapters it may weigh and the bound of each weight.
MAX_COMPOSITION = 8
MAX_COMPOSITION_WEIGHT = 2.0


# Every error code the worker sends, with the request field it points at (if any).
ERROR_PARAMS: dict[str, str | None] = {
    "adapter_not_found": "adapter",  # e.g. deleted between acceptance and admission
    "prompt_too_long": "prompt",
    # the adapter exists but cannot be served (bad shapes for this base, corrupt or truncated weights,
    # non-finite values, a config the engine cannot honour): the adapter's fault, not the server's
    "invalid_adapter": "adapter",
    "invalid_request": None,  # sampling parameters the engine refused
    "adapter_cache_full": "adapter",  # pinned adapters take every slot of the adapter cache
    "timeout": None,  # the request's deadline passed
    "generation_failed": None,  # the engine, or LitServe's transport, failed
    "worker_restarted": None,  # the worker that had the request died; a new one is starting (API side)
}


@dataclass
class SamplingParams:
    """A request's generation parameters, as the routes build them and the engine runs them."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks on random weights)
    # None: no log-probabilities; k >= 0: the chosen token's logprob and the k most likely tokens
    logprobs: int | None = None
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a token in the output
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # canonical JSON text of a schema the output must follow (service/structured.py), None: free text
    json_schema: str | None = None
    # None: the prompt is not scored; k >= 0: every prompt token's logprob (the first: none) and the k
    # most likely tokens at its position, from the model's own distribution (no temperature or bias)
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (a backstop: the server validates first)."""
        if self.max_new_tokens < 0 or (self.max_new_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(
                f"max_new_tokens must be >= 1 (0 only with prompt_logprobs), got {self.max_new_tokens}"
            )
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias[{token}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}"
                )
        if self.json_schema is not None:
            if not isinstance(self.json_schema, str):
                raise ValueError("json_schema must be the schema's JSON text")
            if self.ignore_eos:  # a constrained row ends where its grammar does
                raise ValueError("ignore_eos cannot be combined with json_schema")

    @property
    def penalized(self) -> bool:
        """True when the row's own output changes its logits (frequency or presence penalty)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class ResolvedTarget:
    """An adapter as a request resolved it, once: the version whose weights serve the request and the
    prompt template recorded with exactly that version. The route renders with ``template``; the job
    carries ``ref`` (``name@<version id>``), so the worker loads that version and no other, whatever
    is published meanwhile."""

    name: str
    version_id: str  # the sha256 of the version's weights
    template: Template

    @property
    def ref(self) -> str:
        return f"{self.name}{VERSION_SEP}{self.version_id}"


@dataclass(frozen=True)
class WireError:
    code: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, code: str, message: str) -> WireError:
        """An error with the param its code points at (``adapter``, ``prompt``, or none)."""
        return cls(code, message, ERROR_PARAMS.get(code))

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
    params: SamplingParams
    stream: bool
    arrived: float  # time.monotonic() in the API process; the worker shares the clock (one host)
    deadline: float
    # a weighted composition instead of ``adapter`` (then None): ``(name, weight)`` per entry
    adapters: tuple[tuple[str, float], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "prompt_ids": list(self.prompt_ids),
            "adapter": self.adapter,
            "params": asdict(self.params),
            "stream": self.stream,
            "arrived": self.arrived,
            "deadline": self.deadline,
        }
        if self.adapters is not None:
            out["adapters"] = [[name, weight] for name, weight in self.adapters]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            prompt_ids=list(data["prompt_ids"]),
            adapter=data["adapter"],
            params=SamplingParams(**data["params"]),
            stream=bool(data["stream"]),
            arrived=float(data["arrived"]),
            deadline=float(data["deadline"]),
            adapters=(
                tuple((str(name), float(weight)) for name, weight in data["adapters"])
                if data.get("adapters") is not None
                else None
            ),
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


# What a log-probability of -inf (a token the distribution rules out) is sent as: JSON has no
# infinities, and OpenAI reports such tokens with this value.
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability; a generated token (and a scored prompt token after the
    first) also carries the most likely ``top``."""

    id: int
    text: str  # the token's bytes as UTF-8 (a token holding part of a character: U+FFFD)
    bytes: list[int]  # the token's exact bytes
    logprob: float | None  # >= LOGPROB_FLOOR; None only for a prompt's first token (no context)
    top: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, token_id: int, raw: bytes, logprob: float | None, top: list[TokenLogprob] | None = None):
        text = raw.decode("utf-8", errors="replace")
        value = None if logprob is None else max(float(logprob), LOGPROB_FLOOR)
        return cls(token_id, text, list(raw), value, top)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text, "bytes": self.bytes, "logprob": self.logprob}
        if self.top is not None:
            out["top"] = [t.to_dict() for t in self.top]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLogprob:
        top = data.get("top")
        return cls(
            id=int(data["id"]),
            text=data["text"],
            bytes=list(data["bytes"]),
            logprob=None if data["logprob"] is None else float(data["logprob"]),
            top=[cls.from_dict(t) for t in top] if top is not None else None,
        )


@dataclass(frozen=True)
class Event:
    id: str
    finished: bool
    text: str = ""
    finish_reason: str | None = None  # final result: "eos" | "stop" | "length"
    usage: dict[str, int] | None = None  # final result: prompt_tokens, completion_tokens
    error: WireError | None = None
    logprobs: list[TokenLogprob] | None = None  # jobs with logprobs: the tokens since the last event
    prompt_logprobs: list[TokenLogprob] | None = None  # jobs with prompt_logprobs: on the first event

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
        if self.logprobs is not None:
            out["logprobs"] = [t.to_dict() for t in self.logprobs]
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [t.to_dict() for t in self.prompt_logprobs]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        error = data.get("error")
        logprobs = data.get("logprobs")
        prompt = data.get("prompt_logprobs")
        return cls(
            id=data["id"],
            finished=bool(data["finished"]),
            text=data.get("text", ""),
            finish_reason=data.get("finish_reason"),
            usage=data.get("usage"),
            error=WireError.from_dict(error) if error else None,
            logprobs=[TokenLogprob.from_dict(t) for t in logprobs] if logprobs is not None else None,
            prompt_logprobs=[TokenLogprob.from_dict(t) for t in prompt] if prompt is not None else None,
        )

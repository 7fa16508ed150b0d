"""The engine's value types: what goes in (a request with its sampling parameters), what comes
out (one token event per request per step) and the two errors ``Engine.add`` raises."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from trainer.artifact import split_ref

from .cache import CacheActivity

# Label used for base-model rows in metrics and stats ("__base__" cannot be an adapter name:
# names must start with a letter or digit).
BASE_LABEL = "__base__"


def adapter_label(adapter: str | None) -> str:
    """A request's label in metrics and stats: the adapter's name (all its versions together)."""
    return BASE_LABEL if adapter is None else split_ref(adapter)[0]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks on random weights)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (a backstop: the server validates first)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class GenerationRequest:
    id: str
    prompt_ids: list[int]
    adapter: str | None  # None: the base model; "name" (its newest version) or "name@<version id prefix>"
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenEvent:
    id: str
    text: str  # text delta of this step; "" while a stop string might still be forming
    token_id: int | None  # None only for events that carry no token (errors)
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far, the EOS token included
    error: str | None = None
    # why an "error" event failed, for the server's status code: "adapter_not_found" when the
    # adapter was deleted between ``add`` and admission, else None (a server-side failure)
    error_code: str | None = None


@dataclass
class StepReport:
    """What one ``Engine.step`` did: its events, and the timings and counts the worker exports.

    The engine measures; it writes no metrics (``service.metrics.record_step`` does, in the worker).
    A step either prefills newcomers or decodes the running rows, so one of the two row counts is 0.
    """

    events: list[TokenEvent] = field(default_factory=list)
    prefill_rows: int = 0  # newcomers prefilled (an error event counts too: it was attempted)
    prefill_tokens: int = 0  # their prompt tokens
    prefill_seconds: float = 0.0  # forward pass and sampling of the prefill
    decode_rows: int = 0  # rows decoded
    decode_seconds: float = 0.0  # forward pass and sampling of the decode step
    running: int = 0  # rows in the batch after the step
    queue_wait_seconds: list[float] = field(default_factory=list)  # per newcomer: admission - arrival
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per adapter label, at admission
    first_token_seconds: list[tuple[str, float]] = field(default_factory=list)  # (label, to first token)
    inter_token_seconds: list[float] = field(default_factory=list)  # every later token
    generated_tokens: dict[str, int] = field(default_factory=dict)  # per adapter label
    adapters: CacheActivity = field(default_factory=CacheActivity)  # since the previous step


class AdapterNotFound(KeyError):
    """The adapter folder does not exist (or the name is not a valid adapter name)."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(name)
        self.name = name
        self.detail = detail

    def __str__(self) -> str:
        return f"adapter {self.name!r} not found" + (f": {self.detail}" if self.detail else "")


class PromptTooLong(ValueError):
    """prompt tokens + max_new_tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} > the model's context of {context} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context = context

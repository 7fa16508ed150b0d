"""The engine's value types: what goes in (a request with its sampling parameters), what comes
out (one token event per request per step) and the two errors ``Engine.add`` raises."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loracore.artifact import split_ref
from service.wire import MAX_COMPOSITION, MAX_COMPOSITION_WEIGHT, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY

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
    # None: no log-probabilities; k >= 0: the chosen token's logprob and the k most likely tokens
    logprobs: int | None = None
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a token in the output
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # canonical JSON text of a schema the output must follow (service/structured.py), None: free text
    json_schema: str | None = None

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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
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
class AdapterWeight:
    """One component of a composed request: an adapter name (as ``GenerationRequest.adapter``) and
    its weight in the row's LoRA term ``sum_i weight_i * delta_i``."""

    name: str
    weight: float


@dataclass
class GenerationRequest:
    id: str
    prompt_ids: list[int]
    adapter: (
        str | None
    )  # None: the base (or the composition below); "name" (newest) or "name@<version prefix>"
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    # a weighted composition of adapters instead of ``adapter`` (which is then None)
    adapters: tuple[AdapterWeight, ...] | None = None

    def adapter_names(self) -> list[str]:
        """Every adapter name the request uses, each once, in order."""
        if self.adapters is not None:
            return list(dict.fromkeys(c.name for c in self.adapters))
        return [self.adapter] if self.adapter is not None else []

    def validate_composition(self) -> None:
        """Raise ValueError naming what is wrong with ``adapters`` (a backstop: the server checks first)."""
        if self.adapters is None:
            return
        if self.adapter is not None:
            raise ValueError("adapter and adapters are exclusive: send one of them")
        if not 1 <= len(self.adapters) <= MAX_COMPOSITION:
            raise ValueError(f"adapters must hold 1 to {MAX_COMPOSITION} entries, got {len(self.adapters)}")
        for c in self.adapters:
            if not -MAX_COMPOSITION_WEIGHT <= c.weight <= MAX_COMPOSITION_WEIGHT:  # also rejects NaN
                raise ValueError(
                    f"adapter {c.name!r}: weight must be in [-{MAX_COMPOSITION_WEIGHT:g}, "
                    f"{MAX_COMPOSITION_WEIGHT:g}], got {c.weight}"
                )


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
    # with SamplingParams.logprobs: the chosen token's log-probability and the most likely tokens
    # as (token id, logprob), most likely first, from the distribution the token was drawn from
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


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

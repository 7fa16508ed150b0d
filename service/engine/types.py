"""The engine's value types: what goes in (a request with its sampling parameters), what comes
out (one token event per request per step) and the errors ``Engine.add`` raises."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loracore.artifact import split_ref
from service.wire import MAX_COMPOSITION, MAX_COMPOSITION_WEIGHT, SamplingParams

from .cache import CacheActivity


@dataclass
class PrefixActivity:
    """What the prefix cache (``prefix.py``) did since its last ``take_activity``."""

    queried_tokens: int = 0  # prompt tokens of the rows that looked up
    hit_tokens: int = 0  # of those, the tokens whose KV came from the cache
    inserted_blocks: int = 0
    evicted_blocks: int = 0


# Label used for base-model rows in metrics and stats ("__base__" cannot be an adapter name:
# names must start with a letter or digit).
BASE_LABEL = "__base__"


def adapter_label(adapter: str | None) -> str:
    """A request's label in metrics and stats: the adapter's name (all its versions together)."""
    return BASE_LABEL if adapter is None else split_ref(adapter)[0]


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
    # adapter was deleted between ``add`` and admission, "invalid_adapter" when it cannot be loaded
    # for a fault of its own (``cache.AdapterError``), else None (a server-side failure)
    error_code: str | None = None
    # with SamplingParams.logprobs: the chosen token's log-probability and the most likely tokens
    # as (token id, logprob), most likely first, from the distribution the token was drawn from
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # with SamplingParams.prompt_logprobs, on the row's first event only: per prompt token its
    # (id, logprob: None for the first, the most likely (token id, logprob) at its position)
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None


@dataclass
class StepReport:
    """What one ``Engine.step`` did: its events, and the timings and counts the worker exports.

    The engine measures; it writes no metrics (``service.metrics.record_step`` does, in the worker).
    A step either prefills newcomers or decodes the running rows, so one of the two row counts is 0.
    """

    events: list[TokenEvent] = field(default_factory=list)
    prefill_rows: int = 0  # newcomers prefilled (an error event counts too: it was attempted)
    prefill_tokens: int = 0  # their prompt tokens prefilled (a prefix cache hit's are not)
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
    prefix: PrefixActivity = field(default_factory=PrefixActivity)  # the prefix cache's, this step


class AdapterNotFound(KeyError):
    """The adapter folder does not exist (or the name is not a valid adapter name)."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(name)
        self.name = name
        self.detail = detail

    def __str__(self) -> str:
        return f"adapter {self.name!r} not found" + (f": {self.detail}" if self.detail else "")


class AdapterCacheFull(RuntimeError):
    """Pinned adapters take every slot of the adapter cache, so an unpinned one can never load."""

    def __init__(self, names: list[str], capacity: int, free: int):
        super().__init__(
            f"adapter {names[0]!r} cannot be loaded: pinned adapters take {capacity - free} of the "
            f"{capacity} slots of the adapter cache (--max-loaded-adapters), and this request needs "
            f"{len(names)} more; unpin one (DELETE /adapters/{{name}}/pin) or raise the limit"
        )
        self.names = names


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

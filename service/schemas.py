"""The wire contract of the service's own routes (docs/api.md): pydantic request and response models.

Request models forbid unknown fields, so a typo such as ``max_tokens`` on ``/generate`` is a 422
naming the field instead of a silently ignored option. Limits that depend on settings (the
``max_new_tokens`` cap) are checked by the route, which knows the settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.wire import (
    MAX_COMPOSITION,
    MAX_COMPOSITION_WEIGHT,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_PENALTY,
)


def logit_bias_keys(v: object) -> object:
    """JSON object keys are strings: turn each into a token id (a decimal integer), or refuse it."""
    if not isinstance(v, dict):
        return v
    out = {}
    for key, bias in v.items():
        if isinstance(key, int) and not isinstance(key, bool):
            out[key] = bias
        elif isinstance(key, str) and key.isascii() and key.isdigit():
            out[int(key)] = bias
        else:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
    return out


def check_logit_bias(v: dict[int, float] | None) -> dict[int, float] | None:
    """Biases in range. Ids beyond the vocabulary are refused by ``gateway.prepare_job``, which knows
    the model."""
    for token, bias in (v or {}).items():
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {token}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias[{token}] is {bias}: values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            )
    return v


class AdapterWeight(BaseModel):
    """One entry of a weighted composition: its LoRA term enters the row's sum with ``weight``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="adapter name")
    weight: float = Field(ge=-MAX_COMPOSITION_WEIGHT, le=MAX_COMPOSITION_WEIGHT)


Composition = list[AdapterWeight] | None
COMPOSITION_FIELD = Field(
    None,
    min_length=1,
    max_length=MAX_COMPOSITION,
    description="weighted composition of adapters (sum of w_i * B_i A_i); exclusive with a single adapter",
)


def check_composition(adapters: Composition) -> None:
    """A name listed twice is a mistake worth naming (its weights would simply add up)."""
    if adapters is None:
        return
    seen: set[str] = set()
    for entry in adapters:
        if entry.name in seen:
            raise ValueError(f"adapter {entry.name!r} is listed twice in adapters: give it one weight")
        seen.add(entry.name)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the user's text; rendered with the adapter's template unless raw")
    adapter: str | None = Field(None, description="adapter name; null is the base model")
    adapters: Composition = COMPOSITION_FIELD
    max_new_tokens: int | None = Field(
        None, ge=0, description="default: the server's default_max_new_tokens; 0 (with prompt_logprobs): none"
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: list[str] = Field(default_factory=list, max_length=16, description="stop strings (not included)")
    raw: bool = Field(False, description="send the prompt as is, without the template")
    json_schema: dict[str, Any] | StrictBool | None = Field(
        None, description="a JSON Schema the output follows; true: any JSON object; null/false: free text"
    )
    stream: bool = Field(False, description="Server-Sent Events, one chunk per token")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="per generated token its logprob and the k most likely"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="per prompt token its logprob and the k most likely there"
    )
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[int, float] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS_TOKENS, description="token id -> added to its logit"
    )

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, v: object) -> object:
        return logit_bias_keys(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[int, float]) -> dict[int, float]:
        return check_logit_bias(v) or {}

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("adapters")
    @classmethod
    def _composition(cls, v: Composition) -> Composition:
        check_composition(v)
        return v

    @model_validator(mode="after")
    def _one_kind_of_adapter(self) -> GenerateRequest:
        if self.adapter is not None and self.adapters is not None:
            raise ValueError("adapter and adapters are exclusive: send one of them")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise field_error(self, "max_new_tokens", "0 generates nothing: it needs prompt_logprobs")
        return self


def field_error(model: BaseModel, field: str, message: str) -> ValidationError:
    """A cross-field check's failure located at ``field``, so the error envelope's ``param`` names it."""
    error = InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=(field,), input=getattr(model, field)
    )
    return ValidationError.from_exception_data(type(model).__name__, [error])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


FinishReason = Literal["stop", "length", "eos"]


class TopToken(BaseModel):
    id: int
    text: str = Field(description="the token's bytes as UTF-8 (part of a character: U+FFFD)")
    bytes: list[int]
    logprob: float


class GeneratedToken(TopToken):
    """A generated token with its log-probability and the most likely tokens at its position."""

    top: list[TopToken]


class PromptToken(TopToken):
    """A prompt token with its log-probability given the tokens before it (null for the first) and the
    most likely tokens at its position (empty for the first)."""

    logprob: float | None
    top: list[TopToken]


class GenerateResponse(BaseModel):
    id: str
    text: str
    adapter: str | None
    adapters: list[AdapterWeight] | None = None  # the composition, as sent
    finish_reason: FinishReason
    usage: Usage
    tokens: list[GeneratedToken] | None = Field(None, description="with logprobs: every generated token")
    prompt_logprobs: list[PromptToken] | None = Field(
        None, description="with prompt_logprobs: every prompt token"
    )


class GenerateChunk(BaseModel):
    """One Server-Sent Event of a streamed ``/generate``; the last one has ``finish_reason`` and ``usage``."""

    id: str
    text: str
    adapter: str | None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tokens: list[GeneratedToken] | None = Field(None, description="with logprobs: this chunk's tokens")
    prompt_logprobs: list[PromptToken] | None = Field(
        None, description="with prompt_logprobs: every prompt token, on the first chunk"
    )


class AdapterVersion(BaseModel):
    id: str = Field(description="the sha256 of the weights; 'name@<first 8+ hex digits>' serves it")
    created: str | None
    size_bytes: int
    current: bool = Field(description="the newest version, served for the plain name")


class AdapterInfo(BaseModel):
    name: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    size_bytes: int
    created: str | None
    sha256: str | None
    base_model: str | None
    loaded: bool
    pinned: bool = Field(
        False, description="kept loaded by the generation worker and never evicted (PUT /adapters/{name}/pin)"
    )
    template: dict
    versions: list[AdapterVersion] = Field(
        default_factory=list, description="newest first: the current version, then the kept earlier ones"
    )


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class Deleted(BaseModel):
    deleted: str


class Health(BaseModel):
    status: str


class BatchCapacity(BaseModel):
    """What the worker derived its batch's capacity from (``engine.capacity.BatchPlan``)."""

    rows: int = Field(description="rows of the running batch")
    kv_budget_bytes: int
    kv_bytes_per_token: int = Field(description="one position of one row: every layer's K and V")
    row_tokens: int = Field(description="the longest a row can get: the model's context")
    cap: int | None = Field(None, description="max_batch_size, when set")
    budget_source: str
    limited_by: Literal["kv_budget", "max_batch_size", "ceiling"]


class KVCacheUse(BaseModel):
    """The KV cache's blocks: a block is ``block_tokens`` positions of one row (every layer's K and V);
    memory is committed block by block as rows grow and given back when they leave."""

    block_tokens: int
    block_bytes: int
    blocks_used: int = Field(description="blocks the running rows hold")
    blocks_total: int = Field(description="blocks of every row at full context")
    usage: float = Field(description="blocks_used / blocks_total (the gateway's kv_cache_usage_perc)")
    prefix_cache: bool = Field(False, description="whether the prefix cache is on (--prefix-cache)")
    prefix_blocks: int = Field(0, description="blocks of prompt prefixes the prefix cache holds")
    prefix_bytes: int = Field(0, description="their memory, out of the same KV budget as the rows")


class Readiness(BaseModel):
    status: Literal["ready", "starting", "failed"]
    role: Literal["all", "serve", "runner"] | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    weights: Literal["hub", "local", "random"] | None = None
    random_weights: bool | None = None
    detail: str | None = None
    batch: BatchCapacity | None = None
    kv_cache: KVCacheUse | None = None

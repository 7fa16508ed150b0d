"""The wire contract of the service's own routes (docs/api.md): pydantic request and response models.

Request models forbid unknown fields, so a typo such as ``max_tokens`` on ``/generate`` is a 422
naming the field instead of a silently ignored option. Limits that depend on settings (the
``max_new_tokens`` cap) are checked by the route, which knows the settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the user's text; rendered with the adapter's template unless raw")
    adapter: str | None = Field(None, description="adapter name; null is the base model")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_new_tokens")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: list[str] = Field(default_factory=list, max_length=16, description="stop strings (not included)")
    raw: bool = Field(False, description="send the prompt as is, without the template")
    stream: bool = Field(False, description="Server-Sent Events, one chunk per token")

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


FinishReason = Literal["stop", "length", "eos"]


class GenerateResponse(BaseModel):
    id: str
    text: str
    adapter: str | None
    finish_reason: FinishReason
    usage: Usage


class GenerateChunk(BaseModel):
    """One Server-Sent Event of a streamed ``/generate``; the last one has ``finish_reason`` and ``usage``."""

    id: str
    text: str
    adapter: str | None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


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
    template: dict


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

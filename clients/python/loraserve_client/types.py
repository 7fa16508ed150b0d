"""Typed responses, mirrored from the HTTP contract in docs/api.md.

Unknown fields from a newer server are kept (``extra="allow"``) rather than rejected, so an older client
keeps working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

JOB_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopToken(_Model):
    id: int
    text: str  # the token's bytes as UTF-8 (part of a character: U+FFFD)
    bytes: list[int] = []
    logprob: float


class GeneratedToken(TopToken):
    """A generated token (``logprobs``): its log-probability and the most likely tokens, first first."""

    top: list[TopToken] = []


class PromptToken(TopToken):
    """A prompt token (``prompt_logprobs``): its log-probability given the tokens before it (None for the
    first) and the most likely tokens at its position."""

    logprob: float | None = None
    top: list[TopToken] = []


class Generation(_Model):
    """``POST /generate``. ``finish_reason``: "eos" (the model ended), "stop" (a stop string matched, not
    included in ``text``) or "length". ``tokens``: with ``logprobs``, every generated token;
    ``prompt_logprobs``: with ``prompt_logprobs``, every prompt token."""

    id: str | None = None
    text: str
    adapter: str | None = None
    adapters: list[dict[str, Any]] | None = None  # a weighted composition: {"name", "weight"} per entry
    finish_reason: str | None = None
    usage: Usage | None = None
    tokens: list[GeneratedToken] | None = None
    prompt_logprobs: list[PromptToken] | None = None


class AdapterVersion(_Model):
    """One version of an adapter: ``id`` is its weights' sha256; ``adapter="name@<id[:8]>"`` serves it."""

    id: str
    created: datetime | None = None
    size_bytes: int | None = None
    current: bool = False


class AdapterInfo(_Model):
    name: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | str = []  # PEFT also allows one regular expression
    size_bytes: int | None = None
    created: datetime | None = None
    sha256: str | None = None
    base_model: str | None = None
    loaded: bool = False
    pinned: bool = False  # kept loaded, never evicted (PUT /adapters/{name}/pin)
    template: dict[str, Any] | None = None
    versions: list[AdapterVersion] = []  # newest first: the current one, then the kept earlier ones


class JobProgress(_Model):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    lr: float | None = None
    best_step: int | None = None  # the step of the lowest eval loss: its weights are published by default
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    selected: str | None = None  # at the end: "best" or "last" (the weights that were published)
    yielded_seconds: float | None = None  # paused for live serving, all attempts together
    trained_tokens: int | None = None  # tokens that received loss, all epochs so far
    # preference tuning (method "dpo"): the last evaluation's metrics; at the end, the published weights'
    method: str | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None


class Job(_Model):
    job_id: str
    adapter: str | None = None
    status: str
    error: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress | None = None
    cancel_requested: bool = False
    pause_requested: bool = False
    attempts: int | None = None
    dataset: str | None = None
    rows: int | None = None
    overwrite: bool | None = None
    eval: dict[str, Any] | None = None  # the served evaluation report, when the job had validation rows
    warnings: list[str] = []

    @property
    def done(self) -> bool:
        """True once the job can no longer change: succeeded, failed or cancelled."""
        return self.status in FINISHED_STATUSES


class JobEvent(Job):
    """One event of ``GET /train/{id}/events``: the job as of that moment, and what happened: ``event`` is
    "status" (the status changed) or the trainer's progress event ("start", "step", "eval", "checkpoint",
    "done", "error", with ``message`` for errors)."""

    event: str | None = None
    message: str | None = None


class Dataset(_Model):
    """``POST /datasets``: the id to pass as ``train(dataset=...)`` and the number of rows stored."""

    dataset: str
    rows: int
    size_bytes: int | None = None
    sha256: str | None = None

    @property
    def id(self) -> str:
        return self.dataset

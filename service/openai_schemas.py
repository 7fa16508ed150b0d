"""Request and response models of the OpenAI-compatible routes (docs/openai.md).

Requests follow OpenAI's field names. Fields this server cannot honour (tools, suffix, ...) are
accepted only with their neutral value (null, 0, false, empty), so a client that sends the
defaults works and a client that relies on them gets a 422 naming the field instead of a
silently different answer. Unknown fields are a 422 too (typos surface).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.schemas import (
    COMPOSITION_FIELD,
    Composition,
    check_composition,
    check_logit_bias,
    logit_bias_keys,
)
from service.wire import MAX_LOGIT_BIAS_TOKENS, MAX_LOGPROBS, MAX_PENALTY

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16
MAX_SEED = 2**63 - 1
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions ``logprobs`` (OpenAI's limit; chat allows MAX_LOGPROBS)


def _not_supported(field: str) -> ValueError:
    return ValueError(f"{field} is not supported by this server (leave it unset)")


def _stop_list(v: Any) -> Any:
    if v is None:
        return []
    return [v] if isinstance(v, str) else v


def _check_stop(v: list[str]) -> list[str]:
    if any(s == "" for s in v):
        raise ValueError("stop strings must not be empty")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the output follows ``schema`` (always enforced, strict or not)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="a JSON Schema; unset: any JSON value"
    )
    strict: bool | None = Field(None, description="accepted; the schema is enforced either way")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object (name, schema)")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type 'json_schema', not {self.type!r}")
        return self


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="an adapter name, or the base model's id")
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_new_tokens")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: 0 disables top-k")
    n: int | None = Field(1, ge=1, le=MAX_N, description="choices per prompt, each its own engine job")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP, description="string or list")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i of a prompt uses seed + i")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[int, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_TOKENS, description="token id (string key) -> -100..100"
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object (any JSON object) or json_schema (output follows the schema)"
    )
    user: str | None = Field(None, description="accepted and ignored")
    adapters: Composition = COMPOSITION_FIELD  # extension: ``model`` then names the base

    @field_validator("adapters")
    @classmethod
    def _composition(cls, v: Composition) -> Composition:
        check_composition(v)
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return _stop_list(v)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str]) -> list[str]:
        return _check_stop(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, v: Any) -> Any:
        return logit_bias_keys(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        return check_logit_bias(v)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="raw text (no template), a list of texts, token ids, or a list of token-id lists"
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="default: the server's default_max_new_tokens; 0 (with echo): score the prompt",
    )
    echo: bool | None = Field(
        False, description="prefix each choice's text with its prompt (and, with logprobs, its tokens)"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="the chosen token's and the k most likely"
    )
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS and not all(isinstance(p, int) for p in v):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(p, bool) for p in v) or any(
                isinstance(p, list) and any(isinstance(t, bool) for t in p) for p in v
            ):
                raise ValueError("token ids must be integers")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _not_supported("suffix")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(description="only text parts: this server serves a text model")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="accepted and ignored")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):  # 0 is the neutral value some clients send
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise _not_supported("tools")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise _not_supported("tool_choice")
        return v


# --- responses -------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


OpenAIFinish = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token (with echo: the prompt's first, whose
    first token has null in ``token_logprobs`` and ``top_logprobs``), then one per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="the k most likely tokens and the chosen one"
    )
    text_offset: list[int] = Field(description="where each token starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinish | None


class Completion(BaseModel):
    """The reply of /v1/completions; streamed, each chunk has this shape with text deltas."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(description="top_logprobs entries, most likely first")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinish


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: OpenAIFinish | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(description="for an adapter: the base model's id; null for the base")
    root: str = Field(description="the base model's id")
    template: dict[str, Any] | None = Field(
        None,
        description="the prompt template chat requests for this model render with: the base's own chat "
        "template, else the adapter's recorded one, else the default (docs/openai.md)",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Request and response models of the OpenAI-compatible routes (docs/openai.md).

Requests follow OpenAI's field names. Fields this server cannot honour (log-probabilities,
penalties, tools, ...) are accepted only with their neutral value (null, 0, false, empty), so a
client that sends the defaults works and a client that relies on them gets a 422 naming the
field instead of a silently different answer. Unknown fields are a 422 too (typos surface).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.schemas import COMPOSITION_FIELD, Composition, check_composition

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16
MAX_SEED = 2**63 - 1


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
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
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

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None, info) -> float | None:
        if v not in (None, 0):
            raise _not_supported(info.field_name)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise _not_supported("logit_bias")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="raw text (no template), or a list of texts")
    echo: bool | None = Field(False, description="prefix each choice's text with its prompt")
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(p, int | list) for p in v):
                raise ValueError("token-id prompts are not supported: send the prompt as text")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise _not_supported("logprobs")
        return v

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
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise _not_supported("logprobs")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _not_supported("top_logprobs")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: dict | None) -> dict | None:
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
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
    logprobs: None = None
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

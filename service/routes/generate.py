"""POST /generate: generation with the base, one adapter or a weighted composition, JSON or SSE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request

from service.errors import ApiError
from service.gateway import (
    EngineClient,
    ModelLimits,
    Submission,
    error_payload,
    fetch_missing,
    json_schema_text,
    prepare_job,
    raise_for_event,
    resolve_targets,
    template_of,
    unless_disconnected,
)
from service.routes import SSE_DONE, sse, sse_response
from service.schemas import (
    GenerateChunk,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    PromptToken,
    TopToken,
)
from service.settings import Settings
from service.structured import JSON_OBJECT
from service.wire import Event, SamplingParams, WireError


@dataclass(frozen=True)
class NoGenerationContext:
    """What the ``runner`` role's stand-in shares, set on ``app.state.no_generation``."""

    role: str


def register_no_generation_routes(app: FastAPI, settings: Settings) -> None:
    """The ``runner`` role loads no model: generation routes say so instead of a bare 404."""
    app.state.no_generation = NoGenerationContext(settings.role)
    app.add_api_route("/generate", no_generation, methods=["POST"], include_in_schema=False)
    app.add_api_route("/eval", no_generation, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/{path:path}", no_generation, methods=["GET", "POST"], include_in_schema=False)


async def no_generation(request: Request) -> None:
    role = request.app.state.no_generation.role
    raise ApiError(
        503,
        "generation_not_served",
        f"this server runs with role '{role}': it runs training jobs and loads no generation "
        f"model; send {request.url.path} to a server with role 'serve' or 'all'",
    )


@dataclass(frozen=True)
class GenerateContext:
    """What the handler shares, set on ``app.state.generate`` by ``register_generate_routes``."""

    settings: Settings
    client: EngineClient
    limits: ModelLimits


def _context(request: Request) -> GenerateContext:
    return request.app.state.generate


def register_generate_routes(
    app: FastAPI, settings: Settings, client: EngineClient, limits: ModelLimits
) -> None:
    app.state.generate = GenerateContext(settings, client, limits)
    app.add_api_route(
        "/generate",
        generate,
        methods=["POST"],
        response_model=GenerateResponse,
        tags=["generation"],
        responses={400: {}, 404: {}, 422: {}, 503: {}, 504: {}},
    )


async def generate(body: GenerateRequest, request: Request) -> Any:
    """Generate text with the base model, one adapter or a weighted composition of adapters;
    ``stream: true`` answers with SSE."""
    ctx = _context(request)
    settings, limits = ctx.settings, ctx.limits
    composition = [(a.name, a.weight) for a in body.adapters] if body.adapters is not None else None
    parts_named = [(name, f"adapters.{i}.name") for i, (name, _) in enumerate(composition or [])]
    await fetch_missing(request, [(body.adapter, "adapter"), *parts_named])
    # resolved once: the prompt's template and the weights that serve it are one version's
    target, parts = resolve_targets(settings.adapter_dir, body.adapter, composition)
    template = template_of(target, parts, limits.template)
    prompt = body.prompt if body.raw else template.render_prompt(body.prompt)
    params = SamplingParams(
        max_new_tokens=(
            settings.default_max_new_tokens if body.max_new_tokens is None else body.max_new_tokens
        ),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        logprobs=body.logprobs,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=dict(body.logit_bias),
        json_schema=_json_schema(body.json_schema),
        prompt_logprobs=body.prompt_logprobs,
    )
    job = prepare_job(
        prompt_text=prompt,
        target=target,
        params=params,
        stream=body.stream,
        limits=limits,
        max_new_tokens_cap=settings.max_new_tokens_cap,
        request_timeout=settings.request_timeout,
        composition=parts,
    )
    ctx.client.reserve(job)
    sub = ctx.client.submit(job, request)
    if not body.stream:
        try:
            final = await unless_disconnected(sub.final(raise_for_event), request)
        finally:
            sub.close()  # also when the client went away: the worker drops the job
        return GenerateResponse(
            id=final.id,
            text=final.text,
            adapter=body.adapter,
            adapters=body.adapters,
            finish_reason=final.finish_reason,
            usage=final.usage,
            tokens=_tokens(final),
            prompt_logprobs=_prompt_tokens(final),
        )
    # Stream: wait for the first event so an error found before the first token is a real status.
    try:
        first = await unless_disconnected(sub.next_or_504(), request)
        raise_for_event(first)
    except BaseException:
        sub.close()
        raise
    return sse_response(_sse(sub, first, body.adapter))


TokenT = TypeVar("TokenT", GeneratedToken, PromptToken)


def _scored(tokens: list | None, kind: type[TokenT]) -> list[TokenT] | None:
    """Wire tokens with their log-probabilities as response tokens (None: not asked for)."""
    if tokens is None:
        return None
    return [
        kind(
            id=t.id,
            text=t.text,
            bytes=t.bytes,
            logprob=t.logprob,
            top=[TopToken(id=a.id, text=a.text, bytes=a.bytes, logprob=a.logprob) for a in t.top or []],
        )
        for t in tokens
    ]


def _tokens(event: Event) -> list[GeneratedToken] | None:
    """The event's tokens with their log-probabilities (None: the request did not ask for them)."""
    return _scored(event.logprobs, GeneratedToken)


def _prompt_tokens(event: Event) -> list[PromptToken] | None:
    """The event's scored prompt tokens (None: not asked for, or not on this event)."""
    return _scored(event.prompt_logprobs, PromptToken)


def _json_schema(value: dict[str, Any] | bool | None) -> str | None:
    if value is None or value is False:
        return None
    return json_schema_text(JSON_OBJECT if value is True else value, "json_schema")


def _chunk(event: Event, adapter: str | None) -> str:
    chunk = GenerateChunk(
        id=event.id,
        text=event.text,
        adapter=adapter,
        finish_reason=event.finish_reason,
        usage=event.usage,
        tokens=_tokens(event),
        prompt_logprobs=_prompt_tokens(event),
    )
    return sse(chunk.model_dump_json())


async def _sse(sub: Submission, first: Event, adapter: str | None):
    """Text deltas as Server-Sent Events, then ``data: [DONE]``; a late error ends the stream without it."""
    try:
        event = first
        while True:
            if event.error is not None:
                yield sse(error_payload(event.error))
                return
            yield _chunk(event, adapter)
            if event.finished:
                yield SSE_DONE
                return
            try:
                event = await sub.next_event()
            except TimeoutError:
                late = WireError.of("timeout", "generation ran past the server's deadline")
                yield sse(error_payload(late))
                return
    finally:
        sub.close()

"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

The ``model`` field names an adapter (its newest version, or ``name@<version id prefix>`` for one
version), or the base (by its configured name or its id); with the ``adapters`` extension (a
weighted composition, as on ``/generate``) it names the base. Every
choice of a request (``n`` per prompt, for every prompt of a list) is one engine job on the same
queue as ``/generate``, so choices, streamed and non-streamed requests all share engine batches.
Every job is validated before the first one is queued, and a streamed reply waits for the first
event of every choice before it sends its 200: an error found before the first token (unknown
model, bad parameters, prompt too long, overload) is a real 4xx/5xx status with the envelope.

Completions send the prompt as is (no template), as OpenAI's legacy endpoint does. Chat renders
the messages with the base's own Jinja chat template when it has one, else the template the
trainer recorded for the adapter, else the default one (``loracore.template.choose_template``),
stops where the template would start the next user turn (a chat template: its end-of-turn
marker), and drops the template's answer prefix (the space after ``Assistant:``) from the reply.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from service.errors import ApiError, http_status
from service.gateway import (
    EngineClient,
    ModelLimits,
    Submission,
    api_error,
    error_payload,
    fetch_missing,
    json_schema_text,
    prepare_job,
    raise_for_event,
    resolve_target,
    resolve_targets,
    template_of,
    unless_disconnected,
)
from service.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from service.routes import SSE_DONE, sse, sse_response
from service.served_model import Models, ServedModel, base_names, model_not_found
from service.settings import Settings
from service.structured import JSON_OBJECT
from service.wire import Event, Job, ResolvedTarget, SamplingParams, TokenLogprob, WireError

_ERRORS: dict[int | str, dict[str, Any]] = {400: {}, 401: {}, 404: {}, 422: {}, 503: {}, 504: {}}


@dataclass(frozen=True)
class Target:
    """What a request generates with, resolved once: an adapter version (None: the base) or a weighted
    composition of versions."""

    adapter: ResolvedTarget | None
    composition: list[tuple[ResolvedTarget, float]] | None


# --- fan-out: one engine job per choice ------------------------------------------------------------


@dataclass
class Choice:
    """One choice of a reply: its engine job and, once it has them, its usage and finish reason."""

    index: int
    prompt_index: int
    sub: Submission
    head: str = ""  # text put before the generated text (the prompt, with echo)
    answer_prefix: str = ""  # dropped from the start of the generated text (chat)
    pending: str = ""  # generated text held back while it might still be the answer prefix
    started: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None
    want_logprobs: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # received, not yet sent
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # echo: the prompt's, not yet sent
    offset: int = 0  # completions: where the next token starts in the choice's text (text_offset)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The tokens received and not yet sent (None when the request did not ask for logprobs)."""
        if not self.want_logprobs:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def feed(self, text: str, final: bool) -> str:
        """The next piece of the visible text, given the next generated text."""
        out = ""
        if not self.started:
            self.pending += text
            maybe_prefix = len(self.pending) < len(self.answer_prefix) and self.answer_prefix.startswith(
                self.pending
            )
            if maybe_prefix and not final:
                return ""
            self.started = True
            text, self.pending = self.pending, ""
            if self.answer_prefix and text.startswith(self.answer_prefix):
                text = text[len(self.answer_prefix) :]
            out = self.head
        return out + text

    def receive(self, event: Event) -> None:
        """Keep the event's tokens until a chunk (or the reply) carries them."""
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs and self.want_logprobs:
            self.prompt_logprobs.extend(event.prompt_logprobs)

    def finish(self, event: Event) -> None:
        self.usage = event.usage or {}
        self.finish_reason = "length" if event.finish_reason == "length" else "stop"  # eos|stop -> stop


def _usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of every choice."""
    prompt = {c.prompt_index: c.usage["prompt_tokens"] for c in choices}
    completion = sum(c.usage["completion_tokens"] for c in choices)
    return Usage(
        prompt_tokens=sum(prompt.values()),
        completion_tokens=completion,
        total_tokens=sum(prompt.values()) + completion,
    )


def _completion_logprobs(choice: Choice) -> CompletionLogprobs | None:
    """The choice's pending tokens in the legacy shape (with echo, the prompt's come first, from
    offset 0; the first has no logprob); ``top_logprobs`` holds the chosen token too."""
    generated = choice.take_logprobs()
    if generated is None:
        return None
    prompt, choice.prompt_logprobs = choice.prompt_logprobs, []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    at = 0
    for t in prompt:
        offsets.append(at)
        at += len(t.text)
        tops.append(None if t.logprob is None else _top(t))
    for t in generated:
        offsets.append(choice.offset)
        choice.offset += len(t.text)
        tops.append(_top(t))
    tokens = prompt + generated
    return CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=tops,
        text_offset=offsets,
    )


def _top(t: TokenLogprob) -> dict[str, float]:
    top: dict[str, float] = {}
    for alt in [*(t.top or []), t]:
        if alt.logprob is not None:
            top.setdefault(alt.text, alt.logprob)  # tokens that spell alike: the most likely one
    return top


def _chat_logprobs(tokens: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if tokens is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=t.bytes,
                top_logprobs=[
                    ChatTopLogprob(token=a.text, logprob=a.logprob, bytes=a.bytes) for a in t.top or []
                ],
            )
            for t in tokens
        ]
    )


def _raiser(choice: Choice) -> Callable[[Event], None]:
    """Raise for a choice's error event: an adapter deleted after validation is OpenAI's
    ``model_not_found`` when ``model`` named it, and stays ``adapter_not_found`` in a composition;
    an adapter that cannot be loaded stays ``invalid_adapter``, pointing at ``model``."""
    return raise_for_event if choice.sub.job.adapters is not None else _raise_for


def _raise_for(event: Event) -> None:
    err = event.error
    if err is not None and err.code == "adapter_not_found":  # deleted after validation: OpenAI's terms
        raise model_not_found(api_error(err))
    if err is not None and err.code == "invalid_adapter":  # ``model`` named the adapter
        raise ApiError(http_status(err.code), err.code, err.message, "model")
    raise_for_event(event)


async def _all(awaitables: list[Awaitable[Event]]) -> list[Event]:
    """Await every item; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def _submit(client: EngineClient, request: Request, jobs: list[Job], prompt_of: list[int]) -> list[Choice]:
    """Reserve a slot and queue each job; on a refusal (503) the ones already queued are withdrawn."""
    choices: list[Choice] = []
    try:
        for index, job in enumerate(jobs):
            client.reserve(job)
            sub = client.submit(job, request)
            choices.append(Choice(index=index, prompt_index=prompt_of[index], sub=sub))
    except BaseException:
        for c in choices:
            c.sub.close()
        raise
    return choices


def _close(choices: list[Choice]) -> None:
    for c in choices:
        c.sub.close()


async def _final_texts(choices: list[Choice], request: Request) -> list[str]:
    """Wait for every choice to finish (closing them all however that ends); each choice's whole text."""
    try:
        finals = await unless_disconnected(_all([c.sub.final(_raiser(c)) for c in choices]), request)
    finally:
        _close(choices)  # also when the client went away: the worker drops every choice
    texts = []
    for c, final in zip(choices, finals, strict=True):
        c.receive(final)
        c.finish(final)
        texts.append(c.feed(final.text, True))
    return texts


# --- SSE -------------------------------------------------------------------------------------------


async def _merged(choices: list[Choice], firsts: list[Event]) -> AsyncIterator[tuple[Choice, Event]]:
    """Events of every choice as they come: the first ones already received, then the rest."""
    queue: asyncio.Queue[tuple[Choice, Event]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        while True:
            try:
                event = await choice.sub.next_event()
            except TimeoutError:
                late = WireError.of("timeout", "generation ran past the server's deadline")
                event = Event.failure(choice.sub.job_id, late)
            await queue.put((choice, event))
            if event.finished:
                return

    tasks = []
    for choice, first in zip(choices, firsts, strict=True):
        queue.put_nowait((choice, first))
        if not first.finished:
            tasks.append(asyncio.ensure_future(pump(choice)))
    try:
        for _ in range(len(choices)):  # one final event per choice ends it
            while True:
                choice, event = await queue.get()
                yield choice, event
                if event.finished:
                    break
    finally:
        for t in tasks:
            t.cancel()


async def _stream(
    choices: list[Choice],
    firsts: list[Event],
    chunk,
    opening: list[str],
    include_usage: bool,
    usage_chunk,
) -> AsyncIterator[str]:
    """Chunks as Server-Sent Events, ending with ``data: [DONE]``; a late error ends the stream without it."""
    try:
        for line in opening:
            yield line
        # aclosing: the pumps of the merge stop as soon as this stream ends, however it ends.
        async with aclosing(_merged(choices, firsts)) as events:
            async for choice, event in events:
                if event.error is not None:
                    yield sse(error_payload(event.error), compact=True)
                    return
                finished = event.finished
                choice.receive(event)
                if finished:
                    choice.finish(event)
                for line in chunk(choice, choice.feed(event.text, finished), finished):
                    yield line
        if include_usage:
            yield usage_chunk(_usage(choices))
        yield SSE_DONE
    finally:
        _close(choices)


# --- routes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIContext:
    """What the handlers share, set on ``app.state.openai`` by ``register_openai_routes``."""

    settings: Settings
    client: EngineClient
    limits: ModelLimits
    models: Models  # the base's names and id, and /v1 model -> adapter


def _context(request: Request) -> OpenAIContext:
    return request.app.state.openai


def register_openai_routes(
    app: FastAPI, settings: Settings, client: EngineClient, limits: ModelLimits, model: ServedModel
) -> None:
    try:
        base_created = int((Path(model.path) / "config.json").stat().st_mtime)
    except OSError:
        base_created = int(time.time())
    base_id, names = base_names(settings, model)
    models = Models(base_id, names, settings.adapter_dir, base_created, limits.template)
    app.state.openai = OpenAIContext(settings, client, limits, models)
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList, tags=["openai"])
    app.add_api_route(
        "/v1/models/{name}",
        get_model,
        methods=["GET"],
        response_model=ModelCard,
        tags=["openai"],
        responses={404: {}},
    )
    app.add_api_route(
        "/v1/completions",
        completions,
        methods=["POST"],
        response_model=Completion,
        tags=["openai"],
        responses=_ERRORS,
    )
    app.add_api_route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        response_model=ChatCompletion,
        tags=["openai"],
        responses=_ERRORS,
    )


async def fetch(
    ctx: OpenAIContext, body: CompletionRequest | ChatCompletionRequest, request: Request
) -> None:
    """An adapter ``model`` or ``adapters`` names that is not local comes from ``--adapter-source``."""
    refs = [] if body.model in ctx.models.base_names else [(body.model, "model")]
    refs += [(a.name, f"adapters.{i}.name") for i, a in enumerate(body.adapters or [])]
    await fetch_missing(request, refs)


def target(ctx: OpenAIContext, body: CompletionRequest | ChatCompletionRequest) -> Target:
    """What ``model`` (and the ``adapters`` extension) asks for."""
    settings = ctx.settings
    adapter = ctx.models.resolve(body.model)
    if body.adapters is None:
        if adapter is None:
            return Target(None, None)
        try:
            return Target(resolve_target(settings.adapter_dir, adapter, "model"), None)
        except ApiError as exc:
            raise model_not_found(exc) from None
    if adapter is not None:
        raise ApiError(
            422,
            "invalid_request",
            f"adapters composes adapters on the base: model must name the base ({ctx.models.base_id!r}), "
            f"not the adapter {body.model!r}",
            "model",
        )
    composition = [(a.name, a.weight) for a in body.adapters]
    _, parts = resolve_targets(settings.adapter_dir, None, composition)
    return Target(None, parts)


def make_jobs(
    ctx: OpenAIContext,
    prompts: list[str | list[int]],
    target: Target,
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    max_tokens_param: str,
    extra_stop: list[str],
    stream: bool,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> tuple[list[Job], list[int]]:
    """Validate every choice's job before any is queued; returns the jobs and their prompt indices."""
    settings, limits = ctx.settings, ctx.limits
    n = body.n or 1
    stop = list(dict.fromkeys([*body.stop, *extra_stop]))
    schema = _json_schema(body)
    jobs, prompt_of = [], []
    for p, prompt in enumerate(prompts):
        # Refuse a prompt that cannot fit before tokenizing it on the event loop (see ModelLimits).
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if isinstance(prompt, str):
            limits.check_prompt_chars(prompt, param)
        max_new = max_tokens
        if max_new is None:  # unset: the server default, shortened to what the context has room for
            n_ids = len(limits.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
            room = limits.context - max(1, n_ids)
            max_new = min(settings.default_max_new_tokens, room) if room >= 1 else 1
        for i in range(n):
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k,
                seed=None if body.seed is None else (body.seed + i) % (2**63),
                stop=stop,
                logprobs=logprobs,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                logit_bias=dict(body.logit_bias or {}),
                json_schema=schema,
                prompt_logprobs=prompt_logprobs,
            )
            try:
                job = prepare_job(
                    prompt_text=prompt,
                    target=target.adapter,
                    composition=target.composition,
                    params=params,
                    stream=stream,
                    limits=limits,
                    max_new_tokens_cap=settings.max_new_tokens_cap,
                    request_timeout=settings.request_timeout,
                    max_tokens_param=max_tokens_param,
                )
            except ApiError as exc:
                if exc.param == "prompt" and len(prompts) > 1:
                    exc.param = f"prompt[{p}]"
                    exc.message = f"prompt[{p}]: {exc.message}"
                raise
            jobs.append(job)
            prompt_of.append(p)
    return jobs, prompt_of


def check_stream_options(body: CompletionRequest | ChatCompletionRequest) -> bool:
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "invalid_request", "stream_options is only allowed with stream: true", "stream_options"
        )
    return bool(body.stream_options and body.stream_options.include_usage)


def list_models(request: Request) -> ModelList:
    """The base model and every adapter (an adapter's ``parent`` is the base)."""
    return ModelList(data=_context(request).models.cards())


def get_model(name: str, request: Request) -> ModelCard:
    return _context(request).models.card(name)


async def completions(body: CompletionRequest, request: Request) -> Any:
    """Raw-prompt completion; ``prompt`` may be a list, each prompt gets ``n`` choices."""
    ctx = _context(request)
    include_usage = check_stream_options(body)
    await fetch(ctx, body, request)
    wanted = target(ctx, body)
    if body.best_of not in (None, body.n or 1):
        raise ApiError(
            422, "invalid_request", "best_of is not supported (leave it unset or equal to n)", "best_of"
        )
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            422, "invalid_request", "max_tokens 0 generates nothing: send it with echo", "max_tokens"
        )
    prompts = body.prompts()
    # echo with logprobs scores the prompt too; max_tokens 0 (echo only) runs the prompt alone,
    # which the engine allows for a scoring row only
    scored = body.logprobs if body.logprobs is not None else 0 if body.max_tokens == 0 else None
    jobs, prompt_of = make_jobs(
        ctx,
        prompts,
        wanted,
        body,
        body.max_tokens,
        "max_tokens",
        [],
        bool(body.stream),
        body.logprobs,
        scored if body.echo else None,
    )
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    choices = _submit(ctx.client, request, jobs, prompt_of)
    heads = (
        [p if isinstance(p, str) else ctx.limits.tokenizer.decode(p) for p in prompts] if body.echo else []
    )
    for c in choices:
        c.want_logprobs = body.logprobs is not None
        if body.echo:
            c.head = heads[c.prompt_index]
            c.offset = len(c.head)  # the generated tokens follow the prompt in the choice's text

    def reply(items: list[CompletionChoice], usage: Usage | None) -> Completion:
        return Completion(id=rid, created=created, model=body.model, choices=items, usage=usage)

    if not body.stream:
        texts = await _final_texts(choices, request)
        items = [
            CompletionChoice(
                index=c.index, text=text, finish_reason=c.finish_reason, logprobs=_completion_logprobs(c)
            )
            for c, text in zip(choices, texts, strict=True)
        ]
        return reply(items, _usage(choices))

    def chunk(choice: Choice, text: str, finished: bool) -> list[str]:
        if not text and not finished:
            return []
        item = CompletionChoice(
            index=choice.index,
            text=text,
            finish_reason=choice.finish_reason if finished else None,
            logprobs=_completion_logprobs(choice),
        )
        out = reply([item], None).model_dump()
        if not include_usage:
            out.pop("usage")
        return [sse(out, compact=True)]

    def usage_chunk(usage: Usage) -> str:
        return sse(reply([], usage).model_dump(), compact=True)

    return await _stream_response(request, choices, chunk, [], include_usage, usage_chunk)


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """Chat: the messages are rendered with the base's own chat template when it has one, else the
    adapter's recorded prompt template, else the default one."""
    ctx = _context(request)
    include_usage = check_stream_options(body)
    await fetch(ctx, body, request)
    wanted = target(ctx, body)
    template = template_of(wanted.adapter, wanted.composition, ctx.limits.template)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    try:
        prompt = template.render_chat_prompt(messages)
    except (ValueError, KeyError, IndexError) as exc:
        raise ApiError(422, "invalid_messages", f"messages cannot be rendered: {exc}", "messages") from None
    max_tokens, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs, prompt_of = make_jobs(
        ctx, [prompt], wanted, body, max_tokens, param, template.turn_stops(), bool(body.stream), logprobs
    )
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    choices = _submit(ctx.client, request, jobs, prompt_of)
    prefix = template.answer_prefix()
    for c in choices:
        c.answer_prefix = prefix
        c.want_logprobs = logprobs is not None

    if not body.stream:
        texts = await _final_texts(choices, request)
        items = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=text),
                finish_reason=c.finish_reason,
                logprobs=_chat_logprobs(c.take_logprobs()),
            )
            for c, text in zip(choices, texts, strict=True)
        ]
        return ChatCompletion(id=rid, created=created, model=body.model, choices=items, usage=_usage(choices))

    def data(items: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        payload = ChatCompletionChunk(id=rid, created=created, model=body.model, choices=items, usage=usage)
        out = payload.model_dump()
        if not include_usage:
            out.pop("usage")
        for item in out["choices"]:  # a delta carries only what it changes
            item["delta"] = {k: v for k, v in item["delta"].items() if v is not None}
        return sse(out, compact=True)

    def chunk(choice: Choice, text: str, finished: bool) -> list[str]:
        lines = []
        if text:
            lp = _chat_logprobs(choice.take_logprobs())
            lines.append(
                data([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=text), logprobs=lp)])
            )
        if finished:
            rest = choice.take_logprobs()  # tokens whose text is not part of the reply (EOS, a stop)
            lines.append(
                data(
                    [
                        ChatChunkChoice(
                            index=choice.index,
                            delta=ChatDelta(),
                            finish_reason=choice.finish_reason,
                            logprobs=_chat_logprobs(rest) if rest else None,
                        )
                    ]
                )
            )
        return lines

    opening = [
        data([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))]) for c in choices
    ]
    return await _stream_response(request, choices, chunk, opening, include_usage, lambda u: data([], u))


async def _stream_response(
    request: Request, choices: list[Choice], chunk, opening, include_usage: bool, usage_chunk
) -> Any:
    """Wait for every choice's first event (an early error is a real status), then stream."""
    try:
        firsts = await unless_disconnected(_all([c.sub.next_or_504() for c in choices]), request)
        for choice, first in zip(choices, firsts, strict=True):
            _raiser(choice)(first)
    except BaseException:
        _close(choices)
        raise
    return sse_response(_stream(choices, firsts, chunk, opening, include_usage, usage_chunk))


def _json_schema(body: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The canonical schema text a ``response_format`` asks for; None for free text."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_schema_text(JSON_OBJECT, "response_format")
    assert fmt.json_schema is not None  # the model's validator requires it for this type
    return json_schema_text(fmt.json_schema.schema_, "response_format.json_schema.schema")

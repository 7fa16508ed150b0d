"""Assemble the LitServer: the generation worker's LitAPI plus the service's own HTTP routes.

LitServe contributes the process tree (spawned generation worker, forked API servers, queues);
every public route is ours, so each one validates before queueing and answers in the one error
envelope. LitServe's own routes (``/``, its ``/health``, ``/info`` and the LitAPI's internal
route) are removed: its health is not liveness and would need the key, and the internal route
would bypass validation.

Routes: POST /generate; GET /adapters, GET|PUT|DELETE /adapters/{name}; /train*, /datasets
(service.jobs.routes); /v1/* (service.openai_api); GET /health, /health/ready, /metrics (open,
everything else needs the key when one is set). Middlewares, outermost first: request metrics, API key.

``build_server`` is the generation server (roles ``all`` and ``serve``). ``build_runner_app`` is the
``runner`` role's plain FastAPI app: the same job, adapter, health and metrics routes, no LitServe and
no model; ``/generate`` and ``/v1/*`` answer 503 naming the role.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.adapters import store
from service.auth import ApiKeyMiddleware, make_auth_dependency
from service.errors import ApiError, install_error_handlers
from service.gateway import (
    EngineClient,
    ModelLimits,
    Submission,
    error_payload,
    prepare_job,
    raise_for_event,
    unless_disconnected,
)
from service.jobs.datasets import MULTIPART_OVERHEAD, read_capped
from service.limits import BodyLimitMiddleware
from service.litserve_glue import Server, build_litserver
from service.schemas import (
    AdapterInfo,
    AdapterList,
    Deleted,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    Health,
    Readiness,
)
from service.settings import Settings
from service.wire import Event, WireError
from service.worker import EngineAPI, WorkerConfig, read_status

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServedModel:
    """The base as the main process resolved it (trainer.model.BaseSource) plus device and dtype."""

    name: str
    path: Path
    origin: str
    random_weights: bool
    device: str
    dtype: str


# --- middlewares -----------------------------------------------------------------------------------


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it to the last body byte."""

    def __init__(self, app: ASGIApp, routes_of: FastAPI) -> None:
        self.app = app
        self.routes_of = routes_of

    def endpoint(self, scope: Scope) -> str:
        partial = None
        for route in self.routes_of.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", "other")
            if match is Match.PARTIAL and partial is None:  # right path, wrong method
                partial = getattr(route, "path", None)
        return partial or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            endpoint = self.endpoint(scope)
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


# --- assembly --------------------------------------------------------------------------------------


def build_server(settings: Settings, model: ServedModel) -> tuple[Server, EngineClient]:
    """The LitServer with every route; call ``server.run`` from the main process."""
    from trainer.model import load_tokenizer

    worker = WorkerConfig(
        model_path=str(model.path),
        model_name=model.name,
        origin=model.origin,
        random_weights=model.random_weights,
        adapter_dir=str(settings.adapter_dir),
        device=model.device,
        dtype=model.dtype,
        max_batch_size=settings.max_batch_size,
        max_loaded_adapters=settings.max_loaded_adapters,
        status_path=str(settings.worker_status_path),
        log_level=settings.log_level,
    )
    accelerator = {"cpu": {"accelerator": "cpu"}, "cuda": {"accelerator": "cuda", "devices": 1}}[model.device]
    # open streams get 5 s on shutdown, not LitServe's 30 s
    server = build_litserver(EngineAPI(worker), accelerator, settings.request_timeout, graceful_timeout=5)
    app = server.app
    app.title, app.version = "loraserve", "0.1.0"

    client = EngineClient(server, settings.max_in_flight)
    config = json.loads((model.path / "config.json").read_text())
    limits = ModelLimits(context=int(config.get("n_positions", 1024)), tokenizer=load_tokenizer(model.path))
    shape = store.BaseShape.from_model_dir(model.path)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None

    install_error_handlers(app)
    _health_routes(app, lambda: _worker_readiness(settings))
    _generate_route(app, settings, client, limits)

    from service.openai_api import register_openai_routes

    register_openai_routes(app, settings, client, limits, model)
    _common_routes(app, settings, shape, model, api_key)
    return server, client


def build_runner_app(settings: Settings, model: ServedModel, runner_alive: Callable[[], bool]) -> FastAPI:
    """The ``runner`` role's app: job, adapter, health and metrics routes; no generation model.

    ``runner_alive`` says whether the job runner process still runs (readiness).
    """
    app = FastAPI(title="loraserve", version="0.1.0")
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    install_error_handlers(app)

    def readiness() -> dict[str, Any]:
        status = {
            "model": model.name,
            "device": model.device,
            "dtype": model.dtype,
            "weights": model.origin,
            "random_weights": model.random_weights,
            "role": settings.role,
        }
        if runner_alive():
            return dict(status, status="ready", detail="runs training jobs; no generation model is loaded")
        return dict(status, status="failed", detail="the job runner is not running")

    _health_routes(app, readiness)
    _no_generation_routes(app, settings)
    _common_routes(app, settings, store.BaseShape.from_model_dir(model.path), model, api_key)
    return app


def _common_routes(
    app: FastAPI, settings: Settings, shape: store.BaseShape, model: ServedModel, api_key: str | None
) -> None:
    """Adapter and job routes, then the middlewares: every role has them."""
    _adapter_routes(app, settings, shape, model)

    from service.jobs.routes import register_job_routes

    register_job_routes(app, settings, make_auth_dependency(api_key))

    # Starlette puts the last added middleware outermost: metrics must also see 401s.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)  # after the key check
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware, routes_of=app)


# --- health and metrics ----------------------------------------------------------------------------


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _worker_readiness(settings: Settings) -> dict[str, Any]:
    """The generation worker's status file, checked against its pid (roles ``all`` and ``serve``)."""
    status = read_status(settings.worker_status_path) or {"status": "starting"}
    if status.get("status") == "ready" and not _pid_alive(status.get("pid")):
        status = dict(status, status="failed", detail="the generation worker is not running")
    return dict(status, role=settings.role)


def _health_routes(app: FastAPI, readiness: Callable[[], dict[str, Any]]) -> None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)

    @app.get("/health", response_model=Health, tags=["health"])
    def health() -> Health:
        """Liveness: the API process answers."""
        return Health(status="ok")

    @app.get(
        "/health/ready", response_model=Readiness, tags=["health"], responses={503: {"model": Readiness}}
    )
    def ready() -> JSONResponse:
        """Readiness for this server's role: the generation worker has loaded the model (it publishes a
        status file), or, in the ``runner`` role, the job runner runs."""
        status = readiness()
        body = Readiness.model_validate({k: status.get(k) for k in Readiness.model_fields if k in status})
        code = 200 if body.status == "ready" else 503
        return JSONResponse(body.model_dump(), status_code=code)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus text format, aggregated over every process of the server."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# --- generation ------------------------------------------------------------------------------------


def _no_generation_routes(app: FastAPI, settings: Settings) -> None:
    """The ``runner`` role loads no model: generation routes say so instead of a bare 404."""

    async def no_generation(request: Request) -> None:
        raise ApiError(
            503,
            "generation_not_served",
            f"this server runs with role '{settings.role}': it runs training jobs and loads no generation "
            f"model; send {request.url.path} to a server with role 'serve' or 'all'",
        )

    app.add_api_route("/generate", no_generation, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/{path:path}", no_generation, methods=["GET", "POST"], include_in_schema=False)


def _generate_route(app: FastAPI, settings: Settings, client: EngineClient, limits: ModelLimits) -> None:
    @app.post(
        "/generate",
        response_model=GenerateResponse,
        tags=["generation"],
        responses={400: {}, 404: {}, 422: {}, 503: {}, 504: {}},
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Generate text with the base model or one adapter; ``stream: true`` answers with SSE."""
        if body.adapter is not None:
            store.check_name(body.adapter, "adapter")
        template = store.template_for(settings.adapter_dir, body.adapter)
        prompt = body.prompt if body.raw else template.render_prompt(body.prompt)
        params = {
            "max_new_tokens": body.max_new_tokens or settings.default_max_new_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
            "stop": body.stop,
        }
        job = prepare_job(
            prompt_text=prompt,
            adapter=body.adapter,
            params=params,
            stream=body.stream,
            limits=limits,
            adapter_dir=settings.adapter_dir,
            max_new_tokens_cap=settings.max_new_tokens_cap,
            request_timeout=settings.request_timeout,
        )
        client.reserve()
        sub = client.submit(job, request)
        if not body.stream:
            try:
                final = await unless_disconnected(sub.final(raise_for_event), request)
            finally:
                sub.close()  # also when the client went away: the worker drops the job
            return GenerateResponse(
                id=final.id,
                text=final.text,
                adapter=body.adapter,
                finish_reason=final.finish_reason,
                usage=final.usage,
            )
        # Stream: wait for the first event so an error found before the first token is a real status.
        try:
            first = await unless_disconnected(sub.next_or_504(), request)
            raise_for_event(first)
        except BaseException:
            sub.close()
            raise
        return StreamingResponse(
            _sse(sub, first, body.adapter), media_type="text/event-stream", headers=_SSE_HEADERS
        )


def _chunk(event: Event, adapter: str | None) -> str:
    chunk = GenerateChunk(
        id=event.id, text=event.text, adapter=adapter, finish_reason=event.finish_reason, usage=event.usage
    )
    return f"data: {chunk.model_dump_json()}\n\n"


async def _sse(sub: Submission, first: Event, adapter: str | None):
    """Text deltas as Server-Sent Events, then ``data: [DONE]``; a late error ends the stream without it."""
    try:
        event = first
        while True:
            if event.error is not None:
                yield f"data: {json.dumps(error_payload(event.error))}\n\n"
                return
            yield _chunk(event, adapter)
            if event.finished:
                yield "data: [DONE]\n\n"
                return
            try:
                event = await sub.next_event()
            except TimeoutError:
                late = WireError.of("timeout", "generation ran past the server's deadline")
                yield f"data: {json.dumps(error_payload(late))}\n\n"
                return
    finally:
        sub.close()


# --- adapters --------------------------------------------------------------------------------------


def _loaded_adapters(settings: Settings) -> frozenset[str]:
    status = read_status(settings.worker_status_path) or {}
    return frozenset(status.get("loaded_adapters") or [])


def _adapter_routes(app: FastAPI, settings: Settings, shape: store.BaseShape, model: ServedModel) -> None:
    adapter_dir = settings.adapter_dir

    @app.get("/adapters", response_model=AdapterList, tags=["adapters"])
    def list_adapters() -> AdapterList:
        """Every adapter folder in the adapter directory."""
        return AdapterList(adapters=store.list_infos(adapter_dir, _loaded_adapters(settings)))

    @app.get("/adapters/{name}", response_model=AdapterInfo, tags=["adapters"], responses={404: {}, 422: {}})
    def get_adapter(name: str) -> AdapterInfo:
        return store.info(adapter_dir, name, _loaded_adapters(settings))

    @app.put(
        "/adapters/{name}",
        response_model=AdapterInfo,
        tags=["adapters"],
        responses={201: {"model": AdapterInfo}, 413: {}, 422: {}},
    )
    async def put_adapter(name: str, request: Request) -> JSONResponse:
        """Upload a PEFT LoRA adapter: multipart ``adapter_config``, ``adapter_model``, optional ``template``.

        Validated against the base before anything is written, then published atomically: a bad
        upload leaves the previous version serving.
        """
        store.check_name(name)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            raise ApiError(
                413, "payload_too_large", f"the upload is larger than {settings.max_upload_bytes} bytes"
            )
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                422, "invalid_upload", "send multipart/form-data with adapter_config and adapter_model"
            )
        # Read with the cap first: a chunked body has no Content-Length, and the form parser alone
        # would spool any amount of it to temporary files before the size check below.
        raw = await read_capped(
            request,
            settings.max_upload_bytes + MULTIPART_OVERHEAD,
            "the upload",
            f" (adapter files up to {settings.max_upload_bytes} bytes, plus multipart framing)",
        )
        try:
            form = await MultiPartParser(request.headers, _chunks(raw), max_files=4, max_fields=8).parse()
        except MultiPartException as exc:
            raise ApiError(
                400, "invalid_multipart", f"could not read the multipart upload: {exc.message}"
            ) from None
        try:
            config_raw = await _form_file(form, "adapter_config")
            weights_raw = await _form_file(form, "adapter_model")
            template_field = form.get("template")
            if template_field is not None and not isinstance(template_field, str):
                template_field = (await template_field.read()).decode("utf-8", "replace")
        finally:
            await form.close()
        if len(config_raw) + len(weights_raw) > settings.max_upload_bytes:
            raise ApiError(
                413, "payload_too_large", f"the upload is larger than {settings.max_upload_bytes} bytes"
            )
        template = store.parse_template(template_field)

        def validate_and_publish() -> bool:
            store.validate_upload(config_raw, weights_raw, shape)
            return store.publish(adapter_dir, name, config_raw, weights_raw, template, model.name)

        created = await asyncio.to_thread(validate_and_publish)
        info = store.info(adapter_dir, name, _loaded_adapters(settings))
        return JSONResponse(info.model_dump(), status_code=201 if created else 200)

    @app.delete("/adapters/{name}", response_model=Deleted, tags=["adapters"], responses={404: {}, 422: {}})
    def delete_adapter(name: str) -> Deleted:
        """Remove an adapter; requests already running on it finish."""
        store.delete(adapter_dir, name)
        return Deleted(deleted=name)


async def _chunks(data: bytes):
    yield data


async def _form_file(form, field: str) -> bytes:
    value = form.get(field)
    if value is None:
        raise ApiError(422, "invalid_upload", f"the upload needs a file field {field!r}", field)
    if isinstance(value, UploadFile):
        return await value.read()
    return value.encode()

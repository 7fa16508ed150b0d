"""Assemble the servers: the LitServer for the generation roles, a plain FastAPI app for ``runner``.

LitServe contributes the process tree (spawned generation worker, forked API servers, queues);
every public route is ours (``service.routes``), so each one validates before queueing and answers
in the one error envelope. LitServe's own routes are removed (``service.litserve_glue``).

Routes: POST /generate (routes.generate); POST /eval (routes.eval); GET /adapters,
GET|PUT|DELETE /adapters/{name} (routes.adapters); /train*, /datasets (routes.jobs); /v1/files*
(routes.files); /v1/fine_tuning/* (routes.fine_tuning); the other /v1/* (routes.openai); GET /health,
/health/ready, /metrics (routes.health); GET /ui, the web console's static files (routes.console). Those
are open; everything else needs the key when one is set.
Middlewares, outermost first: request metrics, API key, body limit.

``build_server`` is the generation server (roles ``all`` and ``serve``). ``build_runner_app`` is the
``runner`` role's plain FastAPI app: the same job, adapter, health and metrics routes, no LitServe and
no model; ``/generate``, ``/eval`` and ``/v1/*`` (but files and fine-tuning) answer 503 naming the role.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from loracore.families import served_context
from loracore.lora_format import BaseLayout
from loracore.template import base_chat_template
from service import metrics
from service.adapters.source import AdapterSource, Fetcher
from service.auth import ApiKeyMiddleware, make_auth_dependency
from service.errors import install_error_handlers
from service.gateway import EngineClient, ModelLimits
from service.limits import BodyLimitMiddleware
from service.litserve_glue import Server, WorkerExit, build_litserver
from service.routes.adapters import register_adapter_routes
from service.routes.console import register_console_routes
from service.routes.eval import register_eval_routes
from service.routes.export import register_export_routes
from service.routes.files import register_file_routes
from service.routes.fine_tuning import register_fine_tuning_routes
from service.routes.generate import register_generate_routes, register_no_generation_routes
from service.routes.health import register_health_routes, runner_readiness, worker_readiness
from service.routes.jobs import register_job_routes
from service.routes.openai import register_openai_routes
from service.served_model import ServedModel
from service.settings import Settings
from service.text_input import TextMiddleware
from service.worker import EngineAPI, WorkerConfig
from service.worker_status import read_status, write_status

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
        kv_cache_bytes=settings.kv_cache_bytes,
        max_context=settings.max_context,
        prefix_cache=settings.prefix_cache == "on",
        max_loaded_adapters=settings.max_loaded_adapters,
        status_path=str(settings.worker_status_path),
        generation_threads_path=str(settings.generation_threads_path),
        log_level=settings.log_level,
    )
    accelerator = {"cpu": {"accelerator": "cpu"}, "cuda": {"accelerator": "cuda", "devices": 1}}[model.device]
    # open streams get 5 s on shutdown, not LitServe's 30 s
    server = build_litserver(EngineAPI(worker), accelerator, settings.request_timeout, graceful_timeout=5)
    server.heal(
        max_restarts=settings.worker_max_restarts,
        window_s=settings.worker_restart_window,
        on_exit=lambda gone: _worker_exited(settings, gone),
    )
    app = server.app
    app.title, app.version = "loraserve", "0.1.0"

    client = EngineClient(
        server,
        max_queue=settings.max_queue,
        status_path=settings.worker_status_path,
        max_batch_size=settings.max_batch_size,
    )
    config = json.loads((model.path / "config.json").read_text())
    limits = ModelLimits(
        context=served_context(config, settings.max_context),
        tokenizer=load_tokenizer(model.path),
        vocab_size=config.get("vocab_size"),
        template=base_chat_template(model.path),
    )

    app.state.adapter_fetcher = adapter_fetcher(settings, model)
    install_error_handlers(app)
    register_health_routes(
        app, lambda: worker_readiness(settings, server.worker_up), settings.worker_status_path
    )
    register_generate_routes(app, settings, client, limits)
    register_eval_routes(app, settings, client, limits)
    register_openai_routes(app, settings, client, limits, model)
    _common_routes(app, settings, model)
    return server, client


def adapter_fetcher(settings: Settings, model: ServedModel) -> Fetcher | None:
    """What fetches an adapter the adapter directory lacks on its first request (``--adapter-source``)."""
    if settings.adapter_source is None:
        return None
    return Fetcher(
        AdapterSource(settings.adapter_source, settings.adapter_source_timeout),
        settings.adapter_dir,
        BaseLayout.from_model_dir(model.path),
        model.name,
        settings.keep_adapter_versions,
        settings.max_upload_bytes,
    )


def _worker_exited(settings: Settings, gone: WorkerExit) -> None:
    """In the main process, when the generation worker died: readiness 503 until its successor has
    loaded the model (it rewrites the status file), and its live gauges no longer counted."""
    from prometheus_client import multiprocess

    previous = read_status(settings.worker_status_path) or {}
    gone_with_it = ("load", "loaded_adapters", "adapter_cache", "adapter_pins", "pid", "updated")
    keep = {k: v for k, v in previous.items() if k not in gone_with_it}
    action = "the server stops" if gone.giving_up else f"restarting it (restart {gone.restarts})"
    detail = f"the generation worker died (exit code {gone.exitcode}); {action}"
    write_status(
        settings.worker_status_path,
        dict(keep, status="failed" if gone.giving_up else "starting", detail=detail),
    )
    if gone.pid is not None:
        multiprocess.mark_process_dead(gone.pid)
    if not gone.giving_up:
        metrics.WORKER_RESTARTS.inc()


def build_runner_app(settings: Settings, model: ServedModel, runner_alive: Callable[[], bool]) -> FastAPI:
    """The ``runner`` role's app: job, adapter, health and metrics routes; no generation model.

    ``runner_alive`` says whether the job runner process still runs (readiness).
    """
    app = FastAPI(title="loraserve", version="0.1.0")
    install_error_handlers(app)
    register_health_routes(app, runner_readiness(settings, model, runner_alive))
    _common_routes(app, settings, model)
    register_no_generation_routes(app, settings)  # its /v1/* catch-all after /v1/files and /v1/fine_tuning
    return app


def _common_routes(app: FastAPI, settings: Settings, model: ServedModel) -> None:
    """Adapter, job, file, fine-tuning and console routes, then the middlewares: every role has them (a
    runner accepts fine-tuning jobs as it accepts POST /train)."""
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    auth = make_auth_dependency(api_key)
    register_adapter_routes(app, settings, BaseLayout.from_model_dir(model.path), model)
    register_export_routes(app, settings, model)
    register_job_routes(app, settings, auth)
    register_file_routes(app, settings, auth)
    register_fine_tuning_routes(app, settings, auth, model)
    register_console_routes(app)
    add_middlewares(app, settings, api_key)


# --- middlewares -----------------------------------------------------------------------------------


def add_middlewares(app: FastAPI, settings: Settings, api_key: str | None) -> None:
    # Starlette puts the last added middleware outermost: metrics must also see 401s.
    app.add_middleware(TextMiddleware)  # reads the body BodyLimitMiddleware buffered
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)  # after the key check
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware, routes_of=app)


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

"""GET /health (liveness), /health/ready (readiness for the server's role), /metrics (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from service.metrics import WorkerStatusCollector
from service.schemas import Health, Readiness
from service.served_model import ServedModel
from service.settings import Settings
from service.worker_status import pid_alive, read_status


def worker_readiness(
    settings: Settings, taking_requests: Callable[[], bool] = lambda: True
) -> dict[str, Any]:
    """The generation worker's status file, checked against its pid (roles ``all`` and ``serve``)
    and against ``taking_requests`` (a restarted worker: the API side admits requests again)."""
    status = read_status(settings.worker_status_path) or {"status": "starting"}
    if status.get("status") == "ready" and not pid_alive(status.get("pid")):
        status = dict(status, status="failed", detail="the generation worker is not running")
    elif status.get("status") == "ready" and not taking_requests():
        status = dict(status, status="starting", detail="the restarted generation worker is starting")
    return dict(status, role=settings.role)


def runner_readiness(
    settings: Settings, model: ServedModel, runner_alive: Callable[[], bool]
) -> Callable[[], dict[str, Any]]:
    """Readiness of the ``runner`` role: the job runner process still runs."""

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

    return readiness


@dataclass(frozen=True)
class HealthContext:
    """What the handlers share, set on ``app.state.health`` by ``register_health_routes``."""

    readiness: Callable[[], dict[str, Any]]
    registry: CollectorRegistry  # every process's metrics, and the worker's status gauges


def _context(request: Request) -> HealthContext:
    return request.app.state.health


def register_health_routes(
    app: FastAPI, readiness: Callable[[], dict[str, Any]], worker_status: Path | None = None
) -> None:
    """``worker_status``: the generation worker's status file, read at each scrape for the gauges of
    its current state (``metrics.WorkerStatusCollector``); None where no worker runs."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if worker_status is not None:
        registry.register(WorkerStatusCollector(worker_status))
    app.state.health = HealthContext(readiness, registry)
    app.add_api_route("/health", health, methods=["GET"], response_model=Health, tags=["health"])
    app.add_api_route(
        "/health/ready",
        ready,
        methods=["GET"],
        response_model=Readiness,
        tags=["health"],
        responses={503: {"model": Readiness}},
    )
    app.add_api_route(
        "/metrics", prometheus_metrics, methods=["GET"], tags=["health"], response_class=Response
    )


def health() -> Health:
    """Liveness: the API process answers."""
    return Health(status="ok")


def ready(request: Request) -> JSONResponse:
    """Readiness for this server's role: the generation worker has loaded the model (it publishes a
    status file), or, in the ``runner`` role, the job runner runs."""
    status = _context(request).readiness()
    body = Readiness.model_validate({k: status.get(k) for k in Readiness.model_fields if k in status})
    code = 200 if body.status == "ready" else 503
    return JSONResponse(body.model_dump(), status_code=code)


def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format, aggregated over every process of the server."""
    return Response(generate_latest(_context(request).registry), media_type=CONTENT_TYPE_LATEST)

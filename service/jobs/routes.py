"""HTTP routes for training jobs and dataset uploads (/train, /datasets)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI

from service.errors import ApiError
from service.settings import Settings


def register_job_routes(app: FastAPI, settings: Settings, auth: Callable) -> None:
    """Add /train and /datasets to ``app``; every route depends on ``auth``."""
    deps = [Depends(auth)]

    def _not_yet() -> None:
        raise ApiError(501, "not_implemented", "training jobs are not available yet")

    for path, method in (
        ("/train", "POST"),
        ("/train", "GET"),
        ("/train/{job_id}", "GET"),
        ("/train/{job_id}", "DELETE"),
        ("/train/{job_id}/events", "GET"),
        ("/train/{job_id}/logs", "GET"),
        ("/datasets", "POST"),
    ):
        app.add_api_route(path, _not_yet, methods=[method], dependencies=deps)

"""Every use of LitServe beyond its documented API, in one place (litserve==0.2.19).

LitServe gives the process tree: the forked API servers, the spawned generation worker, the request
queue of each LitAPI (a manager queue) and a transport back to each API server, whose own task files
every reply into ``server.response_buffer``. Its routes and loops are not used (docs/architecture.md,
"Why this shape"): every public route is ours and the worker runs our loop. What that takes of
LitServe's internals is below; tests/test_litserve_glue.py pins each piece to the installed version,
so an upgrade that changes one fails there first.

Main process:  ``Server`` (says when it serves, stops on request), ``build_litserver``.
API servers:   ``open_reply``, ``put_request``, ``next_reply``, ``close_reply``, ``consumer_id``.
Worker:        ``QueueLoop`` (LitServe calls it in the worker), ``WorkerQueue`` (take, reply).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty
from typing import Any

import litserve as ls
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

log = logging.getLogger(__name__)

LITSERVE_VERSION = "0.2.19"  # the version every use below was read against
ENGINE_PATH = "/_engine"  # LitServe needs a route for the LitAPI; build_litserver removes it
LITSERVE_HEALTH = "/_litserve/health"  # LitServe's own routes, moved out of the way, then removed
LITSERVE_INFO = "/_litserve/info"


# --- main process ----------------------------------------------------------------------------------


class Server(ls.LitServer):
    """LitServer that says when it is serving, and can be asked to stop from another thread."""

    serving = False

    def verify_worker_status(self) -> None:
        super().verify_worker_status()
        self.serving = True  # next: LitServe starts the API servers and waits on its shutdown event

    def request_shutdown(self) -> None:
        try:
            self._shutdown_event.set()  # a manager proxy: this thread gets its own connection
        except Exception:  # the manager is already gone: shutdown is under way
            log.debug("shutdown event not reachable", exc_info=True)


def engine_api_options(max_batch_size: int, loop: QueueLoop) -> dict[str, Any]:
    """``LitAPI.__init__`` arguments for the worker's API. ``stream=True`` makes LitServe's reply task
    append every item to the request's deque (``next_reply`` reads it) instead of keeping only one."""
    return {"api_path": ENGINE_PATH, "stream": True, "max_batch_size": max_batch_size, "loop": loop}


def build_litserver(
    api: ls.LitAPI, accelerator: dict[str, Any], timeout: float, graceful_timeout: float
) -> Server:
    """The LitServer around ``api`` with none of LitServe's own routes (``/``, its health and info, the
    LitAPI's route): its health is not liveness and needs the key, the LitAPI route skips validation."""
    server = Server(
        api,
        **accelerator,
        workers_per_device=1,
        timeout=timeout,
        healthcheck_path=LITSERVE_HEALTH,
        info_path=LITSERVE_INFO,
    )
    server.uvicorn_graceful_timeout = graceful_timeout  # open streams get this long on shutdown
    drop = {"/", LITSERVE_HEALTH, LITSERVE_INFO, api.api_path}
    routes = server.app.router.routes
    routes[:] = [r for r in routes if getattr(r, "path", None) not in drop]
    return server


# --- API servers -----------------------------------------------------------------------------------


@dataclass
class Reply:
    """Where LitServe's reply task puts the worker's answers to one request, in this API server."""

    uid: str
    item: ResponseBufferItem


def consumer_id(request: Any) -> int:
    """Which API server a request arrived at: the worker's replies to it are sent there."""
    return request.app.response_queue_id


def open_reply(server: ls.LitServer) -> Reply:
    reply = Reply(str(uuid.uuid4()), ResponseBufferItem(event=asyncio.Event(), response_queue=deque()))
    server.response_buffer[reply.uid] = reply.item
    return reply


def close_reply(server: ls.LitServer, reply: Reply) -> bool:
    """Forget the buffer (late replies are then dropped); False when it was already closed."""
    return server.response_buffer.pop(reply.uid, None) is not None


def put_request(server: ls.LitServer, consumer: int | None, uid: str | None, payload: dict[str, Any]) -> None:
    """Queue ``payload`` for the worker in LitServe's item shape; raises when the manager is gone."""
    server._get_request_queue(ENGINE_PATH).put((consumer, uid, time.monotonic(), payload))


async def next_reply(reply: Reply, remaining: Callable[[], float]) -> tuple[Any, bool]:
    """The next item for this request as (data, ok); ok is False when LitServe itself reports a failure.

    Raises TimeoutError when ``remaining()`` seconds pass with nothing.
    """
    queue = reply.item.response_queue
    while not queue:
        reply.item.event.clear()
        await asyncio.wait_for(reply.item.event.wait(), remaining())
    data, status = queue.popleft()
    return data, status != LitAPIStatus.ERROR


def describe_failure(data: Any) -> str:
    """What a LitServe-level failure says: its loops send the exception pickled."""
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)  # from our own worker, never from a client
        except Exception:
            return "the generation worker failed"
    detail = getattr(data, "detail", None) or str(data)
    return f"the generation worker failed: {detail}" if detail else "the generation worker failed"


# --- worker ----------------------------------------------------------------------------------------


class StopServing(Exception):
    """LitServe asked the worker to stop (its sentinel), or its manager is gone."""


@dataclass(frozen=True)
class Incoming:
    consumer: int | None  # None for messages that want no reply (a cancel)
    uid: str | None
    payload: dict[str, Any]


class WorkerQueue:
    """The worker's end of LitServe's queues: take what the API servers sent, reply to one of them."""

    def __init__(self, loop: LitLoop, request_queue: Any, transport: Any) -> None:
        self.loop, self.request_queue, self.transport = loop, request_queue, transport

    def take(self, timeout: float | None) -> Incoming | None:
        """The next item, waiting up to ``timeout`` s (None: do not wait); None when there is none."""
        try:
            if timeout is None:
                item = self.request_queue.get_nowait()
            else:
                item = self.request_queue.get(timeout=timeout)
        except Empty:
            return None
        except (EOFError, OSError) as exc:  # the manager died: the server is going away
            raise StopServing from exc
        if item == _SENTINEL_VALUE or item is None:
            raise StopServing
        consumer, uid, _, payload = item
        return Incoming(consumer, uid, payload)

    def reply(self, consumer: int, uid: str, payload: dict[str, Any]) -> None:
        self.loop.put_response(
            self.transport, consumer, uid, payload, LitAPIStatus.OK, LoopResponseType.STREAMING
        )


class QueueLoop(LitLoop):
    """A LitLoop that gives the worker's queue to ``serve``, which runs until the worker stops."""

    def __call__(
        self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner
    ) -> None:
        self.serve(lit_api, WorkerQueue(self, request_queue, transport))

    def serve(self, lit_api: ls.LitAPI, queue: WorkerQueue) -> None:
        raise NotImplementedError

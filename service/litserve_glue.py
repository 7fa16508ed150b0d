"""Every use of LitServe beyond its documented API, in one place (litserve==0.2.19).

LitServe gives the process tree: the forked API servers, the spawned generation worker, the request
queue of each LitAPI (a manager queue) and a transport back to each API server, whose own task files
every reply into ``server.response_buffer``. Its routes and loops are not used (docs/architecture.md,
"Why this shape"): every public route is ours and the worker runs our loop. What that takes of
LitServe's internals is below; tests/test_litserve_glue.py pins each piece to the installed version,
so an upgrade that changes one fails there first.

Main process:  ``Server`` (says when it serves, stops on request, restarts a dead worker),
               ``build_litserver``.
API servers:   ``open_reply``, ``put_request``, ``next_reply`` (``WorkerLost``), ``close_reply``,
               ``consumer_id``.
Worker:        ``QueueLoop`` (LitServe calls it in the worker), ``WorkerQueue`` (take, reply).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty
from typing import Any

import litserve as ls
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

log = logging.getLogger(__name__)

LITSERVE_VERSION = "0.2.19"  # the version every use below was read against
ENGINE_PATH = "/_engine"  # LitServe needs a route for the LitAPI; build_litserver removes it
LITSERVE_HEALTH = "/_litserve/health"  # LitServe's own routes, moved out of the way, then removed
LITSERVE_INFO = "/_litserve/info"


# --- main process ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerExit:
    """A generation worker that died, as the main process saw it."""

    pid: int | None
    exitcode: int | None
    restarts: int  # restarts within the window, this one included
    giving_up: bool  # too many: the server stops instead of restarting it


class Server(ls.LitServer):
    """LitServer that says when it is serving, can be asked to stop from another thread, and heals a
    dead generation worker in place (``heal``).

    LitServe's own monitor either tears the whole tree down when a worker dies or (``restart_workers``)
    respawns it while requests in the API servers wait forever: it marks the buffers of the main
    process, not of the forked API servers. Ours respawns the worker and bumps ``worker_generation``,
    a counter in shared memory that every API server reads, so each one fails the requests the dead
    worker had (``next_reply`` raises ``WorkerLost``); ``worker_up`` is false until the new worker
    has loaded the model, so new requests get an early 503 meanwhile.
    """

    serving = False
    gave_up = False  # the monitor stopped the server after too many worker restarts

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fork = mp.get_context("fork")  # created before LitServe forks its API servers: shared with them
        self._generation = fork.Value("i", 0, lock=False)
        self._up = fork.Value("b", 0, lock=False)
        self.heal()

    def heal(
        self,
        max_restarts: int = 5,
        window_s: float = 600.0,
        poll_s: float = 0.2,
        on_exit: Callable[[WorkerExit], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Restart a dead worker at most ``max_restarts`` times within ``window_s`` seconds; one more
        death stops the server (``gave_up``). ``on_exit`` runs in the main process when a worker died,
        ``on_ready`` when its successor has loaded the model."""
        self.max_restarts, self.restart_window_s, self.monitor_poll_s = max_restarts, window_s, poll_s
        self.on_worker_exit, self.on_worker_ready = on_exit, on_ready

    def worker_generation(self) -> int:
        """Bumped each time a generation worker dies (readable in every API server)."""
        return self._generation.value

    def worker_up(self) -> bool:
        return bool(self._up.value)

    def verify_worker_status(self) -> None:
        super().verify_worker_status()
        self._up.value = 1
        self.serving = True  # next: LitServe starts the API servers and waits on its shutdown event

    def request_shutdown(self) -> None:
        try:
            self._shutdown_event.set()  # a manager proxy: this thread gets its own connection
        except Exception:  # the manager is already gone: shutdown is under way
            log.debug("shutdown event not reachable", exc_info=True)

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: Any) -> None:
        """Replaces LitServe's monitor (called by ``LitServer.run`` once the API servers run)."""
        threading.Thread(target=self._monitor, name="worker-monitor", daemon=True).start()

    def _monitor(self) -> None:
        deaths: deque[float] = deque()
        pending: dict[int, str] = {}  # index of a restarted worker -> its key in workers_setup_status
        try:
            while not self._shutdown_event.is_set():
                for idx, proc in enumerate(self.inference_workers):
                    if proc.is_alive():
                        continue
                    now = time.monotonic()
                    deaths.append(now)
                    while deaths and now - deaths[0] > self.restart_window_s:
                        deaths.popleft()
                    giving_up = len(deaths) > self.max_restarts
                    self._up.value = 0
                    self._generation.value += 1  # the API servers fail what the dead worker had
                    exit_ = WorkerExit(proc.pid, proc.exitcode, len(deaths), giving_up)
                    log.error(
                        "the generation worker (pid %s) died with exit code %s; %s",
                        proc.pid,
                        proc.exitcode,
                        f"more than {self.max_restarts} restarts in {self.restart_window_s:.0f} s: stopping"
                        if giving_up
                        else f"restarting it (restart {len(deaths)} of at most {self.max_restarts} "
                        f"in {self.restart_window_s:.0f} s)",
                    )
                    if self.on_worker_exit is not None:
                        self.on_worker_exit(exit_)
                    if giving_up:
                        self.gave_up = True
                        self.request_shutdown()
                        return
                    lit_api, worker_id = self._worker_of(idx)
                    self.inference_workers[idx] = self.launch_single_inference_worker(lit_api, worker_id)
                    pending[idx] = f"{lit_api.api_path.split('/')[-1]}_{worker_id}"
                for idx, key in list(pending.items()):
                    if self.workers_setup_status.get(key) == WorkerSetupStatus.READY:
                        del pending[idx]
                        if not pending:
                            self._up.value = 1
                            log.info("the generation worker is serving again")
                            if self.on_worker_ready is not None:
                                self.on_worker_ready()
                time.sleep(self.monitor_poll_s)
        except (EOFError, OSError, BrokenPipeError):  # the manager is gone: the server is stopping
            log.debug("worker monitor: manager gone", exc_info=True)
        except Exception:
            log.exception("worker monitor failed; stopping the server")
            self.gave_up = True
            self.request_shutdown()

    def _worker_of(self, idx: int) -> tuple[ls.LitAPI, int]:
        """The LitAPI and per-API worker id of ``inference_workers[idx]`` (LitServe lists them by API)."""
        for lit_api in self.litapi_connector:
            n = len(self._inference_workers_config_for_api(lit_api.api_path))
            if idx < n:
                return lit_api, idx
            idx -= n
        raise IndexError("worker index outside every API")


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


class WorkerLost(Exception):
    """The generation worker that had this request died before answering it."""


LOST_POLL_S = 0.25  # how often a waiting request checks that its worker still lives


async def next_reply(
    reply: Reply, remaining: Callable[[], float], lost: Callable[[], bool] = lambda: False
) -> tuple[Any, bool]:
    """The next item for this request as (data, ok); ok is False when LitServe itself reports a failure.

    Raises TimeoutError when ``remaining()`` seconds pass with nothing, WorkerLost when ``lost()``
    turns true first (what the dead worker sent before dying is still returned first).
    """
    queue = reply.item.response_queue
    while not queue:
        if lost():
            raise WorkerLost
        left = remaining()
        reply.item.event.clear()
        try:
            await asyncio.wait_for(reply.item.event.wait(), min(left, LOST_POLL_S))
        except TimeoutError:
            if left <= LOST_POLL_S:
                raise
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

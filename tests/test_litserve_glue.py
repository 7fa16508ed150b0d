"""Pins every LitServe internal that service/litserve_glue.py uses to the installed litserve.

An upgrade of litserve fails here first, naming the piece that changed; then reread the glue
module against the new version and change LITSERVE_VERSION with it.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import queue
import threading

import litserve as ls
import litserve.server
import pytest
from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, LitLoop, _BaseLoop
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, dump_exception

from service import litserve_glue as glue


class _Api(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, x):  # pragma: no cover - QueueLoop never calls it
        raise NotImplementedError


class _Transport:
    """What a LitServe transport offers the two ends: ``send`` in the worker, ``areceive`` in the API."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []

    def send(self, item, consumer_id: int) -> None:
        self.sent.append((item, consumer_id))

    async def areceive(self, consumer_id: int, timeout=None, block: bool = True):
        if self.sent:
            return self.sent.pop(0)[0]
        raise asyncio.CancelledError  # LitServe's reply task ends on this


def _server() -> glue.Server:
    api = _Api(**glue.engine_api_options(4, glue.QueueLoop()))
    return glue.build_litserver(api, {"accelerator": "cpu"}, timeout=30, graceful_timeout=5)


def test_the_installed_litserve_is_the_one_read() -> None:
    assert ls.__version__ == glue.LITSERVE_VERSION == "0.2.19"


def test_litserver_routes_are_where_the_glue_removes_them() -> None:
    api = _Api(**glue.engine_api_options(4, glue.QueueLoop()))
    plain = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=1,
        healthcheck_path=glue.LITSERVE_HEALTH,
        info_path=glue.LITSERVE_INFO,
    )
    paths = {getattr(r, "path", None) for r in plain.app.router.routes}
    assert {"/", glue.LITSERVE_HEALTH, glue.LITSERVE_INFO, glue.ENGINE_PATH} <= paths
    server = _server()
    left = {getattr(r, "path", None) for r in server.app.router.routes}
    assert not left & {"/", glue.LITSERVE_HEALTH, glue.LITSERVE_INFO, glue.ENGINE_PATH}
    assert server.uvicorn_graceful_timeout == 5 and server.lit_api.stream


def test_server_attributes_the_glue_reads() -> None:
    server = _server()
    assert server.response_buffer == {} and isinstance(server.response_buffer, dict)
    assert hasattr(server.app, "response_queue_id")  # set per API server before it forks
    assert server._shutdown_event is None  # a manager Event once run() started the workers
    assert callable(ls.LitServer.verify_worker_status)
    assert list(inspect.signature(ls.LitServer._get_request_queue).parameters) == ["self", "api_path"]
    # LitServe's own handlers queue the same item shape put_request does
    submit = inspect.getsource(litserve.server.BaseRequestHandler._submit_request)
    assert "request_queue.put((response_queue_id, uid, time.monotonic(), payload))" in submit

    server._shutdown_event = threading.Event()
    server.request_shutdown()
    assert server._shutdown_event.is_set()


def test_loop_and_response_shapes() -> None:
    call = inspect.signature(_BaseLoop.__call__).parameters
    ours = inspect.signature(glue.QueueLoop.__call__).parameters
    assert list(call) == list(ours)
    assert list(inspect.signature(LitLoop.put_response).parameters) == [
        "self",
        "transport",
        "response_queue_id",
        "uid",
        "response_data",
        "status",
        "response_type",
    ]
    assert _SENTINEL_VALUE == (None, None, None, None)
    assert LitAPIStatus.OK and LitAPIStatus.ERROR and LoopResponseType.STREAMING
    fields = inspect.signature(ResponseBufferItem).parameters
    assert {"event", "response_queue"} <= set(fields)


def test_a_job_goes_out_and_its_events_come_back_through_litserve_code() -> None:
    """API side -> request queue -> worker side -> transport -> LitServe's own reply task -> API side."""
    server = _server()
    server.litapi_request_queues[glue.ENGINE_PATH] = queue.Queue()  # run() makes a manager queue here
    served: list[glue.Incoming] = []

    class Loop(glue.QueueLoop):
        def serve(self, lit_api, q: glue.WorkerQueue) -> None:
            while True:
                try:
                    item = q.take(timeout=None)
                except glue.StopServing:
                    return
                if item is not None:
                    served.append(item)
                    q.reply(item.consumer, item.uid, {"echo": item.payload})

    async def scenario() -> tuple:
        reply = glue.open_reply(server)
        glue.put_request(server, 0, reply.uid, {"job": 1})
        server.litapi_request_queues[glue.ENGINE_PATH].put(_SENTINEL_VALUE)
        transport = _Transport()
        loop = Loop()
        loop(server.lit_api, "cpu", 0, server.litapi_request_queues[glue.ENGINE_PATH], transport, {}, None)
        assert [s.payload for s in served] == [{"job": 1}] and transport.sent[0][1] == 0
        await litserve.server.response_queue_to_buffer(
            transport, server.response_buffer, 0, server.litapi_connector
        )
        got = await glue.next_reply(reply, lambda: 1.0)
        closed = glue.close_reply(server, reply), glue.close_reply(server, reply)
        return got, closed

    got, closed = asyncio.run(scenario())
    assert got == ({"echo": {"job": 1}}, True)
    assert closed == (True, False)


def test_worker_queue_take() -> None:
    q: queue.Queue = queue.Queue()
    worker = glue.WorkerQueue(glue.QueueLoop(), q, _Transport())
    assert worker.take(timeout=None) is None
    assert worker.take(timeout=0.01) is None
    q.put((None, None, 0.0, {"cancel": "gen-1"}))
    assert worker.take(timeout=None) == glue.Incoming(None, None, {"cancel": "gen-1"})
    q.put(_SENTINEL_VALUE)
    with pytest.raises(glue.StopServing):
        worker.take(timeout=None)


def test_a_litserve_level_failure_is_described() -> None:
    assert glue.describe_failure(dump_exception(HTTPException(500, "boom"))) == (
        "the generation worker failed: boom"
    )
    assert glue.describe_failure(pickle.dumps(RuntimeError("bad"))) == "the generation worker failed: bad"
    assert glue.describe_failure(b"not a pickle") == "the generation worker failed"


def test_the_worker_monitor_replaces_litserves_with_the_internals_it_uses() -> None:
    """``Server._start_worker_monitoring`` replaces LitServe's; the restart uses these internals."""
    run = inspect.getsource(ls.LitServer.run)
    assert "self._start_worker_monitoring(manager, uvicorn_workers)" in run
    assert "self.inference_workers" in run and "self._monitor_workers" in run
    assert list(inspect.signature(ls.LitServer._start_worker_monitoring).parameters) == [
        "self",
        "manager",
        "uvicorn_workers",
    ]
    assert list(inspect.signature(ls.LitServer.launch_single_inference_worker).parameters) == [
        "self",
        "lit_api",
        "worker_id",
    ]
    launch = inspect.getsource(ls.LitServer.launch_single_inference_worker)
    assert 'self.workers_setup_status[f"{endpoint}_{worker_id}"]' in launch
    assert 'endpoint = lit_api.api_path.split("/")[-1]' in launch
    worker = inspect.getsource(litserve.loops.loops.inference_worker)
    assert "WorkerSetupStatus.READY" in worker
    server = _server()
    assert server._monitor_workers is True
    assert server._worker_of(0) == (server.lit_api, 0)
    with pytest.raises(IndexError):
        server._worker_of(1)
    assert server.worker_generation() == 0 and not server.worker_up()


def test_next_reply_raises_worker_lost_after_what_the_worker_sent() -> None:
    server = _server()

    async def scenario() -> tuple:
        reply = glue.open_reply(server)
        reply.item.response_queue.append(({"id": "x"}, LitAPIStatus.OK))
        first = await glue.next_reply(reply, lambda: 5.0, lambda: True)  # sent before the worker died
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(glue.WorkerLost):
            await glue.next_reply(reply, lambda: 5.0, lambda: True)
        lost_after = asyncio.get_running_loop().time() - t0
        end = asyncio.get_running_loop().time() + 0.6
        with pytest.raises(TimeoutError):  # a deadline longer than one poll still ends
            await glue.next_reply(reply, lambda: max(0.0, end - asyncio.get_running_loop().time()))
        return first, lost_after

    first, lost_after = asyncio.run(scenario())
    assert first == ({"id": "x"}, True) and lost_after < 0.1

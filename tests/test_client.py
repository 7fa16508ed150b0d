"""The Python client's own behaviour, against ``httpx.MockTransport`` handlers standing in for the server:
retries and backoff, Retry-After, idempotency keys, error mapping, request bodies, SSE parsing, waiting on
jobs.
The end-to-end tests against the real server are in test_client_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import loraserve_client as lc
import pytest
from loraserve_client import _core, _exceptions, cli

FAST = lc.RetryPolicy(max_retries=2, initial_delay=0.001, max_delay=0.002)


def envelope(status: int, code: str, message: str, param: str | None = None, headers=None) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "param": param, "type": "x"}}
    return httpx.Response(status, json=body, headers=headers)


class Recorder:
    """A MockTransport handler that answers from a script (responses, or exceptions to raise) and keeps the
    requests it saw."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, **kw) -> lc.Client:
        kw.setdefault("retries", FAST)
        return lc.Client("http://server.test", transport=httpx.MockTransport(self), **kw)

    def async_client(self, **kw) -> lc.AsyncClient:
        kw.setdefault("retries", FAST)
        return lc.AsyncClient("http://server.test", transport=httpx.MockTransport(self), **kw)


GEN = {
    "id": "gen-1",
    "text": "Arr",
    "adapter": "pirate",
    "finish_reason": "eos",
    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
}


def job_json(status="queued", step=None, total=None, loss=None, error=None, job_id="job-1"):
    progress = None if step is None else {"step": step, "total_steps": total, "epoch": 0.5, "loss": loss}
    return {
        "job_id": job_id,
        "adapter": "pirate",
        "status": status,
        "error": error,
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "progress": progress,
    }


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "status,cls",
    [
        (400, lc.BadRequestError),
        (422, lc.BadRequestError),
        (401, lc.AuthenticationError),
        (404, lc.NotFoundError),
        (409, lc.ConflictError),
        (413, lc.PayloadTooLargeError),
        (429, lc.OverloadedError),
        (503, lc.OverloadedError),
        (500, lc.APIStatusError),
    ],
)
def test_status_maps_to_exception_with_envelope(status, cls):
    rec = Recorder(envelope(status, "some_code", "what went wrong", "data[3]"))
    with rec.client(retries=0) as client, pytest.raises(cls) as info:
        client.adapters.get("pirate")
    err = info.value
    assert type(err) is cls
    assert (err.status_code, err.code, err.message, err.param) == (
        status,
        "some_code",
        "what went wrong",
        "data[3]",
    )
    assert str(err) == f"{status} some_code: what went wrong (param: data[3])"
    assert isinstance(err, lc.LoraserveError)


def test_error_without_envelope_keeps_the_body_text():
    rec = Recorder(
        httpx.Response(502, text="<html>bad gateway</html>"), httpx.Response(404, json={"detail": "nope"})
    )
    with rec.client(retries=0) as client:
        with pytest.raises(lc.APIStatusError) as info:
            client.health()
        assert (
            info.value.status_code == 502 and "bad gateway" in info.value.message and info.value.code is None
        )
        with pytest.raises(lc.NotFoundError, match="nope"):
            client.health()


def test_connection_refused_is_a_connection_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        lc.Client(f"http://127.0.0.1:{port}", retries=0) as client,
        pytest.raises(lc.APIConnectionError) as info,
    ):
        client.health()
    assert not isinstance(info.value, lc.APITimeoutError)
    assert info.value.sent is False
    assert f"cannot connect to http://127.0.0.1:{port}" in str(info.value)


def test_timeout_is_an_api_timeout_error():
    rec = Recorder(httpx.ReadTimeout("slow"))
    with rec.client(retries=0) as client, pytest.raises(lc.APITimeoutError, match="read timed out"):
        client.generate("hi")
    assert isinstance(lc.APITimeoutError("x"), lc.APIConnectionError)


# ---------------------------------------------------------------- configuration


def test_env_url_and_api_key_become_bearer_header(monkeypatch):
    monkeypatch.setenv("LORASERVE_URL", "http://from-env.test:9000/")
    monkeypatch.setenv("LORASERVE_API_KEY", "sekret")
    rec = Recorder(httpx.Response(200, json={"status": "ok"}))
    with lc.Client(transport=httpx.MockTransport(rec)) as client:
        assert client.health() == {"status": "ok"}
    req = rec.requests[0]
    assert str(req.url) == "http://from-env.test:9000/health"
    assert req.headers["authorization"] == "Bearer sekret"


def test_defaults_without_env(monkeypatch):
    monkeypatch.delenv("LORASERVE_URL", raising=False)
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    rec = Recorder(httpx.Response(200, json={"status": "ok"}))
    with lc.Client(transport=httpx.MockTransport(rec)) as client:
        client.health()
        assert client.timeout == httpx.Timeout(60, connect=5)
    assert str(rec.requests[0].url) == "http://127.0.0.1:8000/health"
    assert "authorization" not in rec.requests[0].headers


def test_bad_base_url_and_bad_names_are_refused_before_sending():
    with pytest.raises(ValueError, match="http"):
        lc.Client("127.0.0.1:8000")
    rec = Recorder(httpx.Response(200, json={}))
    with rec.client() as client:
        for name in ("", "..", "a/b"):
            with pytest.raises(ValueError, match="invalid adapter name"):
                client.adapters.get(name)
    assert rec.requests == []


# ---------------------------------------------------------------- retries


def test_backoff_is_exponential_capped_and_jittered():
    policy = lc.RetryPolicy()
    for attempt, (lo, hi) in enumerate([(0.375, 0.5), (0.75, 1), (1.5, 2), (3, 4), (6, 8), (6, 8)]):
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(lo <= d <= hi for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > (hi - lo) / 4  # jittered, not constant


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried_then_succeed(status, caplog):
    rec = Recorder(
        envelope(status, "busy", "try later"),
        envelope(status, "busy", "try later"),
        httpx.Response(200, json=GEN),
    )
    with caplog.at_level(logging.INFO, "loraserve_client"), rec.client() as client:
        assert client.generate("hi").text == "Arr"
    assert len(rec.requests) == 3
    assert [r.getMessage().split("; ")[1].split(" in ")[0] for r in caplog.records] == ["retry 1", "retry 2"]


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422, 500])
def test_other_statuses_are_not_retried(status):
    rec = Recorder(envelope(status, "no", "no"), httpx.Response(200, json=GEN))
    with rec.client() as client, pytest.raises(lc.APIStatusError):
        client.generate("hi")
    assert len(rec.requests) == 1


def test_retries_run_out_and_raise_the_last_error():
    rec = Recorder(envelope(503, "overloaded", "queue full", headers={"Retry-After": "0"}))
    policy = lc.RetryPolicy(max_retries=3, initial_delay=0.001)
    with rec.client(retries=policy) as client, pytest.raises(lc.OverloadedError) as info:
        client.generate("hi")
    assert len(rec.requests) == 4
    assert info.value.retry_after == 0.0 and info.value.code == "overloaded"


def test_retry_after_seconds_is_honoured():
    rec = Recorder(
        envelope(503, "overloaded", "queue full", headers={"Retry-After": "1"}), httpx.Response(200, json=GEN)
    )
    # The backoff alone would wait at most 2 ms: a wait of a second can only come from Retry-After.
    with rec.client() as client:
        start = time.monotonic()
        client.generate("hi")
        elapsed = time.monotonic() - start
    assert len(rec.requests) == 2
    assert 0.95 <= elapsed < 3, elapsed


def test_retry_after_http_date_and_too_long_waits():
    when = datetime.now(UTC) + timedelta(seconds=30)
    assert (
        25
        < _exceptions.parse_retry_after(httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)}))
        <= 30
    )
    assert _exceptions.parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    # Longer than max_retry_after: raised at once, with the server's wait on the error, instead of sleeping.
    rec = Recorder(envelope(429, "rate_limited", "slow down", headers={"Retry-After": "600"}))
    with rec.client() as client, pytest.raises(lc.OverloadedError) as info:
        client.generate("hi")
    assert len(rec.requests) == 1 and info.value.retry_after == 600


def test_connection_errors_are_retried():
    rec = Recorder(httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.Response(200, json=GEN))
    with rec.client() as client:
        assert client.generate("hi").text == "Arr"
    assert len(rec.requests) == 3
    rec = Recorder(httpx.ConnectError("refused"))
    with rec.client() as client, pytest.raises(lc.APIConnectionError, match="refused"):
        client.generate("hi")
    assert len(rec.requests) == 3


# ---------------------------------------------------------------- idempotency


def test_train_retries_reuse_one_idempotency_key_per_call():
    accepted = httpx.Response(202, json={"job_id": "job-1", "status": "queued"})
    rec = Recorder(httpx.ReadTimeout("lost answer"), envelope(502, "bad_gateway", "proxy"), accepted)
    with rec.client() as client:
        job = client.train("pirate", data=[{"prompt": "a", "response": "b"}])
        assert job.id == "job-1" and job.status == "queued"
        keys = [r.headers["idempotency-key"] for r in rec.requests]
        assert len(keys) == 3 and len(set(keys)) == 1 and len(keys[0]) > 20
        client.train("pirate", data=[{"prompt": "a", "response": "b"}])
        assert rec.requests[-1].headers["idempotency-key"] != keys[0]
    body = json.loads(rec.requests[0].content)
    assert body == {"adapter": "pirate", "overwrite": False, "data": [{"prompt": "a", "response": "b"}]}


def test_dataset_upload_is_repeated_only_when_the_server_did_nothing():
    ok = httpx.Response(201, json={"dataset": "ds-1", "rows": 1})
    for failure, retried in [
        (httpx.ConnectError("refused"), True),
        (envelope(503, "overloaded", "busy"), True),
        (envelope(429, "rate", "busy"), True),
        (httpx.ReadTimeout("lost"), False),
        (httpx.ReadError("reset"), False),
        (envelope(502, "gw", "proxy"), False),
    ]:
        rec = Recorder(failure, ok)
        with rec.client() as client:
            if retried:
                assert client.datasets.upload([{"text": "x"}]).dataset == "ds-1"
            else:
                with pytest.raises(lc.LoraserveError):
                    client.datasets.upload([{"text": "x"}])
        assert len(rec.requests) == (2 if retried else 1), failure


# ---------------------------------------------------------------- requests and responses


def test_generate_sends_only_what_was_set():
    rec = Recorder(httpx.Response(200, json=GEN))
    with rec.client() as client:
        gen = client.generate("Hi", "pirate", max_new_tokens=8, temperature=0.0, stop="\n", seed=None)
        client.generate("Hi", raw=True, top_k=0)
        with pytest.raises(TypeError, match="max_tokens"):
            client.generate("Hi", max_tokens=3)
    assert json.loads(rec.requests[0].content) == {
        "prompt": "Hi",
        "adapter": "pirate",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    assert json.loads(rec.requests[1].content) == {"prompt": "Hi", "adapter": None, "top_k": 0, "raw": True}
    assert isinstance(gen, lc.Generation) and gen.usage.total_tokens == 7 and gen.finish_reason == "eos"


def test_generate_sends_a_composition_as_the_adapters_list():
    composed = {
        **GEN,
        "adapter": None,
        "adapters": [{"name": "a", "weight": 0.6}, {"name": "b", "weight": -0.4}],
    }
    rec = Recorder(httpx.Response(200, json=composed))
    with rec.client() as client:
        gen = client.generate("Hi", adapters={"a": 0.6, "b": -0.4}, temperature=0)
    assert json.loads(rec.requests[0].content) == {
        "prompt": "Hi",
        "adapter": None,
        "adapters": [{"name": "a", "weight": 0.6}, {"name": "b", "weight": -0.4}],
        "temperature": 0,
    }
    assert gen.adapters == composed["adapters"]


SSE = (
    ": keep-alive\n\n"
    'data: {"id": "gen-1", "text": "Ar", "finish_reason": null}\n\n'
    'event: message\ndata: {"id": "gen-1", "text": "r!", "finish_reason": null}\n\n'
    'data: {"id": "gen-1", "text": "", "finish_reason": "stop",'
    ' "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
    "data: [DONE]\n\n"
)


def test_stream_yields_text_deltas_until_done():
    rec = Recorder(
        envelope(503, "overloaded", "busy"),
        httpx.Response(200, text=SSE, headers={"content-type": "text/event-stream"}),
    )
    with rec.client() as client:
        with client.stream("Hi", "pirate", max_new_tokens=4) as stream:
            deltas = list(stream)
        assert deltas == ["Ar", "r!"]
        assert (stream.text, stream.finish_reason, stream.usage.completion_tokens) == ("Arr!", "stop", 2)
    assert json.loads(rec.requests[-1].content)["stream"] is True and len(rec.requests) == 2


def test_stream_keeps_the_prompt_logprobs_of_the_first_event():
    first = {
        "id": "gen-1",
        "text": "Ar",
        "finish_reason": None,
        "prompt_logprobs": [
            {"id": 17, "text": "Hi", "logprob": None, "top": []},
            {"id": 5, "text": "!", "logprob": -1.5, "top": [{"id": 5, "text": "!", "logprob": -1.5}]},
        ],
    }
    sse = f"data: {json.dumps(first)}\n\n" + SSE.split("\n\n", 2)[2]
    rec = Recorder(httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"}))
    with rec.client() as client, client.stream("Hi!", prompt_logprobs=1) as stream:
        assert list(stream) == ["Ar", "r!"]
    assert [(t.id, t.logprob) for t in stream.prompt_logprobs] == [(17, None), (5, -1.5)]
    assert stream.prompt_logprobs[1].top[0].logprob == -1.5
    assert json.loads(rec.requests[-1].content)["prompt_logprobs"] == 1


def test_stream_errors_raise_the_envelope():
    rec = Recorder(envelope(404, "adapter_not_found", "adapter 'x' does not exist", "adapter"))
    with rec.client() as client, pytest.raises(lc.NotFoundError, match="does not exist"):
        list(client.stream("Hi", "x"))
    mid = 'data: {"text": "a"}\n\ndata: {"error": {"code": "internal", "message": "worker died"}}\n\n'
    rec = Recorder(httpx.Response(200, text=mid))
    with rec.client() as client:
        got = []
        with pytest.raises(lc.APIStatusError, match="worker died"):
            for delta in client.stream("Hi"):
                got.append(delta)
        assert got == ["a"]


def test_sse_decoder_joins_multiline_data_and_flushes_at_the_end():
    dec = _core.SSEDecoder()
    assert [dec.feed(x) for x in ["data: a", "data: b", "id: 3", ""]] == [None, None, None, "a\nb"]
    assert dec.feed("data:c") is None and dec.flush() == "c" and dec.flush() is None


def test_adapter_upload_sends_the_peft_folder_and_its_template(tmp_path: Path):
    folder = tmp_path / "pirate"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights\xff")
    (folder / "loraserve.json").write_text(
        json.dumps({"template": {"prompt": "Q: {prompt}\nA:"}, "format": 1})
    )
    info = {"name": "pirate", "rank": 8, "alpha": 16, "target_modules": ["c_attn"], "loaded": False}
    rec = Recorder(envelope(503, "busy", "busy"), httpx.Response(201, json=info))
    with rec.client() as client:
        result = client.adapters.upload("pirate", folder)
    assert isinstance(result, lc.AdapterInfo) and result.rank == 8
    first, second = rec.requests
    assert first.method == "PUT" and first.url.path == "/adapters/pirate"
    boundary = second.headers["content-type"].split("boundary=")[1].encode()
    resent = second.content.replace(boundary, first.headers["content-type"].split("boundary=")[1].encode())
    assert first.content == resent  # the retry sent the whole body again
    body = second.content
    assert second.headers["content-type"].startswith("multipart/form-data")
    assert b'name="adapter_config"; filename="adapter_config.json"' in body and b'{"r": 8}' in body
    assert (
        b'name="adapter_model"; filename="adapter_model.safetensors"' in body and b"\x00weights\xff" in body
    )
    assert b'name="template"' in body and b'{"prompt": "Q: {prompt}\\nA:"}' in body
    (folder / "adapter_model.safetensors").unlink()
    with rec.client() as client, pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.adapters.upload("pirate", folder)


def test_datasets_and_train_from_a_path(tmp_path: Path):
    rows = [{"prompt": "a", "response": "b"}, {"text": "ü"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(rows))
    rec = Recorder(httpx.Response(201, json={"dataset": "ds-9", "rows": 2}))
    with rec.client() as client:
        for source in (rows, jsonl, str(as_list)):
            assert client.datasets.upload(source).id == "ds-9"
    assert {r.content for r in rec.requests} == {jsonl.read_bytes()}
    assert rec.requests[0].headers["content-type"] == "application/x-ndjson"

    rec = Recorder(
        httpx.Response(201, json={"dataset": "ds-9", "rows": 2}),
        httpx.Response(202, json={"job_id": "job-7", "status": "queued"}),
    )
    with rec.client() as client:
        job = client.train("pirate", jsonl, config={"training": {"num_train_epochs": 5}}, overwrite=True)
        with pytest.raises(ValueError, match="exactly one"):
            client.train("pirate")
        with pytest.raises(ValueError, match="exactly one"):
            client.train("pirate", rows, dataset="ds-1")
    assert job.id == "job-7"
    assert [r.url.path for r in rec.requests] == ["/datasets", "/train"]
    assert json.loads(rec.requests[1].content) == {
        "adapter": "pirate",
        "overwrite": True,
        "dataset": "ds-9",
        "config": {"training": {"num_train_epochs": 5}},
    }


def test_train_with_validation_rows_a_path_or_a_dataset(tmp_path: Path):
    rows = [{"prompt": "a", "response": "b"}]
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "c", "response": "d"}) + "\n")
    uploaded = httpx.Response(201, json={"dataset": "ds-val", "rows": 1})
    queued = httpx.Response(202, json={"job_id": "job-7", "status": "queued"})
    rec = Recorder(uploaded, queued, queued, queued)
    with rec.client() as client:
        client.train("pirate", rows, validation=val)  # a path is uploaded first, like data
        client.train("pirate", rows, validation=[{"prompt": "c", "response": "d"}])
        client.train("pirate", dataset="ds-1", validation_dataset="ds-2")
        with pytest.raises(ValueError, match="at most one of validation="):
            client.train("pirate", rows, validation=rows, validation_dataset="ds-2")
    assert [r.url.path for r in rec.requests] == ["/datasets", "/train", "/train", "/train"]
    assert rec.requests[0].content == val.read_bytes()
    bodies = [json.loads(r.content) for r in rec.requests[1:]]
    assert bodies[0] == {
        "adapter": "pirate",
        "overwrite": False,
        "data": rows,
        "validation_dataset": "ds-val",
    }
    assert bodies[1]["validation_data"] == [{"prompt": "c", "response": "d"}]
    assert "validation_dataset" not in bodies[1]
    assert bodies[2] == {
        "adapter": "pirate",
        "overwrite": False,
        "dataset": "ds-1",
        "validation_dataset": "ds-2",
    }

    async def main():
        rec = Recorder(
            httpx.Response(201, json={"dataset": "ds-val", "rows": 1}),
            httpx.Response(202, json={"job_id": "job-8", "status": "queued"}),
        )
        async with rec.async_client() as client:
            await client.train("pirate", rows, validation=str(val))
        assert [r.url.path for r in rec.requests] == ["/datasets", "/train"]
        assert json.loads(rec.requests[1].content)["validation_dataset"] == "ds-val"

    asyncio.run(main())


def test_job_endpoints():
    def handler(request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if path == "/train" and method == "GET":
            return httpx.Response(200, json={"jobs": [job_json("running", 1, 4, 2.5)]})
        if path == "/train/job-1" and method == "DELETE":
            return httpx.Response(200, json=job_json("cancelled"))
        if path in ("/train/job-1/pause", "/train/job-1/resume") and method == "POST":
            return httpx.Response(200, json=job_json("paused" if path.endswith("pause") else "queued"))
        if path == "/train/job-1/logs":
            return httpx.Response(200, text="step 1 loss 2.5\n")
        return envelope(404, "job_not_found", f"no job at {path}", "job_id")

    rec = Recorder(handler)
    with rec.client() as client:
        jobs = client.jobs.list(status="running")
        assert jobs[0].progress.total_steps == 4 and jobs[0].created_at.year == 2026 and not jobs[0].done
        assert client.jobs.cancel("job-1").status == "cancelled"
        assert client.jobs.pause("job-1").status == "paused" and not client.jobs.pause("job-1").done
        assert client.jobs.resume("job-1").status == "queued"
        assert client.jobs.logs("job-1") == "step 1 loss 2.5\n"
        with pytest.raises(lc.NotFoundError) as info:
            client.jobs.get("job 2")
        assert info.value.param == "job_id"
    assert rec.requests[0].url.params["status"] == "running"
    assert rec.requests[-1].url.raw_path == b"/train/job%202"


# ---------------------------------------------------------------- waiting and events


def scripted_job(*states):
    return Recorder(
        httpx.Response(202, json={"job_id": "job-1", "status": "queued"}),
        *[httpx.Response(200, json=s) for s in states],
    )


RUN = [
    job_json("queued"),
    job_json("running", 1, 3, 2.0),
    job_json("running", 2, 3, 1.5),
    job_json("succeeded", 3, 3, 1.0),
]


def test_wait_follows_the_job_to_the_end():
    rec = scripted_job(*RUN)
    seen = []
    with rec.client() as client:
        job = client.train("pirate", data=[{"text": "x"}])
        final = job.wait(progress=seen.append, poll_interval=0.001)
    assert final.status == "succeeded" and job.job is final and job.status == "succeeded"
    assert [(j.status, j.progress and j.progress.step) for j in seen] == [
        ("queued", None),
        ("running", 1),
        ("running", 2),
        ("succeeded", 3),
    ]


def test_wait_prints_a_plain_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    rec = scripted_job(*RUN)
    with rec.client() as client:
        client.train("pirate", data=[{"text": "x"}]).wait(progress=True, poll_interval=0.001)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "pirate [job-1] queued"
    assert lines[2] == "pirate [job-1] running step 2/3 epoch 0.50 loss 1.5000"
    assert lines[-1].startswith("pirate [job-1] succeeded step 3/3")


def test_wait_draws_a_tqdm_bar(capsys):
    pytest.importorskip("tqdm")
    rec = scripted_job(*RUN)
    with rec.client() as client:
        client.train("pirate", data=[{"text": "x"}]).wait(progress=True, poll_interval=0.001)
    err = capsys.readouterr().err
    assert "train pirate" in err and "3/3" in err and "succeeded" in err


def test_wait_raises_on_failure_and_timeout():
    rec = scripted_job(job_json("running", 1, 3), job_json("failed", 1, 3, error="loss is NaN"))
    with rec.client() as client:
        job = client.train("pirate", data=[{"text": "x"}])
        with pytest.raises(lc.JobFailedError, match="loss is NaN") as info:
            job.wait(progress=False, poll_interval=0.001)
        assert info.value.job.status == "failed" and job.status == "failed"
        assert job.wait(progress=False, check=False).status == "failed"
    rec = scripted_job(job_json("running", 1, 3))
    with rec.client() as client:
        job = client.train("pirate", data=[{"text": "x"}])
        start = time.monotonic()
        with pytest.raises(lc.JobTimeoutError):
            job.wait(progress=False, timeout=0.2, poll_interval=0.05)
        assert 0.15 < time.monotonic() - start < 2


def test_wait_rides_out_a_server_restart_but_not_a_long_outage():
    # Each poll fails once (no retries in the client), as while a server restarts: wait keeps polling.
    queued = httpx.Response(202, json={"job_id": "job-1", "status": "queued"})
    down = httpx.ConnectError("refused")
    states = [job_json("running", 1, 3), job_json("running", 2, 3), job_json("succeeded", 3, 3)]
    running, later, done = (httpx.Response(200, json=x) for x in states)
    rec = Recorder(queued, running, down, down, envelope(503, "starting", "model loading"), later, done)
    with rec.client(retries=0) as client:
        job = client.train("pirate", data=[{"text": "x"}])
        assert job.wait(progress=False, poll_interval=0.001).status == "succeeded"
    assert len(rec.requests) == 7
    rec = Recorder(queued, running, down)
    with rec.client(retries=0) as client:
        job = client.train("pirate", data=[{"text": "x"}])
        with pytest.raises(lc.APIConnectionError):
            job.wait(progress=False, poll_interval=0.01, reconnect_for=0.1)
        assert job.status == "running"
    # A client error is not an outage: raised at once.
    rec = Recorder(queued, envelope(404, "job_not_found", "gone", "job_id"))
    with rec.client() as client, pytest.raises(lc.NotFoundError):
        client.train("pirate", data=[{"text": "x"}]).wait(progress=False)
    assert len(rec.requests) == 2


def test_events_yield_progress_until_the_stream_ends():
    lines = [
        {**job_json("running", 0, 2), "event": "status"},
        {**job_json("running", 1, 2, 2.0), "event": "step"},
        {**job_json("succeeded", 2, 2, 1.0), "event": "status"},
    ]
    body = ": ping\n\n" + "".join(f"id: {i}\ndata: {json.dumps(x)}\n\n" for i, x in enumerate(lines))
    rec = Recorder(
        httpx.Response(202, json={"job_id": "job-1", "status": "queued"}), httpx.Response(200, text=body)
    )
    with rec.client() as client:
        events = list(client.train("pirate", data=[{"text": "x"}]).events())
    assert [(e.event, e.status, e.progress.step) for e in events] == [
        ("status", "running", 0),
        ("step", "running", 1),
        ("status", "succeeded", 2),
    ]
    assert isinstance(events[1], lc.JobEvent) and events[1].progress.loss == 2.0 and events[-1].done
    assert rec.requests[-1].url.path == "/train/job-1/events"


def test_client_models_read_every_field_the_server_sends():
    """The client mirrors the server's wire models (it never imports the service): a field the server adds
    or renames shows up here."""
    schemas = pytest.importorskip("service.schemas")
    routes = pytest.importorskip("service.routes.jobs")
    from service.jobs.model import Job as StoredJob

    pairs = [
        (lc.Generation, schemas.GenerateResponse),
        (lc.Usage, schemas.Usage),
        (lc.AdapterInfo, schemas.AdapterInfo),
        (lc.GeneratedToken, schemas.GeneratedToken),
        (lc.TopToken, schemas.TopToken),
    ]
    for ours, theirs in pairs:
        assert set(theirs.model_fields) <= set(ours.model_fields), (ours.__name__, set(theirs.model_fields))
    chunk_fields = set(schemas.GenerateChunk.model_fields)
    streamed = {"id", "text", "adapter", "finish_reason", "usage", "tokens", "prompt_logprobs"}
    assert chunk_fields <= streamed, chunk_fields
    sent = routes.job_json(StoredJob(id="job-1", adapter="pirate", status="running", progress={"step": 3}))
    assert set(sent) == set(lc.Job.model_fields)
    assert set(sent["progress"]) == set(lc.JobProgress.model_fields)
    job = lc.Job.model_validate(sent)
    assert job.progress.step == 3 and job.created_at.year == 1970


# ---------------------------------------------------------------- async


def test_async_client_shares_the_behaviour():
    async def main():
        rec = Recorder(envelope(503, "busy", "busy"), httpx.Response(200, json=GEN))
        async with rec.async_client() as client:
            assert (await client.generate("hi", "pirate")).text == "Arr"
        assert len(rec.requests) == 2

        rec = Recorder(
            httpx.ReadTimeout("lost"),
            httpx.Response(202, json={"job_id": "job-1", "status": "queued"}),
            *[httpx.Response(200, json=s) for s in RUN],
        )
        seen = []
        async with rec.async_client() as client:
            job = await client.train("pirate", data=[{"text": "x"}])
            assert (await job.wait(progress=seen.append, poll_interval=0.001)).status == "succeeded"
        assert rec.requests[0].headers["idempotency-key"] == rec.requests[1].headers["idempotency-key"]
        assert len(seen) == 4

        rec = Recorder(httpx.Response(200, text=SSE))
        async with rec.async_client() as client:
            stream = client.stream("Hi")
            assert [d async for d in stream] == ["Ar", "r!"] and stream.finish_reason == "stop"

        rec = Recorder(envelope(409, "adapter_exists", "adapter 'pirate' exists", "adapter"))
        async with rec.async_client() as client:
            with pytest.raises(lc.ConflictError, match="exists"):
                await client.train("pirate", data=[{"text": "x"}])

    asyncio.run(main())


# ---------------------------------------------------------------- CLI


def test_cli_set_overrides_build_a_nested_config(tmp_path: Path):
    base = tmp_path / "c.json"
    base.write_text(json.dumps({"lora": {"r": 8}}))
    config = cli.load_config(
        base,
        [
            "training.num_train_epochs=5",
            "training.learning_rate=5e-4",
            "lora.r=4",
            "training.fp16=false",
            "model.name=distilgpt2",
        ],
    )
    assert config == {
        "lora": {"r": 4},
        "model": {"name": "distilgpt2"},
        "training": {"num_train_epochs": 5, "learning_rate": 5e-4, "fp16": False},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.load_config(None, ["training.num_train_epochs"])


def test_cli_api_error_is_one_line_and_exit_1(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["--url", f"http://127.0.0.1:{port}", "adapters", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraserve: error: cannot connect to")
    assert cli.main(["train", "missing.jsonl", "--adapter", "x", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "data.jsonl"])  # --adapter is required
    assert info.value.code == 2

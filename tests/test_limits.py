"""Request-body limits and body encoding against the real server on loopback (one server, with a key).

``max_request_bytes`` caps every route without a cap of its own (``/generate``, ``/v1/*``): a
declared ``Content-Length`` over it is refused before any of the body is read, a chunked body as soon
as it passes the cap (checked on a raw socket that never finishes the body), a body of exactly the
cap is served. The routes with their own, larger caps (adapter uploads, ``/datasets``, ``/train``)
keep them. Bodies that are not UTF-8, or nested too deeply, get the envelope naming the problem.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.gateway import ModelLimits
from service.settings import Settings
from testing.server import Server, running_server
from testing.weights import lora_files, upload_files

KEY = "limits-" + "5b7e1c9d" * 3
CAP = 64 * 1024  # max_request_bytes of the test server
OWN_CAP = 256 * 1024  # max_upload_bytes and max_dataset_bytes of the test server
HUGE = 50 * 1024 * 1024
JSON_HDR = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def srv(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("limits")
    args = ["--max-upload-bytes", str(OWN_CAP), "--default-max-new-tokens", "2", "--request-timeout", "30"]
    env = {"LORASERVE_MAX_REQUEST_BYTES": str(CAP), "LORASERVE_MAX_DATASET_BYTES": str(OWN_CAP)}
    with running_server(tiny_base, root / "adapters", root / "data", api_key=KEY, env=env, args=args) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: Server) -> Iterator[httpx.Client]:
    with srv.client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def error_of(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "param", "type"} <= set(body["error"]), body
    assert body["error"]["code"] and body["error"]["message"], body
    return body["error"]


def padded(body: dict, size: int) -> bytes:
    """``body`` as JSON, padded with whitespace (still valid JSON) to exactly ``size`` bytes."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def bodies(model: str) -> dict[str, dict]:
    """A small valid body for each JSON generation route."""
    return {
        "/generate": {"prompt": "Hello", "max_new_tokens": 2},
        "/v1/completions": {"model": model, "prompt": "Hello", "max_tokens": 2},
        "/v1/chat/completions": {
            "model": model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 2,
        },
    }


def raw_exchange(
    srv: Server, head: str, parts: list[bytes], timeout: float = 10.0
) -> tuple[int, dict, float]:
    """Send a request head and some body bytes on a raw socket, never finishing the body; return the
    status, the JSON answer and the seconds from the last byte sent to the whole answer."""
    url = urlsplit(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        for part in parts:
            sock.sendall(part)
        t0 = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {data!r}"
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", header).group(1))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-answer: {header!r}"
            rest += chunk
        took = time.monotonic() - t0
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(rest[:length]), took


def request_head(path: str, framing: str, key: str | None = KEY) -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}{framing}\r\n"


def requests_counted(client: httpx.Client, endpoint: str, status: int) -> float:
    pattern = re.compile(
        rf'^loraserve_requests_total\{{(?=[^}}]*endpoint="{re.escape(endpoint)}")'
        rf'(?=[^}}]*status="{status}")[^}}]*\}} (\S+)$',
        re.M,
    )
    return sum(float(m.group(1)) for m in pattern.finditer(client.get("/metrics").text))


# --- the default ------------------------------------------------------------------------------------


def test_default_cap_is_far_above_the_longest_prompt_that_fits() -> None:
    """distilgpt2's context (1024 tokens) of GPT-2's longest tokens, every byte escaped as \\uXXXX."""
    from trainer.model import gpt2_tokenizer

    limits = ModelLimits(context=1024, tokenizer=gpt2_tokenizer())
    worst_json = 6 * limits.context * limits.max_token_chars  # a token spells each byte as one char
    default = Settings.model_fields["max_request_bytes"].default
    assert default >= 4 * worst_json, (default, worst_json)
    assert default <= 16 * 1024 * 1024  # still "a few MiB": the cap exists to refuse early


# --- the cap ----------------------------------------------------------------------------------------


def test_bodies_over_the_cap_get_413_naming_the_limit(client: httpx.Client, model_id: str) -> None:
    before = requests_counted(client, "/generate", 413)
    for path, body in bodies(model_id).items():
        t0 = time.monotonic()
        r = client.post(path, content=padded(body, HUGE), headers=JSON_HDR)  # with Content-Length
        took = time.monotonic() - t0
        err = error_of(r, 413)
        assert err["code"] == "payload_too_large", err
        assert str(CAP) in err["message"] and "max_request_bytes" in err["message"], err
        assert took < 10, f"{path}: a 50 MiB body took {took:.1f} s to refuse"
        # One byte over the cap, and exactly the cap.
        err = error_of(client.post(path, content=padded(body, CAP + 1), headers=JSON_HDR), 413)
        assert f"is {CAP + 1} bytes" in err["message"], err
        r = client.post(path, content=padded(body, CAP), headers=JSON_HDR)
        assert r.status_code == 200, (path, r.text[:300])
    assert requests_counted(client, "/generate", 413) == before + 2  # counted under its route


def test_the_cap_applies_as_the_body_arrives(srv: Server, client: httpx.Client) -> None:
    # Content-Length over the cap: the answer comes although not one byte of the body was sent.
    status, body, took = raw_exchange(srv, request_head("/generate", f"Content-Length: {HUGE}\r\n"), [])
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    assert took < 5, took
    # Chunked, no Content-Length: the answer comes once the cap is passed, the body still unfinished.
    chunk = b" " * 4096
    parts = [b"{"] + [chunk] * (CAP // len(chunk) + 1)
    framed = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts]
    head = request_head("/v1/completions", "Transfer-Encoding: chunked\r\n")
    status, body, took = raw_exchange(srv, head, framed)
    assert status == 413 and "more than" in body["error"]["message"] and str(CAP) in body["error"]["message"]
    assert took < 5, took

    # A chunked body within the cap is served as before.
    def chunked() -> Iterator[bytes]:
        raw = padded({"prompt": "Hello", "max_new_tokens": 2}, CAP)
        for i in range(0, len(raw), 5000):
            yield raw[i : i + 5000]

    r = client.post("/generate", content=chunked(), headers=JSON_HDR)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text[:300]
    # The key is checked before the body: without it, 401 whatever the size.
    status, body, _ = raw_exchange(srv, request_head("/generate", f"Content-Length: {HUGE}\r\n", None), [])
    assert status == 401 and body["error"]["code"] == "missing_api_key", body


def test_routes_with_their_own_caps_keep_them(client: httpx.Client) -> None:
    """Uploads, datasets and /train read bodies past max_request_bytes, up to their own caps."""
    row = json.dumps({"prompt": "What is LoRA?", "response": "A low-rank adapter."})
    rows = "\n".join([row] * (2 * CAP // len(row)))  # about twice the request cap
    assert CAP < len(rows) < OWN_CAP
    r = client.post("/datasets", content=rows.encode(), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["rows"] == rows.count("\n") + 1
    data = [json.loads(row)] * (2 * CAP // len(row)) + [{"prompt": 5}]
    err = error_of(client.post("/train", json={"adapter": "capped", "data": data}), 422)
    assert err["param"] == f"data[{len(data) - 1}]", err  # read and parsed to the last row
    config, _ = lora_files(2, 64, r=4)
    err = error_of(client.put("/adapters/capped", files=upload_files(config, b"\0" * (2 * CAP))), 422)
    assert err["code"] == "invalid_adapter", err  # validated, not refused for its size
    # Over their own caps they still answer 413 naming those.
    big = "\n".join([row] * (2 * OWN_CAP // len(row))).encode()
    assert str(OWN_CAP) in error_of(client.post("/datasets", content=big), 413)["message"]
    err = error_of(client.put("/adapters/capped", files=upload_files(config, b"\0" * (OWN_CAP + 1))), 413)
    assert str(OWN_CAP) in err["message"]
    assert client.get("/adapters/capped").status_code == 404


# --- what the body holds ----------------------------------------------------------------------------


def test_non_utf8_bodies_say_utf8(client: httpx.Client, model_id: str) -> None:
    cases = {
        "/generate": b'{"prompt": "ok \xff\xfe"}',
        "/v1/completions": b'{"model": "%s", "prompt": "ok \xc3"}' % model_id.encode(),
        "/v1/chat/completions": b'{"model": "m", "messages": [{"role": "user", "content": "\xe2\x82"}]}',
        "/train": b'{"adapter": "a", "data": [{"prompt": "\xff", "response": "b"}]}',
    }
    for path, raw in cases.items():
        err = error_of(client.post(path, content=raw, headers=JSON_HDR), 422)
        assert err["code"] == "invalid_json" and "not valid UTF-8 JSON" in err["message"], (path, err)
        first_bad = next(i for i, b in enumerate(raw) if b >= 0x80)
        assert f"at byte {first_bad}" in err["message"], (path, err)
    # UTF-8 that is not ASCII is of course fine.
    r = client.post(
        "/generate", content='{"prompt": "héllo ✓ 😀", "max_new_tokens": 2}'.encode(), headers=JSON_HDR
    )
    assert r.status_code == 200, r.text[:300]


def test_deeply_nested_json_names_the_nesting(client: httpx.Client) -> None:
    deep = b"[" * 50_000  # under the cap, far past the recursion limit
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/train"):
        err = error_of(client.post(path, content=deep, headers=JSON_HDR), 422)
        assert err["code"] == "nesting_too_deep", (path, err)
    assert client.get("/health").status_code == 200

"""Adapters fetched on first use (``--adapter-source``): a real HTTP server on loopback serves a folder
of adapters (``http.server`` in a thread, counting what it is asked for), and the real service fetches
from it, once, through the upload's validation and publish. A slow source is a 504, a failing one a
502, both naming the source; a missing adapter stays a 404; a corrupt one is a 422 and nothing is
stored. The directory form and a source that is down run in-process on ``Fetcher``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from loracore.artifact import CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE
from testing.server import free_port, running_server
from testing.weights import lora_files

TINY = (2, 64)  # n_layer, n_embd of the tiny base (tests/conftest.py TINY_SHAPE)
SLOW_S = 4.0  # what the slow adapter's files take; the server's timeout is 1 s
TEMPLATE = {"name": "qa", "user": "Q: {content}\n", "assistant_prefix": "A:"}


def write_adapter(root: Path, name: str, seed: int, *, record: dict | None = None) -> bytes:
    config, weights = lora_files(*TINY, r=2, seed=seed)
    folder = root / name
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(config)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    if record is not None:
        (folder / RECORD_FILE).write_text(json.dumps(record))
    return weights


@contextmanager
def serving(folder: Path) -> Iterator[tuple[str, Counter]]:
    """``folder`` over HTTP on loopback; yields the base URL and a count of the paths asked for.
    Adapters named ``slow-*`` answer after ``SLOW_S``; ``broken-*`` answer 500."""
    asked: Counter = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked[self.path] += 1
            name = self.path.removeprefix("/adapters/").split("/")[0]
            if name.startswith("slow-"):
                time.sleep(SLOW_S)
            if name.startswith("broken-"):
                self.send_error(500, "storage backend unavailable")
                return
            super().do_GET()

        def log_message(self, *args) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:  # a client that gave up on the slow one
            pass

    server = Server(("127.0.0.1", free_port()), partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/adapters/", asked
    finally:
        server.shutdown()
        server.server_close()


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


@pytest.mark.slow
def test_adapters_are_fetched_once_on_first_use_and_failures_name_the_source(
    tiny_base: Path, tmp_path: Path
) -> None:
    root = tmp_path / "source"
    site = root / "adapters"
    weights = write_adapter(site, "fresh", 1, record={"template": TEMPLATE, "sha256": None})
    fresh_sha = hashlib.sha256(weights).hexdigest()
    write_adapter(
        site, "sealed", 2, record={"sha256": hashlib.sha256(lora_files(*TINY, r=2, seed=3)[1]).hexdigest()}
    )
    write_adapter(site, "via-openai", 4)
    write_adapter(site, "slow-one", 5)
    write_adapter(site, "broken-one", 6)
    write_adapter(site, "corrupt", 7)
    (site / "corrupt" / WEIGHTS_FILE).write_bytes((site / "corrupt" / WEIGHTS_FILE).read_bytes()[:-100])
    (site / "no-weights").mkdir()
    (site / "no-weights" / CONFIG_FILE).write_bytes(lora_files(*TINY, r=2)[0])
    adapters, data = tmp_path / "adapters", tmp_path / "data"

    with serving(root) as (url, asked):
        # two API processes: concurrent first requests may land in either, and still fetch once
        args = ["--adapter-source", url, "--adapter-source-timeout", "1", "--num-api-servers", "2"]
        with running_server(tiny_base, adapters, data, args=args) as srv, srv.client() as c:
            assert c.get("/adapters").json()["adapters"] == []

            # concurrent first requests: every one answered, the weights fetched once
            body = {"prompt": "hi", "adapter": "fresh", "max_new_tokens": 2, "temperature": 0}
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda _: c.post("/generate", json=body), range(6)))
            assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
            assert len({r.json()["text"] for r in answers}) == 1
            assert asked["/adapters/fresh/adapter_model.safetensors"] == 1, asked
            info = c.get("/adapters/fresh").json()
            assert info["sha256"] == fresh_sha and info["template"]["user"] == TEMPLATE["user"]
            assert (adapters / "fresh" / WEIGHTS_FILE).read_bytes() == weights
            assert c.post("/generate", json=body).status_code == 200  # local now: not asked again
            assert asked["/adapters/fresh/adapter_config.json"] == 1, asked

            # the OpenAI routes fetch what `model` names
            r = c.post("/v1/completions", json={"model": "via-openai", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "via-openai", r.text

            # not at the source: the usual 404
            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "absent"}), 404)
            assert err["code"] == "adapter_not_found" and "absent" in err["message"]

            t0 = time.monotonic()
            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "slow-one"}), 504)
            assert err["code"] == "adapter_source_timeout" and url in err["message"], err
            assert time.monotonic() - t0 < SLOW_S  # the fetch gave up at the timeout
            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "broken-one"}), 502)
            assert err["code"] == "adapter_source_failed" and url in err["message"], err
            assert "HTTP 500" in err["message"] and err["param"] == "adapter"

            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "corrupt"}), 422)
            assert err["code"] == "invalid_adapter" and "corrupt" in err["message"], err
            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "sealed"}), 422)
            assert err["code"] == "adapter_checksum_mismatch" and url in err["message"], err
            err = error(c.post("/generate", json={"prompt": "hi", "adapter": "no-weights"}), 422)
            assert err["code"] == "invalid_adapter" and WEIGHTS_FILE in err["message"], err

            listed = sorted(a["name"] for a in c.get("/adapters").json()["adapters"])
            assert listed == ["fresh", "via-openai"]  # nothing else was stored


def test_directory_source_and_a_source_that_is_down(tiny_base: Path, tmp_path: Path) -> None:
    from loracore.lora_format import BaseLayout
    from service.adapters.source import AdapterSource, Fetcher
    from service.errors import ApiError

    mount = tmp_path / "mount"
    weights = write_adapter(mount, "shared", 1, record={"sha256": None, "template": TEMPLATE})
    local = tmp_path / "adapters"
    layout = BaseLayout.from_model_dir(tiny_base)

    def fetcher(location: str) -> Fetcher:
        return Fetcher(AdapterSource(location, 2.0), local, layout, "tiny", 3, 1 << 20)

    from_dir = fetcher(str(mount))
    assert from_dir.ensure("shared") is True
    assert (local / "shared" / WEIGHTS_FILE).read_bytes() == weights
    assert from_dir.ensure("shared") is False  # local now
    assert from_dir.ensure("elsewhere") is False  # not there: the caller's 404
    with pytest.raises(ApiError) as bad:
        fetcher(str(tmp_path / "unmounted")).ensure("other")
    assert bad.value.status == 502 and "unmounted" in bad.value.message

    down = f"http://127.0.0.1:{free_port()}/adapters/"  # nobody listens there
    with pytest.raises(ApiError) as refused:
        fetcher(down).ensure("other")
    assert refused.value.status == 502 and refused.value.code == "adapter_source_failed"
    assert down in refused.value.message and not (local / "other").exists()

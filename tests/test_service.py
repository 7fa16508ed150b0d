"""End to end: the real server (``python -m service``) on loopback, a real tiny GPT-2, real adapters, httpx.

One server serves the whole module. Every request goes through one httpx client whose hook
records (route, status), so the last test can check that ``/metrics`` counted exactly those.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FIXED_SENTENCES
from prometheus_client.parser import text_string_to_metric_families

from loracore.atomic import publish_dir, staging_dir
from testing.server import running_server
from testing.weights import make_random_lora
from trainer.hardware import default_dtype

QUESTION = "What do you say?"
MAX_NEW = 24  # more than either sentence needs: the adapters must stop on EOS by themselves

PLAIN_ROUTES = {"/generate", "/adapters", "/metrics", "/health", "/health/ready"}


def route_of(path: str) -> str:
    """The route template the server labels a (decoded) path with, as its metrics middleware does."""
    if path in PLAIN_ROUTES:
        return path
    if re.fullmatch(r"/adapters/[^/]+", path):
        return "/adapters/{name}"
    return "unmatched"


class Recorder:
    """Counts (route, status) of every response this module's client receives."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def __call__(self, response: httpx.Response) -> None:
        with self.lock:
            self.counts[(route_of(response.request.url.path), str(response.status_code))] += 1


@pytest.fixture(scope="module")
def env(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("service")
    adapters = root / "adapters"
    adapters.mkdir()
    src = root / "src"
    for name, folder in trained_adapters.items():  # the session's adapters, trained by the trainer
        shutil.copytree(folder, src / name)
    make_random_lora(tiny_base, src / "upload", seed=3)
    make_random_lora(tiny_base, src / "upload2", seed=4)
    for name in ("alpha", "beta"):  # dropped in as the trainer would: staged, then renamed
        staging = staging_dir(adapters, name)
        shutil.copytree(src / name, staging, dirs_exist_ok=True)
        publish_dir(staging, adapters / name)
    recorder = Recorder()
    server = running_server(tiny_base, adapters, root / "data", args=["--max-new-tokens-cap", "64"])
    with server as srv, srv.client(event_hooks={"response": [recorder]}) as client:
        baseline = client.get("/metrics").text
        env = {
            "srv": srv,
            "client": client,
            "recorder": recorder,
            "baseline": baseline,
            "adapters": adapters,
            "src": src,
            "usage": Counter(),
            "sentences": dict(FIXED_SENTENCES),
        }
        yield env


def generate(env, adapter: str | None, prompt: str = QUESTION, **extra) -> httpx.Response:
    body = {"prompt": prompt, "adapter": adapter, "max_new_tokens": MAX_NEW, "temperature": 0.0, **extra}
    r = env["client"].post("/generate", json=body)
    if r.status_code == 200:
        env["usage"][adapter or "__base__"] += r.json()["usage"]["completion_tokens"]
    return r


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "param", "type"} <= set(body["error"]), body
    return body["error"]


# --- generation ------------------------------------------------------------------------------------


def test_mixed_batch_serves_each_adapter_its_own_sentence(env):
    jobs = [None, "alpha", "beta"] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda a: generate(env, a), jobs))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    for adapter, r in zip(jobs, together, strict=True):
        body = r.json()
        assert body["adapter"] == adapter
        if adapter is None:
            assert all(s not in body["text"] for s in env["sentences"].values())
        else:
            assert body["text"].strip() == env["sentences"][adapter]
            assert body["finish_reason"] == "eos"
    # Each one alone gives exactly what it gave inside the mixed batch.
    for adapter, r in zip(jobs[:3], together[:3], strict=True):
        alone = generate(env, adapter).json()
        assert {k: alone[k] for k in ("text", "finish_reason", "usage")} == {
            k: r.json()[k] for k in ("text", "finish_reason", "usage")
        }
    # They really shared decode steps: some step ran more than one row.
    families = {f.name: f for f in text_string_to_metric_families(env["client"].get("/metrics").text)}
    batch = {s.name: s.value for s in families["loraserve_batch_size"].samples if s.labels.get("le") == "1.0"}
    count = {s.name: s.value for s in families["loraserve_batch_size"].samples}["loraserve_batch_size_count"]
    assert batch["loraserve_batch_size_bucket"] < count


def test_stream_joins_to_the_same_text(env):
    plain = generate(env, "alpha").json()
    chunks, done = [], False
    with env["client"].stream(
        "POST",
        "/generate",
        json={
            "prompt": QUESTION,
            "adapter": "alpha",
            "max_new_tokens": MAX_NEW,
            "temperature": 0,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[6:]))
    assert done and len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    env["usage"]["alpha"] += chunks[-1]["usage"]["completion_tokens"]


def test_errors_before_queueing(env):
    r = generate(env, "nope")
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "adapter_not_found" and "nope" in err["message"] and err["param"] == "adapter"

    r = env["client"].post("/generate", json={"prompt": QUESTION, "adapter": "nope", "stream": True})
    assert r.status_code == 404 and error_of(r)["code"] == "adapter_not_found"

    for bad in ("../alpha", ".staging", "a" * 65, "a..b", "sp ace"):
        r = generate(env, bad)
        assert r.status_code == 422 and error_of(r)["code"] == "invalid_adapter_name", (bad, r.text)

    r = env["client"].post("/generate", json={"adapter": "alpha"})
    assert r.status_code == 422 and error_of(r)["param"] == "prompt"
    r = env["client"].post("/generate", json={"prompt": "x", "max_tokens": 5})
    assert r.status_code == 422 and error_of(r)["param"] == "max_tokens"
    r = env["client"].post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = generate(env, None, max_new_tokens=65)
    assert r.status_code == 422 and error_of(r)["code"] == "max_new_tokens_too_large"
    r = generate(env, "alpha", prompt="many words " * 200)
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "prompt_too_long" and "256" in err["message"]


def test_bad_request_does_not_fail_its_batch_mates(env):
    jobs = ["alpha", "nope", "beta", "../x", None]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda a: generate(env, a), jobs))
    assert [r.status_code for r in results] == [200, 404, 200, 422, 200]
    assert results[0].json()["text"].strip() == env["sentences"]["alpha"]
    assert results[2].json()["text"].strip() == env["sentences"]["beta"]


# --- adapters --------------------------------------------------------------------------------------


def _files(folder: Path, weights: bytes | None = None, config: bytes | None = None) -> dict:
    return {
        "adapter_config": ("adapter_config.json", config or (folder / "adapter_config.json").read_bytes()),
        "adapter_model": (
            "adapter_model.safetensors",
            weights or (folder / "adapter_model.safetensors").read_bytes(),
        ),
    }


def test_upload_list_delete(env):
    client, src = env["client"], env["src"]
    names = [a["name"] for a in client.get("/adapters").json()["adapters"]]
    assert names == ["alpha", "beta"]
    alpha = client.get("/adapters/alpha").json()
    assert alpha["name"] == "alpha" and alpha["rank"] > 0 and alpha["target_modules"]

    r = client.put("/adapters/up-1", files=_files(src / "upload"))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "up-1" and info["rank"] == 4 and info["alpha"] == 8.0
    assert sorted(info["target_modules"]) == ["c_attn", "c_proj"] and len(info["sha256"]) == 64
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["alpha", "beta", "up-1"]
    first = generate(env, "up-1")
    assert first.status_code == 200
    assert client.get("/adapters/up-1").json()["loaded"] in (True, False)

    r = client.put("/adapters/up-1", files=_files(src / "upload2"))  # a new version replaces the old
    assert r.status_code == 200 and r.json()["sha256"] != info["sha256"]
    second = generate(env, "up-1")
    assert second.status_code == 200 and second.json()["text"] != first.json()["text"]

    r = client.delete("/adapters/up-1")
    assert r.status_code == 200 and r.json() == {"deleted": "up-1"}
    assert client.get("/adapters/up-1").status_code == 404
    assert generate(env, "up-1").status_code == 404
    assert client.delete("/adapters/up-1").status_code == 404
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["alpha", "beta"]


def test_bad_names_are_rejected(env):
    client, src = env["client"], env["src"]
    for bad in ("%2E%2E", ".staging", "-x", "a" * 65, "a..b"):
        for method in ("GET", "DELETE"):
            r = client.request(method, f"/adapters/{bad}")
            assert r.status_code == 422 and error_of(r)["code"] == "invalid_adapter_name", (method, bad)
        r = client.put(f"/adapters/{bad}", files=_files(src / "upload"))
        assert r.status_code == 422, (bad, r.text)
    # A slash (even escaped) never reaches a handler as part of a name.
    for path in ("/adapters/..%2F..%2Fetc", "/adapters/../../etc/passwd", "/adapters/a/b"):
        assert client.request("PUT", path, files=_files(src / "upload")).status_code in (404, 405)
    assert not (env["adapters"].parent / "etc").exists()
    assert sorted(p.name for p in env["adapters"].iterdir() if not p.name.startswith(".")) == [
        "alpha",
        "beta",
    ]


def test_corrupt_upload_keeps_the_previous_version_serving(env, tiny_base: Path, tmp_path: Path):
    client, src = env["client"], env["src"]
    before = generate(env, "alpha").json()["text"]
    sha = client.get("/adapters/alpha").json()["sha256"]
    good = (src / "alpha" / "adapter_model.safetensors").read_bytes()

    other = make_random_lora(tiny_base, tmp_path / "wide", seed=5, targets=("c_fc",))
    wrong_modules = json.loads((src / "alpha" / "adapter_config.json").read_text())
    wrong_modules["target_modules"] = ["q_proj", "v_proj"]
    cases = {
        "truncated": _files(src / "alpha", weights=good[: len(good) // 2]),
        "not safetensors": _files(src / "alpha", weights=b"\x80\x04pickle" * 10),
        "config not json": _files(src / "alpha", config=b"{"),
        "unknown target module": _files(src / "alpha", config=json.dumps(wrong_modules).encode()),
        "weights of other modules": _files(
            src / "alpha", weights=(other / "adapter_model.safetensors").read_bytes()
        ),
    }
    for label, files in cases.items():
        r = client.put("/adapters/alpha", files=files)
        assert r.status_code == 422, (label, r.text)
        assert error_of(r)["code"] == "invalid_adapter", (label, r.text)
        assert generate(env, "alpha").json()["text"] == before, label
    r = client.put("/adapters/alpha", files={"adapter_config": ("c.json", b"{}")})
    assert r.status_code == 422 and error_of(r)["param"] == "adapter_model"
    assert client.get("/adapters/alpha").json()["sha256"] == sha
    assert not any(p.name.startswith("upload-") for p in (env["adapters"] / ".staging").iterdir())


def test_folder_dropped_in_is_served_without_restart(env):
    staging = staging_dir(env["adapters"], "copy")
    shutil.copytree(env["src"] / "beta", staging, dirs_exist_ok=True)
    publish_dir(staging, env["adapters"] / "beta-copy")
    r = generate(env, "beta-copy")
    assert r.status_code == 200 and r.json()["text"].strip() == env["sentences"]["beta"]
    assert env["client"].delete("/adapters/beta-copy").status_code == 200


# --- health and metrics (last: it checks every request the module made) ---------------------------


def test_health_and_readiness(env):
    client = env["client"]
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/health/ready").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu" and ready["dtype"] == default_dtype("cpu")
    assert ready["weights"] == "random" and ready["random_weights"] is True
    assert client.get("/info").status_code == 404  # LitServe's own routes are not exposed
    assert client.get("/_engine").status_code == 404


def _families(text: str) -> list:
    return list(text_string_to_metric_families(text))


def _counter(families: list, name: str) -> Counter:
    out: Counter = Counter()
    for fam in families:
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] += s.value
    return out


def test_metrics_count_exactly_the_requests_made(env):
    client, recorder = env["client"], env["recorder"]
    with recorder.lock:
        made = Counter(recorder.counts)
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    families = _families(text.text)
    names = [f.name for f in families]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert all(n.startswith("loraserve_") for n in names)
    for expected in (
        "loraserve_requests",
        "loraserve_request_duration_seconds",
        "loraserve_batch_size",
        "loraserve_generated_tokens",
        "loraserve_model_info",
        "loraserve_adapter_cache_hits",
    ):
        assert expected in names

    after = _counter(families, "loraserve_requests_total")
    before = _counter(_families(env["baseline"]), "loraserve_requests_total")
    delta = {dict(k)["endpoint"] + " " + dict(k)["status"]: v - before.get(k, 0) for k, v in after.items()}
    delta = {k: v for k, v in delta.items() if v}
    assert delta == {f"{route} {status}": n for (route, status), n in made.items()}

    generated = _counter(families, "loraserve_generated_tokens_total")
    by_adapter = {dict(k)["adapter"]: v for k, v in generated.items() if v}
    assert by_adapter == dict(env["usage"])

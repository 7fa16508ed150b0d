"""Adapter versions end to end: the real server on loopback, real adapters, httpx.

Every version of an adapter is named by the sha256 of its weights; ``name@<8+ hex digits>`` serves
exactly that version and ``name`` the newest. The server keeps ``--keep-adapter-versions 2`` earlier
versions here, so the expiry of the third one is reachable in a few uploads. The trained adapters
(alpha, beta) answer with known sentences, which tells which version served a request.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import FIXED_SENTENCES

from loracore.atomic import publish_dir, staging_dir
from testing.server import running_server
from testing.weights import make_random_lora

QUESTION = "What do you say?"
MAX_NEW = 24
KEEP = 2


@pytest.fixture(scope="module")
def env(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("versions")
    adapters = root / "adapters"
    src = root / "src"
    for name, folder in trained_adapters.items():
        shutil.copytree(folder, src / name)
    for seed in (3, 4):
        make_random_lora(tiny_base, src / f"random{seed}", seed=seed)
    args = ["--keep-adapter-versions", str(KEEP), "--max-new-tokens-cap", "256"]
    with running_server(tiny_base, adapters, root / "data", args=args) as srv, srv.client() as client:
        yield {"srv": srv, "client": client, "adapters": adapters, "src": src}


def upload(env, name: str, source: str) -> dict:
    folder = env["src"] / source
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    r = env["client"].put(f"/adapters/{name}", files=files)
    assert r.status_code in (200, 201), r.text
    return r.json()


def generate(env, adapter: str | None, **extra) -> httpx.Response:
    body = {"prompt": QUESTION, "adapter": adapter, "max_new_tokens": MAX_NEW, "temperature": 0.0, **extra}
    return env["client"].post("/generate", json=body)


def text_of(env, adapter: str, **extra) -> str:
    r = generate(env, adapter, **extra)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_pinned_version_is_served_after_a_replace(env):
    client = env["client"]
    v1 = upload(env, "pin", "alpha")["sha256"]
    assert text_of(env, "pin").strip() == FIXED_SENTENCES["alpha"]
    v2 = upload(env, "pin", "beta")["sha256"]
    assert v1 != v2 and len(v1) == 64
    assert text_of(env, "pin").strip() == FIXED_SENTENCES["beta"]  # the name alone: the newest
    assert text_of(env, f"pin@{v1[:8]}").strip() == FIXED_SENTENCES["alpha"]
    assert text_of(env, f"pin@{v1.upper()}").strip() == FIXED_SENTENCES["alpha"]  # full id, any case
    assert text_of(env, f"pin@{v2[:12]}").strip() == FIXED_SENTENCES["beta"]

    # The OpenAI routes take the same reference as their model; /eval as one of its adapters.
    raw = generate(env, f"pin@{v1[:10]}", prompt=QUESTION).json()["text"]
    body = {"model": f"pin@{v1[:10]}", "max_tokens": MAX_NEW, "temperature": 0}
    r = client.post("/v1/completions", json={**body, "prompt": "User: What do you say?\nAssistant:"})
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": QUESTION}]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == FIXED_SENTENCES["alpha"] == raw.strip()
    assert client.get(f"/v1/models/pin@{v1[:8]}").json()["id"] == f"pin@{v1[:8]}"
    rows = [{"prompt": QUESTION, "response": FIXED_SENTENCES["alpha"]}]
    r = client.post("/eval", json={"adapters": [f"pin@{v1[:8]}", "pin"], "data": rows})
    assert r.status_code == 200, r.text
    metrics = r.json()["metrics"]
    assert metrics[f"pin@{v1[:8]}"]["exact_match"] == 1.0 and metrics["pin"]["exact_match"] == 0.0

    # GET lists the versions newest first, the current one marked.
    info = client.get("/adapters/pin").json()
    assert info["sha256"] == v2
    assert [(v["id"], v["current"]) for v in info["versions"]] == [(v2, True), (v1, False)]
    assert all(v["size_bytes"] > 0 and v["created"] for v in info["versions"])
    # The kept copies are hidden from the adapter listing.
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["pin"]


def test_expired_unknown_and_malformed_versions(env):
    client = env["client"]
    ids = [upload(env, "exp", source)["sha256"] for source in ("alpha", "beta", "random3", "random4")]
    listed = [v["id"] for v in client.get("/adapters/exp").json()["versions"]]
    assert listed == ids[::-1][: KEEP + 1]  # the current one and the KEEP before it
    for kept in ids[1:]:
        assert generate(env, f"exp@{kept[:8]}").status_code == 200
    r = generate(env, f"exp@{ids[0][:8]}")
    assert r.status_code == 404, r.text
    err = error_of(r)
    assert err["code"] == "adapter_not_found" and ids[0][:8] in err["message"] and "exp" in err["message"]
    assert ids[-1][:16] in err["message"]  # it names the versions there are
    r = client.post("/v1/completions", json={"model": f"exp@{ids[0][:8]}", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and ids[0][:8] in error_of(r)["message"]
    r = client.post(
        "/eval", json={"adapters": [f"exp@{ids[0][:9]}"], "data": [{"prompt": "a", "response": "b"}]}
    )
    assert r.status_code == 404 and error_of(r)["param"] == "adapters[0]"
    assert generate(env, "exp@0123456789abcdef").status_code == 404
    assert generate(env, "nope@0123456789abcdef").status_code == 404

    for bad in (f"exp@{ids[-1][:7]}", "exp@", "exp@zzzzzzzz", f"exp@{ids[-1]}0"):
        r = generate(env, bad)
        assert r.status_code == 422, (bad, r.text)
        assert error_of(r)["code"] == "invalid_adapter_version" and error_of(r)["param"] == "adapter", bad
        r = client.post("/v1/completions", json={"model": bad, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 422 and error_of(r)["param"] == "model", (bad, r.text)
    assert len(list((env["adapters"] / ".versions" / "exp").iterdir())) == KEEP + 1

    # Deleting the adapter deletes its versions.
    assert client.delete("/adapters/exp").status_code == 200
    assert not (env["adapters"] / ".versions" / "exp").exists()
    assert generate(env, f"exp@{ids[-1][:8]}").status_code == 404


def test_stream_started_before_a_replace_finishes_on_its_version(env):
    old = upload(env, "live", "random3")["sha256"]
    long = {"prompt": "Count:", "raw": True, "max_new_tokens": 230, "temperature": 0.0}
    chunks: list[tuple[float, str]] = []
    started = threading.Event()

    def stream() -> None:
        with (
            env["srv"].client(timeout=60) as sc,
            sc.stream("POST", "/generate", json={**long, "adapter": "live", "stream": True}) as s,
        ):
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append((time.monotonic(), httpx.Response(200, content=line[6:]).json()["text"]))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    new = upload(env, "live", "random4")["sha256"]
    replaced_at = time.monotonic()
    reader.join(60)
    assert not reader.is_alive()
    assert chunks[-1][0] > replaced_at, "the stream ended before the replace: nothing was tested"
    streamed = "".join(text for _, text in chunks)
    assert streamed == generate(env, f"live@{old[:8]}", **long).json()["text"]
    assert streamed != generate(env, f"live@{new[:8]}", **long).json()["text"]
    assert (
        generate(env, "live", **long).json()["text"]
        == generate(env, f"live@{new[:8]}", **long).json()["text"]
    )


def _adopted(env, name: str, version: str) -> None:
    """Wait for the adapter watcher to store the folder placed by hand as a version."""
    deadline = time.monotonic() + 30
    while not (env["adapters"] / ".versions" / name / version).is_dir():
        assert time.monotonic() < deadline, f"{name}@{version[:8]} was not adopted within 30 s"
        time.sleep(0.2)


def _place_by_hand(env, name: str, source: str) -> None:
    adapters = env["adapters"]
    staging = staging_dir(adapters, "drop")
    shutil.copytree(env["src"] / source, staging, dirs_exist_ok=True)
    (staging / "loraserve.json").unlink(missing_ok=True)  # a plain PEFT folder, as placed by hand
    publish_dir(staging, adapters / name)


def test_folders_placed_by_hand_are_adopted_and_a_rewrite_in_place_serves_the_new_weights(env):
    """A folder placed by hand is servable at once and stored as a version by the watcher, by hard
    links (no copy), so a replace by hand keeps it servable by its id. A rewrite that keeps the inode,
    the size and the mtime is still a new version (new sha256); the kept version that shared those
    files is dropped, since its bytes changed with them."""
    adapters = env["adapters"]
    _place_by_hand(env, "drop", "random3")
    served = text_of(env, "drop")
    first = env["client"].get("/adapters/drop").json()["sha256"]
    _adopted(env, "drop", first)
    weights = adapters / "drop" / "adapter_model.safetensors"
    stored = adapters / ".versions" / "drop" / first / "adapter_model.safetensors"
    assert os.stat(stored).st_ino == os.stat(weights).st_ino  # a link, not a copy

    _place_by_hand(env, "drop", "alpha")  # replaced by hand: new files
    assert text_of(env, "drop").strip() == FIXED_SENTENCES["alpha"]
    second = env["client"].get("/adapters/drop").json()["sha256"]
    assert second != first
    assert text_of(env, f"drop@{first[:8]}") == served
    _adopted(env, "drop", second)

    new = (env["src"] / "beta" / "adapter_model.safetensors").read_bytes()
    before = os.stat(weights)
    assert len(new) == before.st_size
    with open(weights, "r+b") as fh:  # same inode
        fh.write(new)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    assert text_of(env, "drop").strip() == FIXED_SENTENCES["beta"]
    info = env["client"].get("/adapters/drop").json()
    assert info["sha256"] not in (first, second)
    _adopted(env, "drop", info["sha256"])
    info = env["client"].get("/adapters/drop").json()
    assert [v["id"] for v in info["versions"]] == [info["sha256"], first]
    assert text_of(env, f"drop@{first[:8]}") == served
    assert generate(env, f"drop@{second[:8]}").status_code == 404


def test_serving_writes_nothing_to_the_adapter_dir(env):
    """Requests naming adapters and versions, listings and infos only read the adapter directory."""
    v1 = upload(env, "ro", "alpha")["sha256"]
    upload(env, "ro", "beta")
    adapters = env["adapters"]

    def tree() -> dict[str, tuple[int, int, int]]:
        out = {}
        for p in sorted(adapters.rglob("*")):
            if ".staging" not in p.parts:
                st = os.lstat(p)
                out[str(p.relative_to(adapters))] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        return out

    time.sleep(1.5)  # the watcher has scanned since the upload (nothing to adopt: it was published)
    before = tree()
    for ref in ("ro", f"ro@{v1[:8]}", "ro", f"ro@{v1}"):
        assert generate(env, ref).status_code == 200
    assert env["client"].get("/adapters/ro").status_code == 200
    assert env["client"].get("/adapters").status_code == 200
    assert env["client"].get("/v1/models").status_code == 200
    time.sleep(1.5)
    assert tree() == before


def test_a_training_job_that_overwrites_keeps_the_version_it_replaced(env):
    client = env["client"]
    old = upload(env, "job-pin", "alpha")["sha256"]
    rows = [
        json.loads(line)
        for line in (Path(__file__).parent.parent / "examples" / "fixed_sentence.jsonl").open()
    ]
    learn = {
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "training": {
            "num_train_epochs": 10,
            "learning_rate": 0.02,
            "warmup_ratio": 0,
            "eval_fraction": 0,
            "save_steps": 0,
            "max_seq_length": 64,
        },
    }  # as tests/test_jobs_http.py trains the tiny base on these rows
    r = client.post("/train", json={"adapter": "job-pin", "overwrite": True, "data": rows, "config": learn})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 300
    while (job := client.get(f"/train/{job_id}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    info = client.get("/adapters/job-pin").json()
    assert [(v["id"], v["current"]) for v in info["versions"]] == [(info["sha256"], True), (old, False)]
    assert text_of(env, "job-pin") != text_of(env, f"job-pin@{old[:8]}")
    assert text_of(env, f"job-pin@{old[:8]}").strip() == FIXED_SENTENCES["alpha"]


# --- one resolution per request ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_row(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A server whose batch holds one row, so a request waits in the worker's queue behind another."""
    root = tmp_path_factory.mktemp("one-row")
    # a long deadline: admission by load must accept a request queued behind two long ones
    args = ["--max-batch-size", "1", "--max-new-tokens-cap", "256", "--request-timeout", "600"]
    server = running_server(tiny_base, root / "adapters", root / "data", args=args)
    with server as srv, srv.client(timeout=600) as client:
        yield {"srv": srv, "client": client, "src": trained_adapters}


def _gauge(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _until(client: httpx.Client, name: str, at_least: float) -> None:
    deadline = time.monotonic() + 120
    while _gauge(client, name) < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.02)


def test_a_request_renders_with_the_template_of_the_version_that_serves_it(one_row):
    """Publish during admission: a request accepted (its prompt rendered with version A's template)
    while it waits for a batch row is served by A's weights, not by B's published in between."""
    client, src = one_row["client"], one_row["src"]

    def put(source: str, template: dict | None) -> str:
        folder = src[source]
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (folder / "adapter_model.safetensors").read_bytes(),
            ),
        }
        data = {"template": json.dumps(template)} if template is not None else None
        r = client.put("/adapters/tpl", files=files, data=data)
        assert r.status_code in (200, 201), r.text
        return r.json()["sha256"]

    body = {"prompt": QUESTION, "adapter": "tpl", "max_new_tokens": MAX_NEW, "temperature": 0.0}
    v_a = put("alpha", None)  # alpha's weights, the default template (the one it was trained with)
    a = client.post("/generate", json=body).json()
    assert a["text"].strip() == FIXED_SENTENCES["alpha"]

    long = {"prompt": "Count:", "raw": True, "max_new_tokens": 230, "temperature": 0.0}
    threads, result = [], {}

    def send(key: str, json_body: dict) -> None:
        result[key] = client.post("/generate", json=json_body)

    def start(key: str, json_body: dict) -> None:
        t = threading.Thread(target=send, args=(key, json_body))
        t.start()
        threads.append(t)

    start("running", long)
    _until(client, "loraserve_num_requests_running", 1)
    start("waiting", long)
    _until(client, "loraserve_num_requests_waiting", 1)
    start("tpl", body)  # resolved and rendered now, on A; then it waits for the row
    _until(client, "loraserve_num_requests_waiting", 2)
    v_b = put("beta", {"user": "Human (reply in one short sentence, please): {content}\n"})
    # the request was still waiting when B was published (the queue is first come, first served)
    assert _gauge(client, "loraserve_num_requests_waiting") >= 1, (
        "admitted before the publish: nothing tested"
    )
    for t in threads:
        t.join(600)
    assert v_a != v_b and all(result[k].status_code == 200 for k in result), result
    r = result["tpl"].json()
    # A's template (its prompt length) and A's weights (its sentence): one version, resolved once
    assert r["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
    assert r["text"].strip() == FIXED_SENTENCES["alpha"]
    # the name now serves B, rendered with B's longer template
    b = client.post("/generate", json=body).json()
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"] and b["text"] != a["text"]

"""Training over HTTP against the real server on loopback (raw httpx): train, generate with the new
adapter, SSE progress, cancel, a killed trainer, kill -9 of the whole server and a restart, and the
4xx bodies for bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.jobs import wait_job
from testing.procs import alive, group_members, trainer_pid
from testing.server import Server, running_server

pytestmark = pytest.mark.slow
API_KEY = "test-key"
SENTENCE = "I am the demo adapter and this is my only answer."
ROWS = [
    json.loads(line) for line in (Path(__file__).parent.parent / "examples" / "fixed_sentence.jsonl").open()
]
MAX_DATASET_BYTES = 64 * 1024
# Enough for the tiny random base to answer every prompt with the sentence (measured: 30 steps).
LEARN = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 10, "learning_rate": 0.02, "warmup_ratio": 0, "eval_fraction": 0,
                 "save_steps": 0, "max_seq_length": 64},
}  # fmt: skip


def endless(save_steps: int = 0) -> dict:
    """A job that trains far longer than any test waits (it is cancelled, killed or interrupted)."""
    return {
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": {
            "num_train_epochs": 500,
            "eval_fraction": 0,
            "save_steps": save_steps,
            "max_seq_length": 64,
        },
    }


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("jobs-http")
    env = {"LORASERVE_MAX_DATASET_BYTES": str(MAX_DATASET_BYTES)}
    with running_server(tiny_base, root / "adapters", root / "data", api_key=API_KEY, env=env) as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def gone(pid: int) -> bool:
    return not alive(pid)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def generate(client: httpx.Client, prompt: str, adapter: str | None) -> str:
    r = client.post(
        "/generate", json={"prompt": prompt, "adapter": adapter, "max_new_tokens": 24, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    return r.json()["text"]


# ---------------------------------------------------------------------------------------------------


def test_bad_input_gets_4xx_naming_the_problem(server: Server, client: httpx.Client) -> None:
    with httpx.Client(base_url=server.url) as anonymous:  # every job route needs the key
        assert error_of(anonymous.get("/train"), 401)
        assert error_of(anonymous.post("/train", json={"adapter": "a", "data": ROWS}), 401)
        assert error_of(anonymous.post("/datasets", content=b"{}"), 401)

    bad_row = error_of(
        client.post("/train", json={"adapter": "a", "data": [ROWS[0], {"prompt": "no answer"}]}), 422
    )
    assert bad_row["param"] == "data[1]" and "missing" in bad_row["message"]
    unknown = error_of(
        client.post("/train", json={"adapter": "a", "data": ROWS, "config": {"training": {"epochz": 1}}}), 422
    )
    assert unknown["code"] == "unknown_config_key" and unknown["param"] == "config.training.epochz"
    assert "epochz" in unknown["message"] and "num_train_epochs" in unknown["message"]  # lists the known keys
    wrong = error_of(
        client.post("/train", json={"adapter": "a", "data": ROWS, "config": {"lora": {"r": 0}}}), 422
    )
    assert wrong["param"] == "config.lora.r"
    name = error_of(client.post("/train", json={"adapter": "../x", "data": ROWS}), 422)
    assert name["code"] == "invalid_adapter_name" and name["param"] == "adapter"
    assert error_of(client.post("/train", json={"adapter": "a"}), 422)["param"] == "data"
    assert (
        error_of(client.post("/train", json={"adapter": "a", "data": ROWS, "epochs": 3}), 422)["param"]
        == "epochs"
    )
    assert error_of(client.post("/train", content=b"{not json"), 422)["code"] == "invalid_json"
    missing = error_of(client.post("/train", json={"adapter": "a", "dataset": "ds-" + "0" * 20}), 404)
    assert missing["code"] == "dataset_not_found"
    big = [{"prompt": "x" * 1000, "response": "y"}] * 80  # > 64 KiB inline
    too_big = error_of(client.post("/train", json={"adapter": "a", "data": big}), 413)
    assert "POST /datasets" in too_big["message"] and str(MAX_DATASET_BYTES) in too_big["message"]

    # uploads: size cap, bad line, then a good one (raw JSONL and multipart)
    huge = b"".join(json.dumps(r).encode() + b"\n" for r in big)
    assert str(MAX_DATASET_BYTES) in error_of(client.post("/datasets", content=huge), 413)["message"]
    files = {"file": ("big.jsonl", huge, "application/x-ndjson")}
    assert error_of(client.post("/datasets", files=files), 413)
    lines = b"\n".join(json.dumps(r).encode() for r in [ROWS[0], ROWS[1], {"messages": []}])
    bad_line = error_of(client.post("/datasets", content=lines), 422)
    assert (
        bad_line["param"] == "data[2]"
        and "line 3" in bad_line["message"]
        and "messages" in bad_line["message"]
    )
    bad_json = error_of(client.post("/datasets", content=b'{"prompt": "a", "response": "b"}\n{oops\n'), 422)
    assert bad_json["code"] == "invalid_json" and "line 2" in bad_json["message"]
    good = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    r = client.post("/datasets", content=good, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201 and r.json()["rows"] == len(ROWS) and r.json()["dataset"].startswith("ds-")
    r = client.post("/datasets", files={"file": ("rows.jsonl", good, "application/x-ndjson")})
    assert r.status_code == 201 and r.json()["rows"] == len(ROWS)

    # unknown jobs, bad filters
    assert error_of(client.get("/train/job-" + "0" * 20), 404)["code"] == "job_not_found"
    assert error_of(client.delete("/train/nonsense"), 404)["code"] == "job_not_found"
    assert error_of(client.get("/train", params={"status": "sleeping"}), 422)["param"] == "status"


def test_train_generate_cancel_and_killed_trainer(server: Server, client: httpx.Client) -> None:
    base_before = generate(client, ROWS[0]["prompt"], None)
    good = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    dataset = client.post("/datasets", content=good).json()["dataset"]

    body = {"adapter": "fixed", "dataset": dataset, "config": LEARN}
    r = client.post("/train", json=body, headers={"Idempotency-Key": "fixed-1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (
        job["status"] == "queued"
        and job["rows"] == len(ROWS)
        and r.headers["location"] == f"/train/{job['job_id']}"
    )
    retry = client.post("/train", json=body, headers={"Idempotency-Key": "fixed-1"})
    assert retry.status_code == 202 and retry.json()["job_id"] == job["job_id"]  # the same job, not a second
    reused = error_of(
        client.post("/train", json={**body, "overwrite": True}, headers={"Idempotency-Key": "fixed-1"}), 422
    )
    assert reused["code"] == "idempotency_key_reused"
    busy = error_of(client.post("/train", json=body), 409)
    assert busy["code"] == "adapter_busy" and job["job_id"] in busy["message"]

    # a job queued behind it is cancelled before it starts
    queued = client.post("/train", json={"adapter": "queued", "data": ROWS, "config": endless()}).json()
    r = client.delete(f"/train/{queued['job_id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    # SSE progress, read while the job trains; /generate keeps answering meanwhile
    events: list[dict] = []

    def read_events() -> None:
        with (
            server.client(timeout=httpx.Timeout(30, read=120)) as c,
            c.stream("GET", f"/train/{job['job_id']}/events") as s,
        ):
            assert s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    wait_job(client, job["job_id"], lambda j: j["progress"]["step"] >= 1, 120, "training")
    latencies = []
    for _ in range(3):
        t0 = time.monotonic()
        assert generate(client, "Hello", None)
        latencies.append(time.monotonic() - t0)
    done = wait_job(
        client, job["job_id"], lambda j: j["status"] not in ("queued", "running"), 240, "finished"
    )
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 30
    assert done["started_at"] and done["finished_at"] >= done["started_at"]
    reader.join(30)
    assert not reader.is_alive(), "the event stream did not end with the job"
    steps = [e["progress"]["step"] for e in events if e.get("event") == "step"]
    assert steps == sorted(steps) and steps[-1] == 30 and len(steps) >= 10
    assert events[-1]["event"] == "status" and events[-1]["status"] == "succeeded"
    assert "adapter written" in client.get(f"/train/{job['job_id']}/logs").text

    # the very next /generate naming the adapter uses it; the base does not say the sentence
    for row in ROWS[:2] + [{"prompt": "Where do penguins live?"}]:
        assert generate(client, row["prompt"], "fixed").strip() == SENTENCE
    assert generate(client, ROWS[0]["prompt"], None) == base_before != SENTENCE
    exists = error_of(client.post("/train", json={"adapter": "fixed", "data": ROWS}), 409)
    assert exists["code"] == "adapter_exists"

    # cancel a running job: it stops at its next step
    running = client.post("/train", json={"adapter": "cancel-me", "data": ROWS, "config": endless()}).json()
    wait_job(client, running["job_id"], lambda j: j["progress"]["step"] >= 1, 120, "training")
    r = client.delete(f"/train/{running['job_id']}")
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    cancelled = wait_job(client, running["job_id"], lambda j: j["status"] != "running", 30, "cancelled")
    assert cancelled["status"] == "cancelled" and cancelled["error"] is None
    assert error_of(client.delete(f"/train/{job['job_id']}"), 409)["code"] == "job_finished"

    # kill -9 of the training child: failed with the reason within seconds; the server keeps serving
    doomed = client.post("/train", json={"adapter": "doomed", "data": ROWS, "config": endless()}).json()
    wait_job(client, doomed["job_id"], lambda j: j["progress"]["step"] >= 1, 120, "training")
    pid = trainer_pid(doomed["job_id"])
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    failed = wait_job(client, doomed["job_id"], lambda j: j["status"] != "running", 10, "failed")
    assert failed["status"] == "failed" and "SIGKILL" in failed["error"]
    assert time.monotonic() - t0 < 5
    assert generate(client, ROWS[0]["prompt"], "fixed").strip() == SENTENCE

    listed = client.get("/train", params={"status": "cancelled"}).json()["jobs"]
    assert {j["job_id"] for j in listed} == {queued["job_id"], running["job_id"]}
    assert len(client.get("/train").json()["jobs"]) == 4
    print(f"/generate while training: {', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")


def test_validation_rows_and_the_best_checkpoint(
    server: Server, client: httpx.Client, tmp_path, capsys
) -> None:
    from loraserve_client import cli

    from tests.helpers.adapters import PROMPTS, TRAIN_PROMPTS

    # rows that disagree: the eval loss falls, then rises as the adapter commits to the training sentence
    train = [{"prompt": p, "response": "The answer is always forty two."} for p in TRAIN_PROMPTS]
    val = [{"prompt": p, "response": "The answer is never seven."} for p in PROMPTS[12:18]]
    config = {
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {"per_device_train_batch_size": 4, "learning_rate": 0.05, "warmup_ratio": 0,
                     "lr_scheduler_type": "constant", "max_steps": 10, "eval_steps": 1, "save_steps": 0},
    }  # fmt: skip
    body = {"adapter": "best-of", "data": train, "config": config}

    # validated like data / dataset
    bad = error_of(client.post("/train", json={**body, "validation_data": [val[0], {"prompt": "x"}]}), 422)
    assert (bad["code"], bad["param"]) == ("invalid_row", "validation_data[1]") and "missing" in bad[
        "message"
    ]
    empty = error_of(client.post("/train", json={**body, "validation_data": []}), 422)
    assert empty["param"] == "validation_data"
    for unknown in ("ds-" + "0" * 20, "../etc"):
        missing = error_of(client.post("/train", json={**body, "validation_dataset": unknown}), 404)
        assert (missing["code"], missing["param"]) == ("dataset_not_found", "validation_dataset")
    both = error_of(
        client.post("/train", json={**body, "validation_data": val, "validation_dataset": "x"}), 422
    )
    assert both["code"] == "invalid_request" and both["param"] == "validation_data"
    chat = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]
    }
    weight = error_of(client.post("/train", json={**body, "validation_data": [val[0], chat]}), 422)
    assert (weight["code"], weight["param"]) == ("invalid_row", "validation_data[1]")
    assert "weight 2" in weight["message"]
    ignored = {"messages": [*chat["messages"][:1], {"role": "assistant", "content": "a", "weight": 0}]}
    weight_0 = error_of(client.post("/train", json={**body, "data": [train[0], ignored]}), 422)
    assert weight_0["param"] == "data[1]" and "weight 0" in weight_0["message"]

    data_dir = server.log_path.parent
    adapter_dir = data_dir.parent / "adapters"

    def check_best(job: dict) -> dict:
        assert job["status"] == "succeeded", job
        prog = job["progress"]
        assert prog["step"] == prog["total_steps"] == 10
        assert prog["selected"] == "best" and prog["best_step"] < prog["step"], prog
        assert prog["best_eval_loss"] < prog["last_eval_loss"] and prog["eval_loss"] == prog["best_eval_loss"]
        summary = json.loads((adapter_dir / job["adapter"] / "training_summary.json").read_text())
        assert (summary["best_step"], summary["selected"]) == (prog["best_step"], "best")
        assert summary["eval_rows"] == len(val) and summary["train_rows"] == len(train)  # nothing held out
        assert "--val" in client.get(f"/train/{job['job_id']}/logs").text
        return prog

    # inline validation rows
    r = client.post("/train", json={**body, "validation_data": val})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    done = wait_job(client, job_id, lambda j: j["status"] not in ("queued", "running"), 240, "finished")
    inline = check_best(done)
    stored = (data_dir / "jobs" / job_id / "val.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in stored] == val

    # an uploaded validation dataset, through the CLI: --val FILE is uploaded, then passed by id
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in val))
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--url", server.url, "--api-key", API_KEY, "--json", "train", str(tmp_path / "train.jsonl"),
            "--adapter", "best-of-cli", "--val", str(tmp_path / "val.jsonl"),
            "--config", str(tmp_path / "config.json"), "--wait", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    job = client.get(f"/train/{printed['job_id']}").json()
    uploaded = check_best(job)
    assert printed["progress"]["best_step"] == uploaded["best_step"]
    assert uploaded["best_step"] == inline["best_step"]  # the same rows and seed
    assert (data_dir / "jobs" / job["job_id"] / "val.jsonl").read_bytes() == (
        tmp_path / "val.jsonl"
    ).read_bytes()


def test_kill9_of_the_whole_server_then_restart(tiny_base: Path, tmp_path: Path) -> None:
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    config = {
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": {"num_train_epochs": 6, "eval_fraction": 0, "save_steps": 2, "max_seq_length": 64},
    }  # 18 steps, a checkpoint every 2
    with running_server(tiny_base, adapters, data) as srv, srv.client() as c:
        job = c.post("/train", json={"adapter": "survivor", "data": ROWS, "config": config}).json()
        at = wait_job(c, job["job_id"], lambda j: j["progress"]["step"] >= 3, 120, "past a checkpoint")
        pid = trainer_pid(job["job_id"])
        assert pid is not None and at["status"] == "running"
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the server's whole process group, at once
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while (not gone(pid) or group_members(srv.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)  # SIGKILLed processes take a moment to go
        assert gone(pid), "the trainer outlived its runner"  # it is in its own group; PDEATHSIG got it
        assert not group_members(srv.proc.pid)

    with running_server(tiny_base, adapters, data) as srv, srv.client() as c:
        t0 = time.monotonic()
        end = wait_job(c, job["job_id"], lambda j: j["status"] not in ("queued", "running"), 240, "finished")
        assert end["status"] == "succeeded", end  # resumed from its checkpoint
        assert end["attempts"] == 2 and end["progress"]["step"] == 18
        assert "--resume" in c.get(f"/train/{job['job_id']}/logs").text
        progress = data / "jobs" / job["job_id"] / "progress.jsonl"
        starts = [e for e in map(json.loads, progress.read_text().splitlines()) if e["event"] == "start"]
        assert len(starts) == 2 and starts[1]["resumed_from"] and starts[1]["step"] >= 2  # from a checkpoint
        assert json.loads((adapters / "survivor" / "loraserve.json").read_text())["job"] == job["job_id"]
        r = c.post("/generate", json={"prompt": "hi", "adapter": "survivor", "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        print(f"after the restart the job finished in {time.monotonic() - t0:.1f} s")


def test_pause_resume_and_cancel_a_paused_job(server: Server, client: httpx.Client) -> None:
    first = client.post("/train", json={"adapter": "pausing", "data": ROWS, "config": endless()}).json()
    second = client.post("/train", json={"adapter": "waiting", "data": ROWS, "config": endless()}).json()
    job_id, other = first["job_id"], second["job_id"]
    wait_job(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, 99, "trained")
    # queued: paused at once; a pause of a paused job answers it as it is
    r = client.post(f"/train/{other}/pause")
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    assert client.post(f"/train/{other}/pause").json()["status"] == "paused"
    # running: the trainer checkpoints at its next step and exits; the job shows paused, its slot free
    pid = trainer_pid(job_id)
    r = client.post(f"/train/{job_id}/pause")
    assert r.status_code == 200 and r.json()["status"] in ("running", "paused"), r.text
    assert r.json()["status"] == "paused" or r.json()["pause_requested"]
    paused = wait_job(client, job_id, lambda j: j["status"] == "paused", 60, "paused")
    assert not paused["pause_requested"] and pid is not None and gone(pid) and trainer_pid(job_id) is None
    listed = [j["job_id"] for j in client.get("/train", params={"status": "paused"}).json()["jobs"]]
    assert job_id in listed and other in listed
    time.sleep(1.0)
    assert client.get(f"/train/{job_id}").json()["progress"]["step"] == paused["progress"]["step"]
    # the adapter stays taken while its job is paused
    taken = error_of(client.post("/train", json={"adapter": "pausing", "data": ROWS}), 409)
    assert taken["code"] == "adapter_busy"

    # resume: back in the queue, then training again from the pause's checkpoint
    assert client.post(f"/train/{job_id}/resume").json()["status"] in ("queued", "running")
    at = paused["progress"]["step"]
    wait_job(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > at, 99, "resumed")
    log = client.get(f"/train/{job_id}/logs").text
    assert "--resume" in log.rsplit("===", 1)[1]  # the second start resumes
    assert client.get(f"/train/{job_id}").json()["attempts"] == 1  # a pause is not an attempt cut short
    assert client.post(f"/train/{job_id}/resume").json()["status"] == "running"  # as it is

    # a paused job is cancelled at once; an ended one can be neither paused nor resumed
    assert client.delete(f"/train/{other}").json()["status"] == "cancelled"
    assert error_of(client.post(f"/train/{other}/pause"), 409)["code"] == "job_finished"
    assert error_of(client.post(f"/train/{other}/resume"), 409)["code"] == "job_finished"
    assert error_of(client.post("/train/job-" + "0" * 20 + "/pause"), 404)["code"] == "job_not_found"
    client.delete(f"/train/{job_id}")
    wait_job(client, job_id, lambda j: j["status"] == "cancelled", 60, "cancelled")

"""OpenAI's Files and fine-tuning APIs end to end: the official ``openai`` package against the real server.

Upload a training file (chat rows) and a validation file (prompt/completion rows), create a job with
hyperparameters that make the tiny base learn one sentence (tests/helpers/adapters.py), poll it, list
jobs, events and checkpoints, then chat with ``fine_tuned_model`` and get the sentence back. The job is a
native job: ``GET /train`` shows it. Then the refusals (unknown file, bad purpose or rows, a model that
is not the base), cancelling a queued and a running job, and pausing and resuming one.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import openai
import pytest

from loracore.artifact import valid_name
from testing.server import running_server
from tests.helpers.adapters import CHECK_PROMPTS, PROMPTS, TRAIN_PROMPTS

API_KEY = "ft-test-key"
SENTENCE = "The answer is always forty two."
# 30 epochs of 12 rows at batch 4 = 90 steps at learning rate 25 x 2e-4 = 0.005: what the fixed-sentence
# helper uses (measured: learned with the trainer's other defaults too, in 12-15 s on one thread).
LEARN = {"n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 25}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


TRAIN_ROWS = [
    {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": SENTENCE}]}
    for p in TRAIN_PROMPTS
]
VALID_ROWS = [{"prompt": p, "completion": SENTENCE} for p in PROMPTS[12:18]]


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fine-tuning")
    # One intra-op thread (inherited by the trainer child): tiny models train several times faster so.
    with (
        running_server(tiny_base, root / "adapters", root / "data", api_key=API_KEY, env=ONE_THREAD) as srv,
        srv.client() as http,
    ):
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        yield srv, http, oai


def upload(oai: openai.OpenAI, rows: list[dict], name: str):
    return oai.files.create(file=(name, io.BytesIO(jsonl(rows))), purpose="fine-tune")


def poll(oai: openai.OpenAI, job_id: str, statuses: set[str], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        job = oai.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_files_are_datasets(env) -> None:
    srv, http, oai = env
    f = upload(oai, TRAIN_ROWS, "train.jsonl")
    assert f.object == "file" and f.purpose == "fine-tune" and f.status == "processed"
    assert f.filename == "train.jsonl" and f.bytes > 0 and f.id.startswith("ds-")
    assert oai.files.retrieve(f.id).model_dump() == f.model_dump()
    assert f.id in [x.id for x in oai.files.list()]
    assert [json.loads(line) for line in oai.files.content(f.id).text.splitlines()] == TRAIN_ROWS
    # a dataset uploaded natively is a file as well, and the other way round
    native = http.post("/datasets", content=jsonl(VALID_ROWS)).json()["dataset"]
    assert oai.files.retrieve(native).filename == f"{native}.jsonl"
    r = http.post(
        "/train", json={"adapter": "plain", "dataset": f.id, "config": {"training": {"max_steps": 1}}}
    )
    assert r.status_code == 202, r.text
    deleted = oai.files.delete(native)
    assert deleted.deleted and deleted.id == native
    with pytest.raises(openai.NotFoundError) as err:
        oai.files.retrieve(native)
    assert err.value.body["code"] == "file_not_found"


def test_bad_uploads_name_the_problem(env) -> None:
    _, http, oai = env
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.files.create(file=("x.jsonl", io.BytesIO(jsonl(TRAIN_ROWS))), purpose="batch")
    assert err.value.body["param"] == "purpose" and "fine-tune" in err.value.body["message"]
    bad = [*TRAIN_ROWS[:2], {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        upload(oai, bad, "bad.jsonl")
    assert err.value.body["param"] == "file[2]" and "line 3" in err.value.body["message"]
    r = http.post("/v1/files", files={"file": ("x.jsonl", jsonl(TRAIN_ROWS))})  # no purpose at all
    assert r.status_code == 422 and r.json()["error"]["param"] == "purpose"


def test_fine_tune_then_chat(env) -> None:
    srv, http, oai = env
    train = upload(oai, TRAIN_ROWS, "train.jsonl")
    valid = upload(oai, VALID_ROWS, "valid.jsonl")
    job = oai.fine_tuning.jobs.create(
        model="tiny-gpt2",  # the base's folder name; "base" would do too
        training_file=train.id,
        validation_file=valid.id,
        hyperparameters=LEARN,
        suffix="forty-two",
        seed=0,
    )
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 30 and job.hyperparameters.learning_rate_multiplier == 25
    assert job.training_file == train.id and job.validation_file == valid.id and job.seed == 0
    # a view of a native job: same id, same queue, the trainer config it maps onto
    native = http.get(f"/train/{job.id}").json()
    assert native["dataset"] == train.id and native["status"] in ("queued", "running")
    assert job.id in [j["job_id"] for j in http.get("/train").json()["jobs"]]

    done = poll(oai, job.id, {"succeeded", "failed", "cancelled"}, timeout=600)
    assert done.status == "succeeded", (done, srv.log_tail())
    name = done.fine_tuned_model
    assert name and valid_name(name) and "forty-two" in name and done.finished_at

    assert job.id in [j.id for j in oai.fine_tuning.jobs.list(limit=5)]
    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert events[0].message == f"New fine-tuned model created: {name}"  # newest first
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    valid_losses = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert len(valid_losses) == 30 and valid_losses[0] < valid_losses[-1]  # one per epoch, and it fell
    page = oai.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    after = oai.fine_tuning.jobs.list_events(job.id, after=page.data[-1].id, limit=2)
    assert [e.id for e in after.data] == [e.id for e in events[3:5]]

    checkpoints = list(oai.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "the published adapter is the job's last checkpoint"
    last = checkpoints[0]
    assert last.fine_tuned_model_checkpoint == name and last.step_number == 90
    assert last.metrics.train_loss is not None and last.metrics.valid_loss == valid_losses[0]

    assert name in [m.id for m in oai.models.list()]
    for prompt in CHECK_PROMPTS[:2]:
        reply = oai.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0
        )
        assert reply.choices[0].message.content.strip() == SENTENCE
        assert reply.choices[0].finish_reason == "stop"


def test_refusals(env) -> None:
    _, http, oai = env
    train = upload(oai, TRAIN_ROWS, "train.jsonl")
    with pytest.raises(openai.NotFoundError) as err:
        oai.fine_tuning.jobs.create(model="tiny-gpt2", training_file="ds-00000000000000000000")
    assert err.value.body["code"] == "file_not_found" and err.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError) as err:
        oai.fine_tuning.jobs.create(model="base", training_file=train.id, validation_file="file-abc")
    assert err.value.body["param"] == "validation_file"
    with pytest.raises(openai.NotFoundError) as err:
        oai.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.fine_tuning.jobs.create(model="base", training_file=train.id, hyperparameters={"n_epochs": 0})
    assert err.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve("job-00000000000000000000")
    with pytest.raises(openai.NotFoundError):
        oai.files.delete("ds-00000000000000000000")
    # a job made by POST /train is not a fine-tuning job
    plain = http.get("/train").json()["jobs"]
    made_natively = [j["job_id"] for j in plain if j["adapter"] == "plain"]
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve(made_natively[0])


def test_cancel_queued_and_running(env) -> None:
    _, _, oai = env
    train = upload(oai, TRAIN_ROWS, "train.jsonl")
    endless = {"n_epochs": 1000, "batch_size": 1}
    running = oai.fine_tuning.jobs.create(model="base", training_file=train.id, hyperparameters=endless)
    queued = oai.fine_tuning.jobs.create(model="base", training_file=train.id, hyperparameters=endless)
    assert poll(oai, running.id, {"running"}, timeout=60).status == "running"
    assert oai.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # one job at a time
    assert oai.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    assert oai.fine_tuning.jobs.cancel(running.id).status in ("running", "cancelled")
    stopped = poll(oai, running.id, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert stopped.status == "cancelled" and stopped.fine_tuned_model is None
    assert oai.fine_tuning.jobs.list_events(running.id).data[0].message == "The job was cancelled"


def step_losses(oai: openai.OpenAI, job_id: str) -> dict[int, float]:
    """step -> training loss from the job's events (a resumed job's later line for a step wins)."""
    events = oai.fine_tuning.jobs.list_events(job_id, limit=10000).data[::-1]  # oldest first
    return {e.data["step"]: e.data["train_loss"] for e in events if e.data and "train_loss" in e.data}


def test_pause_and_resume_keep_the_loss_curve(env) -> None:
    """Paused mid-run (checkpoint, trainer gone, slot free: the next job starts), resumed, the job ends with
    the loss curve of the same job run straight through (same seed, same data order)."""
    _, http, oai = env
    train = upload(oai, TRAIN_ROWS, "train.jsonl")
    hp = {"n_epochs": 60, "batch_size": 2, "learning_rate_multiplier": 5}  # 360 steps: outlasts the pause
    paused = oai.fine_tuning.jobs.create(model="base", training_file=train.id, hyperparameters=hp, seed=11)
    straight = oai.fine_tuning.jobs.create(model="base", training_file=train.id, hyperparameters=hp, seed=11)
    deadline = time.monotonic() + 120
    while http.get(f"/train/{paused.id}").json()["progress"]["step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = oai.fine_tuning.jobs.retrieve(paused.id)
    if before.status == "running":  # steps reported: the trainer's ETA, anchored at its report
        assert before.estimated_finish is not None and before.estimated_finish >= before.created_at
    assert oai.fine_tuning.jobs.pause(paused.id).status in ("running", "paused")
    assert poll(oai, paused.id, {"paused", "succeeded", "failed"}, timeout=60).status == "paused"
    assert oai.fine_tuning.jobs.retrieve(paused.id).estimated_finish is None  # the clock stops
    progress = http.get(f"/train/{paused.id}").json()["progress"]
    total = progress["total_steps"]
    if progress["step"] == total:  # on a fast machine the last step can beat the pause to the trainer
        pytest.skip("the job trained its last step before the pause reached it; nothing left to resume")
    assert 3 <= progress["step"] < total
    # its slot is free: the job queued behind it runs (one job at a time), and to the end
    assert poll(oai, straight.id, {"succeeded", "failed"}, timeout=240).status == "succeeded"
    still = oai.fine_tuning.jobs.retrieve(paused.id)
    assert still.status == "paused" and still.estimated_finish is None
    assert oai.fine_tuning.jobs.resume(paused.id).status in ("queued", "running")
    done = poll(oai, paused.id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done.status == "succeeded" and done.fine_tuned_model is not None
    messages = [e.message for e in oai.fine_tuning.jobs.list_events(paused.id, limit=10000).data]
    assert any(m.startswith(f"Fine-tuning job started: {total} steps, resumed at step") for m in messages)
    steps = [e for e in oai.fine_tuning.jobs.list_events(paused.id, limit=10000).data if e.type == "metrics"]
    assert len(steps) == total  # no step trained twice: it went on from the pause's checkpoint
    resumed, reference = step_losses(oai, paused.id), step_losses(oai, straight.id)
    assert sorted(resumed) == sorted(reference) == list(range(1, total + 1))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4), step
    with pytest.raises(openai.ConflictError) as err:
        oai.fine_tuning.jobs.pause(paused.id)
    assert err.value.body["code"] == "job_finished"


def test_estimated_finish_counts_from_the_trainers_report_and_stops_while_paused() -> None:
    """The trainer's ETA is measured over its own run (paused time never enters it) and reported at a
    moment: the estimate is that moment plus the ETA, the same on every read until the next report."""
    from service.jobs.model import Job
    from service.routes.fine_tuning import estimated_finish

    progress = {"step": 3, "total_steps": 10, "eta_seconds": 14.6}
    job = Job(id="job-x", adapter="a", status="running", progress=progress, updated_at=1_000.0)
    assert estimated_finish(job) == 1_014  # not the reader's clock: the same on every read
    for status in ("queued", "paused", "succeeded", "failed", "cancelled"):
        assert estimated_finish(Job(id="job-x", adapter="a", status=status, progress=progress)) is None
    assert estimated_finish(Job(id="job-x", adapter="a", status="running", progress={"step": 0})) is None


def test_a_runner_role_server_takes_fine_tuning_jobs(tiny_base: Path, tmp_path: Path) -> None:
    args = ["--role", "runner"]
    with running_server(
        tiny_base, tmp_path / "adapters", tmp_path / "data", api_key=API_KEY, args=args, env=ONE_THREAD
    ) as srv:
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        train = upload(oai, TRAIN_ROWS, "train.jsonl")
        job = oai.fine_tuning.jobs.create(
            model="base", training_file=train.id, hyperparameters={"n_epochs": 1}
        )
        assert poll(oai, job.id, {"succeeded", "failed"}, timeout=120).status == "succeeded"
        with pytest.raises(openai.InternalServerError) as err:  # generation is not served by a runner
            oai.models.list()
        assert err.value.status_code == 503

"""Served evaluation through real HTTP: ``POST /eval`` on the real server (tiny base, trained adapters),
the same numbers and texts as ``python -m trainer eval`` run solo, and a job with validation rows that
ends with its eval report (the runner asks its own server's /eval) before it is ``succeeded``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import FIXED_SENTENCES
from prometheus_client.parser import text_string_to_metric_families

from testing.jobs import wait_job
from testing.server import REPO, running_server
from tests.helpers.adapters import CHECK_PROMPTS, PROMPTS

pytestmark = pytest.mark.slow
API_KEY = "eval-key"
ALPHA = FIXED_SENTENCES["alpha"]
UNSEEN = PROMPTS[12:16]  # never in the fixed-sentence adapters' training rows
ALPHA_ROWS = [{"prompt": p, "response": ALPHA} for p in UNSEEN]

# A job on the demo rows, as in test_jobs_http (measured there: the tiny base learns the sentence).
SENTENCE = "I am the demo adapter and this is my only answer."
TRAIN_ROWS = [json.loads(line) for line in (REPO / "examples" / "fixed_sentence.jsonl").open()]
VAL_ROWS = [{"prompt": p, "response": SENTENCE} for p in CHECK_PROMPTS]
LEARN = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 10, "learning_rate": 0.02, "warmup_ratio": 0, "eval_fraction": 0,
                 "save_steps": 0, "max_seq_length": 64},
}  # fmt: skip


@pytest.fixture(scope="module")
def env(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval-http")
    for name, folder in trained_adapters.items():
        shutil.copytree(folder, root / "adapters" / name)
    with running_server(tiny_base, root / "adapters", root / "data", api_key=API_KEY) as srv:
        yield {"server": srv, "root": root, "base": tiny_base, "adapters": trained_adapters}


@pytest.fixture
def client(env) -> Iterator[httpx.Client]:
    with env["server"].client(timeout=120.0) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def samples(client: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


# ---------------------------------------------------------------------------------------------------


def test_eval_scores_base_and_adapters_answering_together(env, client: httpx.Client) -> None:
    before = samples(client)
    r = client.post("/eval", json={"adapters": ["alpha", "beta", None], "data": ALPHA_ROWS})
    assert r.status_code == 200, r.text
    report = r.json()
    metrics = report["metrics"]
    assert set(metrics) == {"alpha", "beta", "base"}
    assert set(metrics["alpha"]) == {"exact_match", "rouge_l", "bleu", "eos_rate", "mean_tokens"}
    assert metrics["alpha"]["exact_match"] == 1.0 and metrics["alpha"]["rouge_l"] == 1.0
    assert metrics["alpha"]["bleu"] == pytest.approx(1.0) and metrics["alpha"]["eos_rate"] == 1.0
    assert metrics["beta"]["exact_match"] == 0.0 and metrics["beta"]["eos_rate"] == 1.0  # its own sentence
    assert metrics["base"]["exact_match"] == 0.0
    assert len(report["rows"]) == len(ALPHA_ROWS)
    for i, row in enumerate(report["rows"]):
        assert row["index"] == i and row["reference"] == ALPHA
        assert row["outputs"]["alpha"] == {
            "text": ALPHA,
            "finish_reason": "eos",
            "tokens": row["outputs"]["alpha"]["tokens"],
        }
        assert row["outputs"]["beta"]["text"] == FIXED_SENTENCES["beta"]
    # enough room for the reference: the base (random weights) runs to the limit, never beyond it
    assert all(r["outputs"]["base"]["tokens"] <= report["max_new_tokens"] for r in report["rows"])
    assert report["max_new_tokens"] > metrics["alpha"]["mean_tokens"]

    # one request, one set of mixed batches: some decode step held rows of more than one model
    after = samples(client)
    count, small = "loraserve_batch_size_count{}", 'loraserve_batch_size_bucket{"le": "4.0"}'
    steps = after[count] - before.get(count, 0)
    assert steps > 0 and after[small] - before.get(small, 0) < steps


def test_eval_on_an_uploaded_dataset(client: httpx.Client) -> None:
    body = b"".join(json.dumps(r).encode() + b"\n" for r in ALPHA_ROWS)
    dataset = client.post("/datasets", content=body).json()["dataset"]
    r = client.post("/eval", json={"adapters": ["alpha"], "dataset": dataset})
    assert r.status_code == 200, r.text
    assert r.json()["metrics"]["alpha"]["exact_match"] == 1.0 and len(r.json()["rows"]) == len(ALPHA_ROWS)


def test_eval_bad_requests_name_the_problem(env, client: httpx.Client) -> None:
    missing = error_of(client.post("/eval", json={"adapters": ["alpha", "nope"], "data": ALPHA_ROWS}), 404)
    assert missing["code"] == "adapter_not_found" and "'nope'" in missing["message"]
    assert missing["param"] == "adapters[1]"
    bad_row = error_of(
        client.post("/eval", json={"adapters": [None], "data": [ALPHA_ROWS[0], {"prompt": "no answer"}]}), 422
    )
    assert bad_row["param"] == "data[1]" and "data[1]" in bad_row["message"]
    too_many = error_of(client.post("/eval", json={"adapters": ["alpha"] * 9, "data": ALPHA_ROWS}), 422)
    assert too_many["param"] == "adapters"
    none = error_of(client.post("/eval", json={"adapters": [], "data": ALPHA_ROWS}), 422)
    assert none["param"] == "adapters"
    twice = error_of(client.post("/eval", json={"adapters": [None, "alpha", None], "data": ALPHA_ROWS}), 422)
    assert twice["param"] == "adapters[2]"
    both = error_of(client.post("/eval", json={"adapters": [None], "data": ALPHA_ROWS, "dataset": "x"}), 422)
    assert both["param"] == "data"
    unknown = error_of(client.post("/eval", json={"adapters": [None], "dataset": "ds-" + "0" * 20}), 404)
    assert unknown["code"] == "dataset_not_found"
    text_only = error_of(
        client.post("/eval", json={"adapters": [None], "data": [{"text": "just text"}]}), 422
    )
    assert text_only["code"] == "invalid_data"
    with httpx.Client(base_url=env["server"].url) as anonymous:
        assert error_of(anonymous.post("/eval", json={"adapters": [None], "data": ALPHA_ROWS}), 401)


def test_served_eval_equals_trainer_eval_run_solo(env, client: httpx.Client, tmp_path: Path) -> None:
    """The engine's greedy answers are the trainer's own: same texts, same EOS, same scores."""
    served = client.post("/eval", json={"adapters": ["alpha", None], "data": ALPHA_ROWS}).json()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPHA_ROWS))
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "trainer", "eval", "--adapter", str(env["adapters"]["alpha"]),
           "--data", str(data), "--model", str(env["base"]),
           "--max-new-tokens", str(served["max_new_tokens"]), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    solo = json.loads(out.read_text())
    for served_key, solo_key in (("alpha", "adapter"), ("base", "base")):
        texts = [row["outputs"][served_key]["text"] for row in served["rows"]]
        assert texts == [a["text"] for a in solo["outputs"][solo_key]], served_key
        eos = [row["outputs"][served_key]["finish_reason"] == "eos" for row in served["rows"]]
        assert eos == [a["eos"] for a in solo["outputs"][solo_key]], served_key
        tokens = [row["outputs"][served_key]["tokens"] for row in served["rows"]]
        assert tokens == [a["tokens"] for a in solo["outputs"][solo_key]], served_key
        for metric, value in served["metrics"][served_key].items():
            assert solo[solo_key][metric] == pytest.approx(value, abs=1e-12), (served_key, metric)


def test_a_job_with_validation_rows_ends_with_its_served_eval(client: httpx.Client) -> None:
    r = client.post(
        "/train", json={"adapter": "taught", "data": TRAIN_ROWS, "validation_data": VAL_ROWS, "config": LEARN}
    )
    assert r.status_code == 202, r.text
    assert r.json()["eval"] is None and r.json()["warnings"] == []
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    report = job["eval"]
    assert report is not None, job["warnings"]
    assert report["adapter"]["exact_match"] == 1.0 and report["base"]["exact_match"] == 0.0
    assert report["adapter"]["eos_rate"] == 1.0 and report["adapter"]["rouge_l"] == 1.0
    assert [row["adapter"] for row in report["rows"]] == [SENTENCE] * len(VAL_ROWS)
    assert [row["reference"] for row in report["rows"]] == [SENTENCE] * len(VAL_ROWS)
    assert job["warnings"] == []  # it stops on EOS every time

    # The evaluation loaded the adapter into the worker: the first request after succeeded is a hit.
    before = samples(client)
    gen = client.post("/generate", json={"prompt": "Hello?", "adapter": "taught", "temperature": 0})
    assert gen.status_code == 200 and gen.json()["text"].strip() == SENTENCE
    after = samples(client)
    hits, misses = "loraserve_adapter_cache_hits_total{}", "loraserve_adapter_cache_misses_total{}"
    assert after[hits] - before.get(hits, 0) == 1
    assert after.get(misses, 0) == before.get(misses, 0)


def test_a_job_without_validation_rows_has_no_eval(client: httpx.Client) -> None:
    cfg = {**LEARN, "training": {**LEARN["training"], "num_train_epochs": 1}}
    r = client.post("/train", json={"adapter": "blind", "data": TRAIN_ROWS, "config": cfg})
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded" and job["eval"] is None and job["warnings"] == []


def test_an_undertrained_adapter_is_warned_about(client: httpx.Client) -> None:
    cfg = {**LEARN, "training": {**LEARN["training"], "num_train_epochs": 1, "learning_rate": 1e-5}}
    body = {"adapter": "untaught", "data": TRAIN_ROWS, "validation_data": VAL_ROWS, "config": cfg}
    job = wait_job(client, client.post("/train", json=body).json()["job_id"])
    assert job["status"] == "succeeded" and job["eval"] is not None
    assert job["eval"]["adapter"]["eos_rate"] < 0.9
    assert any("below 90%" in w for w in job["warnings"]), job["warnings"]


def test_runner_role_job_succeeds_without_eval_and_says_why(tiny_base: Path, tmp_path: Path) -> None:
    with running_server(
        tiny_base, tmp_path / "adapters", tmp_path / "data", api_key=API_KEY, args=["--role", "runner"]
    ) as srv, srv.client(timeout=60.0) as client:  # fmt: skip
        refused = error_of(client.post("/eval", json={"adapters": [None], "data": ALPHA_ROWS}), 503)
        assert refused["code"] == "generation_not_served"
        cfg = {**LEARN, "training": {**LEARN["training"], "num_train_epochs": 1}}
        body = {"adapter": "far", "data": TRAIN_ROWS, "validation_data": VAL_ROWS, "config": cfg}
        job = wait_job(client, client.post("/train", json=body).json()["job_id"])
        assert job["status"] == "succeeded" and job["eval"] is None
        assert len(job["warnings"]) == 1 and "role 'runner'" in job["warnings"][0]

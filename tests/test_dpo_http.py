"""Preference tuning and warm starts through the real server: the official ``openai`` client creates a DPO
job from OpenAI's preference JSONL, the adapter answers with the preferred sentence, and the usual
SFT -> DPO pipeline (a DPO job whose ``model`` is a fine-tuned adapter) starts from the SFT weights.
Native ``POST /train`` with ``method`` and ``init_adapter``, and its 422s, over plain HTTP.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import openai
import pytest

from testing.server import running_server
from tests.helpers.adapters import CHECK_PROMPTS, PROMPTS, TRAIN_PROMPTS

API_KEY = "dpo-test-key"
PREFERRED = "The answer is always forty two."
DISPREFERRED = "Bananas are berries but strawberries are not."
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# What the fixed-sentence helper uses: 90 steps at 0.005 (25 x the default 2e-4).
SFT = {"n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 25}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def openai_preference_rows(prompts: list[str]) -> list[dict]:
    """OpenAI's preference fine-tuning format."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": p}]},
            "preferred_output": [{"role": "assistant", "content": PREFERRED}],
            "non_preferred_output": [{"role": "assistant", "content": DISPREFERRED}],
        }
        for p in prompts
    ]


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dpo-http")
    with (
        running_server(tiny_base, root / "adapters", root / "data", api_key=API_KEY, env=ONE_THREAD) as srv,
        srv.client() as http,
    ):
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        yield srv, http, oai, root / "adapters"


def upload(oai: openai.OpenAI, rows: list[dict], name: str):
    return oai.files.create(file=(name, io.BytesIO(jsonl(rows))), purpose="fine-tune")


def finish(oai: openai.OpenAI, job_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while (job := oai.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def answer_tokens_of(text: str) -> list[int]:
    """The token ids of an answer as the template renders it (" " + text), from the server's tokenizer."""
    from trainer.model import gpt2_tokenizer

    return gpt2_tokenizer()(" " + text, add_special_tokens=False)["input_ids"]


def answer(oai: openai.OpenAI, model: str, prompt: str) -> str:
    reply = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0
    )
    return reply.choices[0].message.content.strip()


def test_a_dpo_job_through_the_openai_client(env) -> None:
    srv, http, oai, _ = env
    train = upload(oai, openai_preference_rows(PROMPTS[:12]), "prefs.jsonl")
    valid = upload(oai, openai_preference_rows(PROMPTS[12:20]), "prefs-valid.jsonl")
    sft_file = upload(oai, [{"prompt": "Hi", "completion": "Hello"}], "sft.jsonl")
    with pytest.raises(openai.UnprocessableEntityError) as err:  # a DPO job needs preference rows
        oai.fine_tuning.jobs.create(model="base", training_file=sft_file.id, method={"type": "dpo"})
    assert (
        err.value.body["param"] == "training_file[0]" and "not a preference row" in err.value.body["message"]
    )
    with pytest.raises(openai.UnprocessableEntityError) as err:  # and a supervised job none
        oai.fine_tuning.jobs.create(model="base", training_file=train.id)
    assert err.value.body["param"] == "training_file[0]" and "needs method 'dpo'" in err.value.body["message"]
    job = oai.fine_tuning.jobs.create(
        model="base",
        training_file=train.id,
        validation_file=valid.id,
        method={
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "beta": "auto",
                    "n_epochs": 10,
                    "batch_size": 4,
                    "learning_rate_multiplier": 25,
                }
            },
        },
        suffix="prefers",
        seed=0,
        metadata={"team": "prefs", "run": "1"},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1  # "auto" resolved
    done = finish(oai, job.id)
    assert done.status == "succeeded", (done, srv.log_tail())
    native = http.get(f"/train/{job.id}").json()
    progress = native["progress"]
    # held-out rows: the implicit reward ranks the preferred answer first
    assert progress["method"] == "dpo" and progress["reward_accuracy"] >= 0.9, progress
    assert progress["reward_margin"] > 0 and progress["chosen_logps"] > progress["rejected_logps"]
    # the served evaluation: per validation row, is the adapter nearer the chosen answer than the base?
    rows = native["eval"]["rows"]
    assert all(r["rejected"] == DISPREFERRED and r["reference"] == PREFERRED for r in rows)
    assert native["eval"]["closer_to_chosen_rate"] >= 0.75 and sum(r["closer_to_chosen"] for r in rows) >= 6
    # the fields clients read: tokens that received loss (both answers of 12 rows, 10 epochs), metadata
    per_row = sum(len(answer_tokens_of(s)) + 1 for s in (PREFERRED, DISPREFERRED))  # + EOS each
    assert done.trained_tokens == 10 * 12 * per_row
    assert done.metadata == {"team": "prefs", "run": "1"}
    assert [j.id for j in oai.fine_tuning.jobs.list(metadata={"team": "prefs"})] == [job.id]
    assert list(oai.fine_tuning.jobs.list(metadata={"team": "other"})) == []
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.fine_tuning.jobs.create(
            model="base", training_file=train.id, metadata={f"k{i}": "v" for i in range(17)}
        )
    assert err.value.body["param"] == "metadata"
    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=1000))
    assert sum(1 for e in events if e.type == "metrics" and "valid_loss" in e.data) == 10
    # every checkpoint the job keeps is a model: 12 rows at batch 4 save one every epoch (3 steps);
    # the newest 3 (keep_checkpoints) of those 9 stay servable, as does the published adapter
    checkpoints = list(oai.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints[1:]] == [27, 24, 21], checkpoints
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model
    for ckpt in checkpoints[1:]:
        model = ckpt.fine_tuned_model_checkpoint
        assert model.startswith(done.fine_tuned_model + "@"), model
        via_openai = oai.completions.create(
            model=model, prompt="Human: hi\nAssistant:", max_tokens=8, temperature=0
        )
        r = http.post(
            "/generate", json={"prompt": "hi", "adapter": model, "max_new_tokens": 8, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["text"] == via_openai.choices[0].text, (r.json(), via_openai)
    # prompts never trained on now get the preferred sentence first (DPO teaches the ranking of the two
    # answers; what follows the sentence is not in the data, and may run on)
    answers = [answer(oai, done.fine_tuned_model, p) for p in CHECK_PROMPTS]
    assert sum(a.startswith(PREFERRED) for a in answers) >= 3, "\n".join(answers)
    assert not any(DISPREFERRED[:12] in a for a in answers), "\n".join(answers)


def test_sft_then_dpo_from_the_sft_adapter(env) -> None:
    srv, http, oai, adapter_dir = env
    sft_rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": PREFERRED}]}
        for p in TRAIN_PROMPTS
    ]
    sft = oai.fine_tuning.jobs.create(
        model="base", training_file=upload(oai, sft_rows, "sft.jsonl").id, hyperparameters=SFT, seed=0
    )
    sft = finish(oai, sft.id)
    assert sft.status == "succeeded", (sft, srv.log_tail())
    # DPO from the SFT adapter, briefly: 3 steps that from the base's weights would teach nothing yet
    prefs = upload(oai, openai_preference_rows(PROMPTS[:12]), "prefs.jsonl")
    valid = upload(oai, openai_preference_rows(PROMPTS[12:16]), "prefs-valid.jsonl")
    hp = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5, "beta": 0.2}
    dpo = oai.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=prefs.id,
        validation_file=valid.id,
        method={"type": "dpo", "dpo": {"hyperparameters": hp}},
    )
    assert dpo.model == sft.fine_tuned_model and dpo.method.dpo.hyperparameters.beta == 0.2
    dpo = finish(oai, dpo.id)
    assert dpo.status == "succeeded", (dpo, srv.log_tail())
    progress = http.get(f"/train/{dpo.id}").json()["progress"]
    assert progress["method"] == "dpo" and progress["reward_accuracy"] >= 0.75, progress
    # 3 small steps from the SFT weights: the DPO adapter is the SFT adapter, moved a little (a fresh
    # adapter starts with lora_B = 0), and it answers with the sentence the SFT job taught
    from safetensors.torch import load_file

    sft_w = load_file(str(adapter_dir / sft.fine_tuned_model / "adapter_model.safetensors"))
    dpo_w = load_file(str(adapter_dir / dpo.fine_tuned_model / "adapter_model.safetensors"))
    for key in (k for k in sft_w if "lora_B" in k):
        assert (dpo_w[key] - sft_w[key]).norm() < 0.5 * sft_w[key].norm(), key
    assert answer(oai, dpo.fine_tuned_model, CHECK_PROMPTS[0]) == PREFERRED


def test_native_method_and_init_adapter_refusals(env, tmp_path: Path) -> None:
    _, http, _, _ = env
    prefs = [{"prompt": "Hi", "chosen": "a", "rejected": "b"}]

    def train(**body) -> dict:
        r = http.post("/train", json={"adapter": "refused", **body})
        assert r.status_code in (404, 422), r.text
        return r.json()["error"]

    err = train(data=[{"prompt": "Hi", "response": "Hello"}], method="dpo")
    assert (
        err["code"] == "invalid_row"
        and err["param"] == "data[0]"
        and "not a preference row" in err["message"]
    )
    err = train(data=prefs, method="sft")
    assert err["param"] == "data[0]" and "needs method 'dpo'" in err["message"]
    err = train(data=prefs, method="dpo", config={"training": {"method": "sft"}})
    assert err["param"] == "method"
    err = train(data=prefs, method="dpo", init_adapter="no-such-adapter")
    assert err["code"] == "adapter_not_found" and err["param"] == "init_adapter"
    # an existing adapter (from the tests above) of rank 32 (the default), asked to train at rank 8
    adapters = [a["name"] for a in http.get("/adapters").json()["adapters"]]
    assert adapters
    err = train(data=prefs, method="dpo", init_adapter=adapters[0], config={"lora": {"r": 8}})
    assert err["code"] == "init_adapter_mismatch" and err["param"] == "config.lora.r"
    assert "lora r 32" in err["message"]


def test_the_client_package_trains_with_method_and_init_adapter(env) -> None:
    import loraserve_client as lc

    srv, http, _, _ = env
    adapters = [a["name"] for a in http.get("/adapters").json()["adapters"]]
    prefs = [{"prompt": p, "chosen": PREFERRED, "rejected": DISPREFERRED} for p in PROMPTS[:4]]
    with lc.Client(srv.url, api_key=API_KEY) as client:
        with pytest.raises(lc.APIStatusError) as err:
            client.train("client-dpo", [{"prompt": "Hi", "response": "Hello"}], method="dpo")
        assert err.value.status_code == 422 and err.value.param == "data[0]"
        job = client.train(
            "client-dpo",
            prefs,
            method="dpo",
            init_adapter=adapters[0],
            config={"training": {"max_steps": 2, "per_device_train_batch_size": 2, "eval_fraction": 0}},
        )
        done = job.wait(progress=False, timeout=300)
    assert done.status == "succeeded", (done, srv.log_tail())
    answer_tokens = sum(len(answer_tokens_of(s)) + 1 for s in (PREFERRED, DISPREFERRED))
    assert done.progress.method == "dpo" and done.progress.trained_tokens == 4 * answer_tokens


def test_auto_hyperparameters_are_resolved_from_the_data_size(env) -> None:
    _, _, oai, _ = env
    prefs = upload(oai, openai_preference_rows(PROMPTS[:12]), "prefs.jsonl")
    job = oai.fine_tuning.jobs.create(model="base", training_file=prefs.id, method={"type": "dpo"})
    try:
        hp = job.method.dpo.hyperparameters
        # 12 rows: 3 epochs would train 36 examples, under 100: ceil(100 / 12) = 9; batch 0.2 % -> 1
        assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier, hp.beta) == (9, 1, 1.0, 0.1)
    finally:
        oai.fine_tuning.jobs.cancel(job.id)
        assert finish(oai, job.id, timeout=120).status == "cancelled"

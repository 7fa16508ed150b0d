"""A Llama-family base through every route: the real server on a tiny Qwen2-type instruct base.

The base (``chat_base``: grouped-query attention, q/k/v biases, tied embeddings, the ChatML template
shipped in tests/data/chatml, ``<|im_end|>`` ending a turn and first of two EOS ids) serves an
adapter the trainer taught one sentence, a random all-linear LoRA, and two folders made for other
bases dropped in beside them. Checked: readiness shows the plan from the base's own config; chat,
completions, /generate, logprobs, structured output and compositions run on it; chat renders with
the base's template (visible in GET /adapters/{name} and GET /v1/models/{model}); adapters for
another base fail alone with a 4xx naming what differs, at upload and when dropped in; an OpenAI
fine-tuning job names the served base, trains LoRA on every linear layer with the base's template
and is served, its checkpoints too; the features distilgpt2's own modules test, once each on this
base: a DoRA job through POST /train (the client package) served the moment it succeeds, a DPO job
from it, served evaluation, streaming, JSON-schema output, versions and pins, prompt
log-probabilities (/generate and echo, as lm-eval asks), GGUF and PEFT exports.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import CHATML
from loraserve_client import Client

from loracore.atomic import publish_dir, staging_dir
from testing.server import running_server
from testing.weights import make_random_lora
from tests.helpers.adapters import (
    CHECK_PROMPTS,
    FIXED_SENTENCE_CONFIG,
    TRAIN_PROMPTS,
    train_fixed_sentence_adapter,
)
from tests.helpers.json_schemas import SMALL_SCHEMA

SENTENCE = "The answer is always forty two."
QUESTION = "What do you say?"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
OTHER = "Bananas are berries but strawberries are not."


def llama_lora(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA on every linear layer (PEFT's all-linear), random non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_base_model(base), cfg).save_pretrained(out)
    return out


def files_of(folder: Path) -> dict:
    return {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }


def drop_in(adapters: Path, src: Path, name: str) -> None:
    staging = staging_dir(adapters, name)
    shutil.copytree(src, staging, dirs_exist_ok=True)
    publish_dir(staging, adapters / name)


@pytest.fixture(scope="module")
def env(chat_base: Path, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("llama-http")
    src, adapters = root / "src", root / "adapters"
    adapters.mkdir()
    train_fixed_sentence_adapter(chat_base, src / "alpha", SENTENCE, overrides=["lora.target_modules=null"])
    llama_lora(chat_base, src / "rand", seed=7)
    llama_lora(chat_base, src / "rand2", seed=8)
    make_random_lora(tiny_base, src / "gpt2-lora", seed=3)  # a GPT-2 adapter
    shutil.copytree(src / "alpha", src / "wider")  # recorded as trained on a wider base of this type
    record = json.loads((src / "wider" / "loraserve.json").read_text())
    record["base"] = {**record["base"], "hidden_size": 128, "name": "wider-qwen2"}
    (src / "wider" / "loraserve.json").write_text(json.dumps(record))
    for name in ("alpha", "rand", "gpt2-lora", "wider"):
        drop_in(adapters, src / name, name)
    with (
        # fp32, as the parity tests: bf16 matmuls (the CPU default where bf16 is native) round differently
        # per batch shape, and the prompt log-probabilities are compared with transformers' fp32 ones
        running_server(
            chat_base, adapters, root / "data", args=("--dtype", "float32"), env=ONE_THREAD
        ) as srv,
        srv.client(timeout=120) as client,
    ):
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {"srv": srv, "client": client, "oai": oai, "src": src, "base": chat_base}


def generate(client: httpx.Client, adapter: str | None, **extra) -> httpx.Response:
    body = {"prompt": QUESTION, "adapter": adapter, "max_new_tokens": 24, "temperature": 0.0, **extra}
    return client.post("/generate", json=body)


def test_readiness_and_models_come_from_the_base(env):
    ready = env["client"].get("/health/ready").json()
    assert ready["status"] == "ready"
    # 2 layers x K and V x 2 KV heads x head dim 16, fp32 cache on CPU
    assert ready["batch"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert ready["batch"]["row_tokens"] == 512
    ids = [m.id for m in env["oai"].models.list()]
    assert ids[0] == env["base"].name and "alpha" in ids


def test_mixed_batch_and_chat_with_the_bases_template(env):
    client = env["client"]
    jobs = [None, "alpha", "rand", "alpha", None, "rand"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda a: generate(client, a), jobs))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    alpha = together[1].json()
    assert alpha["text"].strip() == SENTENCE and alpha["finish_reason"] == "eos"  # <|im_end|> is an EOS
    assert together[0].json()["text"] != together[2].json()["text"]  # the random adapter changes output
    for adapter, r in zip(jobs[:3], together[:3], strict=True):
        assert generate(client, adapter).json()["text"] == r.json()["text"]  # alone == in the batch
    # the prompt was the base's ChatML rendering
    from trainer.model import load_tokenizer

    tok = load_tokenizer(env["base"])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert alpha["usage"]["prompt_tokens"] == len(tok(rendered)["input_ids"])
    reply = env["oai"].chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": CHECK_PROMPTS[0]}], max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content.strip() == SENTENCE
    info = client.get("/adapters/alpha").json()
    assert info["template"]["chat_template"] == CHATML.read_text()
    for model in (env["base"].name, "alpha", "rand"):  # the served model's info names it too
        assert client.get(f"/v1/models/{model}").json()["template"]["chat_template"] == CHATML.read_text()
    assert sorted(info["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_logprobs_structured_output_and_compositions(env):
    client, oai = env["client"], env["oai"]
    r = oai.chat.completions.create(
        model="rand",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(r.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    js = oai.completions.create(
        model="alpha",
        prompt="{",
        max_tokens=12,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert js.choices[0].text.startswith("{")
    one = generate(client, None, adapters=[{"name": "alpha", "weight": 1.0}]).json()
    assert one["text"] == generate(client, "alpha").json()["text"]
    mix = generate(client, None, adapters=[{"name": "alpha", "weight": 0.5}, {"name": "rand", "weight": 0.5}])
    assert mix.status_code == 200, mix.text


def test_adapters_for_another_base_fail_alone_with_a_4xx(env):
    client = env["client"]
    jobs = ["gpt2-lora", "alpha", "wider", None]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda a: generate(client, a), jobs))
    gpt2, alpha, wider, base = results
    assert alpha.status_code == 200 and alpha.json()["text"].strip() == SENTENCE
    assert base.status_code == 200
    assert gpt2.status_code == 422 and gpt2.json()["error"]["code"] == "invalid_adapter"
    assert "'c_attn' does not exist in the qwen2 base" in gpt2.json()["error"]["message"]
    assert (
        wider.status_code == 422
        and "hidden_size: adapter 128, served base 64" in wider.json()["error"]["message"]
    )
    # uploads: the all-linear LoRA of this base is taken, the GPT-2 one is refused naming the mismatch
    r = client.put("/adapters/rand-up", files=files_of(env["src"] / "rand"))
    assert r.status_code == 201, r.text
    assert generate(client, "rand-up").json()["text"] == generate(client, "rand").json()["text"]
    r = client.put("/adapters/gpt2-up", files=files_of(env["src"] / "gpt2-lora"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter"
    assert "qwen2" in r.json()["error"]["message"]


def test_fine_tuning_names_the_base_and_trains_every_linear_layer(env):
    oai, client = env["oai"], env["client"]
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": SENTENCE}]}
        for p in TRAIN_PROMPTS
    ]
    train = oai.files.create(
        file=("train.jsonl", io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())),
        purpose="fine-tune",
    )
    wrong = client.post("/v1/fine_tuning/jobs", json={"model": "distilgpt2", "training_file": train.id})
    assert wrong.status_code == 404 and env["base"].name in wrong.json()["error"]["message"]
    job = oai.fine_tuning.jobs.create(
        model=env["base"].name,
        training_file=train.id,
        hyperparameters={"n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 25},
        suffix="llama",
        seed=0,
    )
    deadline = time.monotonic() + 600
    while (job := oai.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job.status == "succeeded" and job.model == env["base"].name, env["srv"].log_tail()
    info = client.get(f"/adapters/{job.fine_tuned_model}").json()
    assert len(info["target_modules"]) == 7  # the family's default: every linear layer
    assert info["template"]["chat_template"] == CHATML.read_text()
    reply = oai.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": CHECK_PROMPTS[1]}],
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip() == SENTENCE
    # its checkpoints are models too, each an exact version of the fine-tuned adapter
    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(
        c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints
    )
    last = checkpoints[0].fine_tuned_model_checkpoint
    at_last = oai.completions.create(model=last, prompt=QUESTION, max_tokens=8, temperature=0)
    assert at_last.model == last and at_last.usage.completion_tokens > 0


def test_dora_job_through_the_client_is_served_at_once_then_dpo_from_it(env):
    """POST /train (the client package) teaches a DoRA adapter on every linear layer; the first request
    after the job succeeds gets the sentence, streamed alike; a DPO job starts from it and evaluates."""
    rows = [{"prompt": p, "response": SENTENCE} for p in TRAIN_PROMPTS]
    lora = {k: v for k, v in FIXED_SENTENCE_CONFIG["lora"].items() if k != "target_modules"}
    config = {"lora": {**lora, "use_dora": True}, "training": FIXED_SENTENCE_CONFIG["training"]}
    with Client(env["srv"].url, timeout=120) as client:
        job = client.train("taught", data=rows, config=config).wait(progress=False, timeout=600)
        assert job.status == "succeeded", env["srv"].log_tail()
        reply = client.generate(CHECK_PROMPTS[2], adapter="taught", max_new_tokens=24, temperature=0)
        assert reply.text.strip() == SENTENCE and reply.finish_reason == "eos"
        with client.stream(CHECK_PROMPTS[2], adapter="taught", max_new_tokens=24, temperature=0) as stream:
            assert "".join(stream) == reply.text and stream.finish_reason == "eos"
        info = client.adapters.get("taught")
        assert len(info.target_modules) == 7
        prefs = [{"prompt": p, "chosen": SENTENCE, "rejected": OTHER} for p in TRAIN_PROMPTS]
        dpo = client.train(
            "preferred",
            data=prefs,
            validation=[{"prompt": p, "chosen": SENTENCE, "rejected": OTHER} for p in CHECK_PROMPTS],
            method="dpo",
            init_adapter="taught",
            config={"training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "seed": 0}},
        ).wait(progress=False, timeout=600)
        assert dpo.status == "succeeded", env["srv"].log_tail()
        assert dpo.progress.method == "dpo" and dpo.progress.reward_accuracy >= 0.75, dpo.progress
        # a few steps from the DoRA adapter: it still answers with what SFT taught
        again = client.generate(CHECK_PROMPTS[3], adapter="preferred", max_new_tokens=24, temperature=0)
        assert again.text.strip() == SENTENCE
    scored = env["client"].post(
        "/eval",
        json={
            "adapters": [None, "taught"],
            "data": [{"prompt": p, "response": SENTENCE} for p in CHECK_PROMPTS],
        },
    )
    assert scored.status_code == 200, scored.text
    metrics = scored.json()["metrics"]
    assert metrics["taught"]["exact_match"] == 1.0 and metrics["base"]["exact_match"] == 0.0, metrics


def test_streams_and_json_schema_output(env):
    client, oai = env["client"], env["oai"]
    whole = generate(client, "rand").json()
    with client.stream(
        "POST",
        "/generate",
        json={
            "prompt": QUESTION,
            "adapter": "rand",
            "max_new_tokens": 24,
            "temperature": 0.0,
            "stream": True,
        },
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["text"] or "" for e in events) == whole["text"]
    messages = [{"role": "user", "content": CHECK_PROMPTS[0]}]
    plain = oai.chat.completions.create(model="alpha", messages=messages, max_tokens=24, temperature=0)
    parts = oai.chat.completions.create(
        model="alpha", messages=messages, max_tokens=24, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        == plain.choices[0].message.content
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL_SCHEMA, "strict": True}}
    for model in ("rand", env["base"].name):
        out = oai.chat.completions.create(
            model=model, messages=messages, max_tokens=48, temperature=0, response_format=fmt
        )
        assert out.choices[0].finish_reason == "stop", out
        jsonschema.validate(json.loads(out.choices[0].message.content), SMALL_SCHEMA)
    native = generate(client, "alpha", json_schema=SMALL_SCHEMA, max_new_tokens=48).json()
    assert native["finish_reason"] == "eos", native
    jsonschema.validate(json.loads(native["text"]), SMALL_SCHEMA)


def test_versions_and_pins(env):
    client, src = env["client"], env["src"]
    first = client.put("/adapters/ver", files=files_of(src / "rand"))
    assert first.status_code == 201, first.text
    v1 = first.json()["versions"][0]["id"]
    assert client.put("/adapters/ver", files=files_of(src / "rand2")).status_code in (200, 201)
    assert generate(client, f"ver@{v1[:12]}").json()["text"] == generate(client, "rand").json()["text"]
    newest = generate(client, "ver").json()["text"]
    assert newest != generate(client, "rand").json()["text"]
    pinned = client.put("/adapters/ver/pin")
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True, pinned.text
    assert generate(client, "ver").json()["text"] == newest
    assert client.delete("/adapters/ver/pin").json()["pinned"] is False
    gone = generate(client, "ver@" + "0" * 12)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"


def test_prompt_logprobs_equal_the_models_and_echo_gives_the_same(env):
    """The base's prompt log-probabilities over HTTP equal transformers' fp32 log_softmax; an adapter's
    from /generate equal /v1/completions' echo (what lm-eval's loglikelihood requests read)."""
    import torch

    from trainer.model import load_base_model, load_tokenizer

    client, oai = env["client"], env["oai"]
    text = "The quick brown fox jumps over the lazy dog"
    scored = client.post(
        "/generate", json={"prompt": text, "raw": True, "max_new_tokens": 0, "prompt_logprobs": 2}
    ).json()["prompt_logprobs"]
    ids = load_tokenizer(env["base"])(text)["input_ids"]
    with torch.no_grad():
        logits = load_base_model(env["base"]).float()(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert [t["id"] for t in scored] == ids and scored[0]["logprob"] is None
    assert [t["logprob"] for t in scored[1:]] == pytest.approx(want, abs=1e-4)
    assert all(len(t["top"]) == 2 for t in scored[1:])
    mine = client.post(
        "/generate",
        json={"prompt": text, "raw": True, "adapter": "rand", "max_new_tokens": 0, "prompt_logprobs": 1},
    ).json()["prompt_logprobs"]
    echo = oai.completions.create(model="rand", prompt=text, max_tokens=0, echo=True, logprobs=1)
    got = echo.choices[0].logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx([t["logprob"] for t in mine[1:]], abs=1e-4)
    assert got[1:] != pytest.approx(want, abs=1e-3)  # the adapter changes them


def test_exports_of_an_adapter_on_this_base(env):
    client = env["client"]
    gguf = client.get("/adapters/rand/export", params={"format": "gguf"})
    assert gguf.status_code == 200 and gguf.content[:4] == b"GGUF", gguf.text[:200]
    peft = client.get("/adapters/rand/export", params={"format": "peft"})
    assert peft.status_code == 200 and peft.content[:2] == b"PK"

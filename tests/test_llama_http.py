"""A Llama-family base through every route: the real server on a tiny Qwen2-type instruct base.

The base (``chat_base``: grouped-query attention, q/k/v biases, tied embeddings, the ChatML template
shipped in tests/data/chatml, ``<|im_end|>`` ending a turn and first of two EOS ids) serves an
adapter the trainer taught one sentence, a random all-linear LoRA, and two folders made for other
bases dropped in beside them. Checked: readiness shows the plan from the base's own config; chat,
completions, /generate, logprobs, structured output and compositions run on it; chat renders with
the base's template (visible in GET /adapters/{name}); adapters for another base fail alone with a
4xx naming what differs, at upload and when dropped in; an OpenAI fine-tuning job names the served
base, trains LoRA on every linear layer with the base's template and is served.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import CHATML

from loracore.atomic import publish_dir, staging_dir
from testing.server import running_server
from testing.weights import make_random_lora
from tests.helpers.adapters import CHECK_PROMPTS, TRAIN_PROMPTS, train_fixed_sentence_adapter

SENTENCE = "The answer is always forty two."
QUESTION = "What do you say?"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


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
    make_random_lora(tiny_base, src / "gpt2-lora", seed=3)  # a GPT-2 adapter
    shutil.copytree(src / "alpha", src / "wider")  # recorded as trained on a wider base of this type
    record = json.loads((src / "wider" / "loraserve.json").read_text())
    record["base"] = {**record["base"], "hidden_size": 128, "name": "wider-qwen2"}
    (src / "wider" / "loraserve.json").write_text(json.dumps(record))
    for name in ("alpha", "rand", "gpt2-lora", "wider"):
        drop_in(adapters, src / name, name)
    with (
        running_server(chat_base, adapters, root / "data", env=ONE_THREAD) as srv,
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

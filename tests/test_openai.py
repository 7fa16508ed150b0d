"""The OpenAI-compatible API end to end: the official ``openai`` package against the real server.

One server (``python -m service`` on loopback, tiny random GPT-2, an API key) serves the whole
module. Adapters: ``alpha`` (the session's ``trained_adapters["alpha"]``, trained by the real trainer
to answer every prompt with one sentence), ``beta`` (a random LoRA: its output depends on the prompt,
which the template and fan-out checks need; a fixed-sentence adapter would answer them all alike) and
``gamma`` (beta's weights recorded with its own prompt template). Expected texts are never
hard-coded: they come from the server's own ``/generate`` route, from solo requests, or from the
non-streamed reply.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FIXED_SENTENCES
from prometheus_client.parser import text_string_to_metric_families

from loracore.atomic import publish_dir, staging_dir
from loracore.template import DEFAULT_TEMPLATE, PromptTemplate
from testing.server import running_server
from testing.weights import make_random_lora

API_KEY = "test-openai-key"
SENTENCE = FIXED_SENTENCES["alpha"]
QUESTION = "What do you say?"
MAX_TOKENS = 16
GAMMA_TEMPLATE = PromptTemplate(
    name="qa-v1",
    user="### Question: {content}\n",
    assistant_prefix="### Answer:",
    assistant_answer=" {content}",
)


def publish(src: Path, adapters: Path, name: str, template: PromptTemplate | None = None) -> None:
    """Drop an adapter folder in as the trainer does: staged, then renamed."""
    staging = staging_dir(adapters, name)
    shutil.copytree(src, staging, dirs_exist_ok=True)
    if template is not None:
        record = {"template": template.to_dict(), "base_model": "tiny-gpt2", "format": 1}
        (staging / "loraserve.json").write_text(json.dumps(record))
    publish_dir(staging, adapters / name)


@pytest.fixture(scope="module")
def env(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openai")
    adapters, src = root / "adapters", root / "src"
    adapters.mkdir()
    make_random_lora(tiny_base, src / "beta", seed=2)
    publish(trained_adapters["alpha"], adapters, "alpha")  # a copy: the session's folder stays as it is
    publish(src / "beta", adapters, "beta")
    publish(src / "beta", adapters, "gamma", GAMMA_TEMPLATE)
    with running_server(tiny_base, adapters, root / "data", api_key=API_KEY) as srv, srv.client() as http:
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        yield {"srv": srv, "http": http, "oai": oai, "base": tiny_base, "adapters": adapters}
        oai.close()


def generate(env, adapter: str | None, prompt: str, raw: bool, max_new: int = MAX_TOKENS, **extra) -> dict:
    """The server's native route: the reference the OpenAI routes must agree with."""
    body = {"prompt": prompt, "adapter": adapter, "max_new_tokens": max_new, "temperature": 0.0, "raw": raw}
    r = env["http"].post("/generate", json={**body, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def complete(env, model: str, prompt, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("temperature", 0)
    return env["oai"].completions.create(model=model, prompt=prompt, **kw)


def chat(env, model: str, content: str = QUESTION, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("temperature", 0)
    return env["oai"].chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


def answer(native_text: str) -> str:
    """What chat returns for a native generation: the text after the template's answer prefix (a space)."""
    return native_text[1:] if native_text.startswith(" ") else native_text


def finish_of(native: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}[native]


# --- models ----------------------------------------------------------------------------------------


def test_models_list_the_base_and_every_adapter(env):
    models = env["oai"].models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"tiny-gpt2", "alpha", "beta", "gamma"}
    assert by_id["tiny-gpt2"].parent is None and by_id["tiny-gpt2"].root == "tiny-gpt2"
    for name in ("alpha", "beta", "gamma"):
        card = by_id[name]
        assert card.object == "model" and card.parent == "tiny-gpt2" and card.root == "tiny-gpt2"
        assert card.owned_by and card.created > 1_600_000_000
    assert env["oai"].models.retrieve("beta").parent == "tiny-gpt2"
    # the template chat renders with: the default for the base (it has none) and a plain PEFT folder,
    # the recorded one for an adapter that has one
    assert by_id["tiny-gpt2"].template == DEFAULT_TEMPLATE.to_dict() == by_id["beta"].template
    assert by_id["gamma"].template == GAMMA_TEMPLATE.to_dict()
    with pytest.raises(openai.NotFoundError):
        env["oai"].models.retrieve("nope")


def test_the_base_answers_to_its_served_names(tiny_base: Path, tmp_path: Path) -> None:
    # What vLLM users type: --served-model-name (here from the environment), first name listed.
    env = {"LORASERVE_SERVED_MODEL_NAME": "distilgpt2, my-gpt2"}
    with running_server(tiny_base, tmp_path / "adapters", tmp_path / "data", env=env) as srv:
        shutil.copytree(make_random_lora(tiny_base, tmp_path / "lora", seed=3), tmp_path / "adapters" / "pet")
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        by_id = {m.id: m for m in oai.models.list().data}
        assert set(by_id) == {"distilgpt2", "pet"} and by_id["pet"].parent == "distilgpt2"
        assert oai.models.retrieve("my-gpt2").id == "distilgpt2"
        texts = set()
        for name in ("distilgpt2", "my-gpt2", "base", "tiny-gpt2", str(tiny_base)):
            reply = oai.completions.create(model=name, prompt="Hello there", max_tokens=8, temperature=0)
            assert reply.model == name  # echoed as sent, as OpenAI does
            texts.add(reply.choices[0].text)
        assert len(texts) == 1  # every name is the same base
        pet = oai.completions.create(model="pet", prompt="Hello there", max_tokens=8, temperature=0)
        assert pet.choices[0].text not in texts
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="distilgpt", prompt="Hello", max_tokens=2)
        oai.close()


# --- completions and chat naming an adapter --------------------------------------------------------


def test_completion_naming_an_adapter_runs_that_adapter(env):
    prompt = DEFAULT_TEMPLATE.render_prompt(QUESTION)
    reply = complete(env, "alpha", prompt)
    native = generate(env, "alpha", prompt, raw=True)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == "alpha" and len(reply.choices) == 1
    assert choice.index == 0 and choice.text == native["text"]
    assert choice.finish_reason == finish_of(native["finish_reason"])
    assert reply.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The adapter is really applied: the base (under either of its names) says something else.
    base = complete(env, "tiny-gpt2", prompt).choices[0].text
    assert base != choice.text
    assert complete(env, str(env["base"]), prompt).choices[0].text == base
    assert complete(env, "base", prompt).choices[0].text == base
    assert choice.text.strip() == SENTENCE and choice.finish_reason == "stop"  # alpha learned it


def test_chat_uses_the_adapters_template(env):
    reply = chat(env, "alpha")
    native = generate(env, "alpha", QUESTION, raw=False, stop=["\nHuman:"])
    message = reply.choices[0].message
    assert reply.object == "chat.completion" and message.role == "assistant"
    # The reply is the answer after "Assistant:", without the template's leading space.
    assert message.content == answer(native["text"])
    assert reply.choices[0].finish_reason == finish_of(native["finish_reason"])
    assert reply.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert message.content == SENTENCE and reply.choices[0].finish_reason == "stop"

    # gamma holds beta's weights but records its own template: its prompt is rendered with that one.
    gamma = chat(env, "gamma").choices[0].message.content
    rendered = GAMMA_TEMPLATE.render_chat_prompt([{"role": "user", "content": QUESTION}])
    assert rendered.startswith("### Question:")
    expected = generate(env, "beta", rendered, raw=True, stop=["\n### Question:"])["text"]
    assert gamma == answer(expected)
    default = generate(env, "beta", QUESTION, raw=False, stop=["\nHuman:"])["text"]
    assert expected != default  # the two templates really differ in what the model sees


def test_chat_conversation_with_system_and_history(env):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    reply = env["oai"].chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
    flat = [dict(m, content=QUESTION) if isinstance(m["content"], list) else m for m in messages]
    prompt = DEFAULT_TEMPLATE.render_chat_prompt(flat)
    native = generate(env, "beta", prompt, raw=True, max_new=8, stop=["\nHuman:"])
    assert reply.choices[0].message.content == answer(native["text"])
    assert reply.usage.prompt_tokens == native["usage"]["prompt_tokens"]


# --- streaming -------------------------------------------------------------------------------------


def test_streamed_completion_joins_to_the_greedy_text(env):
    prompt = DEFAULT_TEMPLATE.render_prompt(QUESTION)
    plain = complete(env, "beta", prompt)
    stream = complete(env, "beta", prompt, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1 and all(c.object == "text_completion" for c in chunks)
    assert all(c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # include_usage: a last usage chunk


def test_streamed_chat_starts_with_the_role_and_ends_with_done(env):
    plain = chat(env, "alpha")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with env["http"].stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == plain.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == plain.choices[0].finish_reason
    # The same through the openai package.
    streamed = list(chat(env, "alpha", stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content


# --- fan-out: n and list prompts -------------------------------------------------------------------


def test_list_prompts_and_n_fan_out_into_indexed_choices(env):
    prompts = ["Once upon a time", "The weather today is"]
    reply = complete(env, "beta", prompts, n=2, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    solo = [complete(env, "beta", p, max_tokens=8) for p in prompts]
    assert solo[0].choices[0].text != solo[1].choices[0].text
    for i, choice in enumerate(reply.choices):  # prompt p owns choices p*n .. p*n+n-1
        assert choice.text == solo[i // 2].choices[0].text
        assert choice.finish_reason == solo[i // 2].choices[0].finish_reason
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in solo)  # once per prompt
    assert reply.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in solo)

    streamed = list(complete(env, "beta", prompts, n=2, max_tokens=8, stream=True))
    texts = {i: "" for i in range(4)}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(4)] == [c.text for c in reply.choices]


def test_seeded_samples_differ_per_choice_and_reproduce(env):
    kw = {"max_tokens": 8, "temperature": 1.0, "seed": 1234}
    reply = chat(env, "beta", n=2, **kw)
    first, second = (c.message.content for c in reply.choices)
    assert first != second  # choice i samples with seed + i
    assert chat(env, "beta", **kw).choices[0].message.content == first
    assert chat(env, "beta", **dict(kw, seed=1235)).choices[0].message.content == second


def test_choices_share_engine_batches_and_are_timed(env):
    def scrape() -> dict[str, float]:
        text = env["http"].get("/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "loraserve_batch_size_bucket" and s.labels["le"] == "1.0":
                    out["batch_le_1"] = s.value
                elif s.name == "loraserve_batch_size_count":
                    out["batch_count"] = s.value
                elif (
                    s.name == "loraserve_time_to_first_token_seconds_count" and s.labels["adapter"] == "gamma"
                ):
                    out["ttft_gamma"] = s.value
                elif s.name == "loraserve_inter_token_latency_seconds_count":
                    out["itl"] = s.value
        return out

    before = scrape()
    list(complete(env, "gamma", "Tell me", n=4, max_tokens=12, temperature=0.7, seed=5, stream=True))
    after = scrape()
    steps = after["batch_count"] - before.get("batch_count", 0)
    solo_steps = after["batch_le_1"] - before.get("batch_le_1", 0)
    assert steps > 0 and solo_steps < steps  # some decode steps ran several choices together
    assert after["ttft_gamma"] - before.get("ttft_gamma", 0) == 4  # one first token per choice
    assert after["itl"] - before.get("itl", 0) >= 4  # later tokens are timed too


# --- weighted compositions (the ``adapters`` field, native and as an extra body field) -----------------

MIX = [{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": -0.5}]


def peft_cat_text(env, composition: list[dict], prompt: str, max_new: int) -> str:
    """Greedy text of PEFT's own add_weighted_adapter(combination_type="cat") in this process, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trainer.model import load_base_model

    names, weights = [c["name"] for c in composition], [c["weight"] for c in composition]
    folder = env["adapters"]
    model = PeftModel.from_pretrained(load_base_model(env["base"]), folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    tok = AutoTokenizer.from_pretrained(env["base"])
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=50256)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_generate_with_a_composition_matches_peft_cat(env):
    prompt = "The weather today is"
    reply = generate(env, None, prompt, raw=True, adapters=MIX)
    assert reply["adapter"] is None and reply["adapters"] == MIX
    assert reply["text"] == peft_cat_text(env, MIX, prompt, MAX_TOKENS)
    assert reply["text"] != generate(env, "alpha", prompt, raw=True)["text"]
    assert reply["text"] != generate(env, "beta", prompt, raw=True)["text"]
    # one entry of weight 1 is that adapter; the stream joins to the same text as the JSON reply
    assert (
        generate(env, None, prompt, raw=True, adapters=[{"name": "beta", "weight": 1}])["text"]
        == (generate(env, "beta", prompt, raw=True)["text"])
    )
    body = {"prompt": prompt, "adapters": MIX, "max_new_tokens": MAX_TOKENS, "temperature": 0, "raw": True}
    with env["http"].stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["text"] for line in lines[:-1]) == reply["text"]


def test_composition_on_the_openai_routes_as_an_extra_body_field(env):
    prompt = "The weather today is"
    native = generate(env, None, prompt, raw=True, adapters=MIX)
    reply = complete(env, "tiny-gpt2", prompt, extra_body={"adapters": MIX})
    assert reply.model == "tiny-gpt2" and reply.choices[0].text == native["text"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"]
    streamed = complete(env, "base", prompt, extra_body={"adapters": MIX}, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == native["text"]
    # chat renders with the first adapter's template (gamma records its own)
    mix = [{"name": "gamma", "weight": 0.8}, {"name": "alpha", "weight": 0.4}]
    got = chat(env, "tiny-gpt2", extra_body={"adapters": mix}).choices[0].message.content
    rendered = GAMMA_TEMPLATE.render_chat_prompt([{"role": "user", "content": QUESTION}])
    expected = generate(env, None, rendered, raw=True, adapters=mix, stop=["\n### Question:"])["text"]
    assert got == answer(expected)


def test_bad_compositions_are_4xx_naming_the_problem(env):
    http = env["http"]

    def post(**body):
        r = http.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, **body})
        return r.status_code, r.json()["error"]

    status, err = post(adapters=[{"name": "alpha", "weight": 0.5}, {"name": "nope", "weight": 0.5}])
    assert status == 404 and err["code"] == "adapter_not_found" and "'nope'" in err["message"]
    assert err["param"] == "adapters.1.name"
    status, err = post(adapter="alpha", adapters=MIX)
    assert status == 422 and "exclusive" in err["message"]
    status, err = post(adapters=[{"name": "alpha", "weight": 2.5}])
    assert status == 422 and err["param"] == "adapters.0.weight"
    status, err = post(adapters=[{"name": "alpha", "weight": 0.1}] * 9)
    assert status == 422 and err["param"] == "adapters"
    status, err = post(adapters=[])
    assert status == 422 and err["param"] == "adapters"
    status, err = post(adapters=[{"name": "alpha", "weight": 0.5}, {"name": "alpha", "weight": 0.5}])
    assert status == 422 and "listed twice" in err["message"]
    status, err = post(adapters=[{"name": "../x", "weight": 1}])
    assert status == 422 and err["code"] == "invalid_adapter_name" and err["param"] == "adapters.0.name"
    status, err = post(adapters=[{"name": "alpha"}])
    assert status == 422 and err["param"] == "adapters.0.weight"
    # OpenAI routes: unknown names are 404 naming them; a composition rides on the base only
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as e404:
            complete(
                env,
                "tiny-gpt2",
                "Hi",
                stream=stream,
                extra_body={"adapters": [{"name": "nope", "weight": 1}]},
            )
        assert "'nope'" in e404.value.body["message"] and e404.value.body["param"] == "adapters.0.name"
    with pytest.raises(openai.UnprocessableEntityError) as e422:
        chat(env, "alpha", extra_body={"adapters": MIX})
    assert e422.value.body["param"] == "model" and "base" in e422.value.body["message"]


def test_composed_tokens_count_per_component_adapter(env):
    def tokens(adapter: str) -> float:
        text = env["http"].get("/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "loraserve_generated_tokens":
                return sum(s.value for s in family.samples if s.labels.get("adapter") == adapter)
        return 0.0

    before = {n: tokens(n) for n in ("alpha", "beta", "alpha+beta")}
    reply = generate(env, None, "Count me", raw=True, adapters=MIX, max_new=6)
    n = reply["usage"]["completion_tokens"]
    assert tokens("alpha") - before["alpha"] == n == tokens("beta") - before["beta"]
    assert tokens("alpha+beta") == 0


# --- errors are real statuses ----------------------------------------------------------------------


def test_unknown_model_is_a_404_not_found(env):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as err:
            complete(env, "nope", "Hi", stream=stream)
        assert err.value.status_code == 404 and err.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            chat(env, "org/some-model", stream=stream)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 6}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"50257": 1}}, "logit_bias"),
        ({"extra_body": {"max_new_tokens": 4}}, "max_new_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_parameters_are_4xx_before_the_stream_starts(env, kwargs, param):
    for stream in (False, True):
        if "stream_options" in kwargs and stream:
            continue  # stream_options is only wrong without stream
        with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as err:
            complete(env, "alpha", "Hi", stream=stream, **kwargs)
        assert err.value.status_code in (400, 422)
        assert err.value.body["param"] == param, err.value.body


def test_prompt_too_long_and_bad_messages(env):
    long_prompt = "word " * 400
    with pytest.raises(openai.BadRequestError) as err:
        complete(env, "alpha", ["Hi", long_prompt], stream=True)
    assert err.value.code == "prompt_too_long" and err.value.body["param"] == "prompt[1]"
    with pytest.raises(openai.UnprocessableEntityError) as err:  # nothing left to answer
        env["oai"].chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        )
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.UnprocessableEntityError):
        env["oai"].chat.completions.create(model="alpha", messages=[{"role": "tool", "content": "x"}])
    # Raw HTTP: the 4xx is JSON in the envelope, not a 200 event stream.
    r = env["http"].post(
        "/v1/completions",
        json={"model": "nope", "prompt": "Hi", "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "model_not_found"


# --- auth ------------------------------------------------------------------------------------------


def test_v1_needs_the_api_key(env):
    url = f"{env['srv'].url}/v1"
    with (
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        r = httpx.request("GET" if path == "/v1/models" else "POST", env["srv"].url + path, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(env["srv"].url + "/v1/models", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["object"] == "list"

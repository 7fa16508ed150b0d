"""JSON output end to end: ``response_format`` on the OpenAI routes (the official ``openai`` package)
and ``json_schema`` on ``/generate``, against the real server on random weights.

One server (tiny random GPT-2) with ``beta``, a random LoRA. Random weights never aim at JSON, so
valid output here comes from the grammar mask alone. ``SMALL`` bounds every valid output to a few
tokens, so within the token budget each reply must be complete JSON that validates; JSON mode
(``json_object``) has no size bound, so there a reply is either a complete object or runs out of
tokens (``length``), as with OpenAI.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from test_openai import publish

from testing.server import running_server
from testing.weights import make_random_lora
from tests.helpers.json_schemas import SMALL_SCHEMA

API_KEY = "test-structured-key"
SMALL = SMALL_SCHEMA
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
BUDGET = 48  # SMALL's longest output is far shorter
BAD_SCHEMA = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("structured")
    adapters = root / "adapters"
    adapters.mkdir()
    publish(make_random_lora(tiny_base, root / "src" / "beta", seed=2), adapters, "beta")
    with running_server(tiny_base, adapters, root / "data", api_key=API_KEY) as srv, srv.client() as http:
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        yield {"srv": srv, "http": http, "oai": oai}
        oai.close()


def chat(env, model: str, stream: bool = False, **kw):
    kw.setdefault("max_tokens", BUDGET)
    kw.setdefault("temperature", 0)
    reply = env["oai"].chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a thing."}], stream=stream, **kw
    )
    if not stream:
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in reply:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def complete(env, model: str, stream: bool = False, **kw):
    kw.setdefault("max_tokens", BUDGET)
    kw.setdefault("temperature", 0)
    if "response_format" in kw:  # the package's legacy completions call has no such argument
        kw["extra_body"] = {"response_format": kw.pop("response_format")}
    reply = env["oai"].completions.create(model=model, prompt="The thing is", stream=stream, **kw)
    if not stream:
        return reply.choices[0].text, reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in reply:
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish


def assert_valid(text: str, finish: str | None) -> None:
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SMALL)


@pytest.mark.parametrize("model", ["base", "beta"])
def test_json_schema_chat_and_completions_streamed_or_not(env, model):
    for call in (chat, complete):
        whole = call(env, model, response_format=SCHEMA_FORMAT)
        assert_valid(*whole)
        assert call(env, model, stream=True, response_format=SCHEMA_FORMAT) == whole  # greedy: same text
        for seed in (1, 2):  # sampled rows are masked the same way
            assert_valid(
                *call(env, model, stream=seed == 2, temperature=1.0, seed=seed, response_format=SCHEMA_FORMAT)
            )
    # the mask is what makes it JSON: the same requests without it are not
    free, _ = complete(env, model)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_is_an_object_or_runs_out_of_tokens(env, stream):
    for call in (chat, complete):
        for model in ("base", "beta"):
            text, finish = call(env, model, stream=stream, response_format={"type": "json_object"})
            assert text.startswith("{"), text
            if finish == "stop":
                assert isinstance(json.loads(text), dict)
            else:
                assert finish == "length", finish


def test_every_choice_of_a_fan_out_follows_the_schema(env):
    """n choices are engine jobs that share batches; each row has its own grammar state."""
    reply = env["oai"].chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "Describe a thing."}],
        n=4,
        temperature=1.0,
        seed=5,
        max_tokens=BUDGET,
        response_format=SCHEMA_FORMAT,
    )
    texts = [c.message.content for c in reply.choices]
    for c in reply.choices:
        assert_valid(c.message.content, c.finish_reason)
    assert len(set(texts)) > 1  # the seeds differ per choice, so do the objects


def test_too_few_tokens_is_length(env):
    text, finish = chat(env, "base", max_tokens=3, response_format=SCHEMA_FORMAT)
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_text_format_is_free_text(env):
    assert chat(env, "base", response_format={"type": "text"}) == chat(env, "base")


def test_generate_json_schema_object_and_true(env):
    http = env["http"]
    body = {"prompt": "Describe a thing.", "max_new_tokens": BUDGET, "temperature": 0}
    r = http.post("/generate", json={**body, "adapter": "beta", "json_schema": SMALL})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] == "eos"
    jsonschema.validate(json.loads(out["text"]), SMALL)
    with http.stream(
        "POST", "/generate", json={**body, "adapter": "beta", "json_schema": SMALL, "stream": True}
    ) as s:
        lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["text"] for x in lines[:-1]) == out["text"]
    r = http.post("/generate", json={**body, "json_schema": True})
    assert r.status_code == 200, r.text
    if r.json()["finish_reason"] == "eos":
        assert isinstance(json.loads(r.json()["text"]), dict)
    else:
        assert r.json()["finish_reason"] == "length" and r.json()["text"].startswith("{")
    r = http.post("/generate", json={**body, "json_schema": False})
    assert r.status_code == 200
    from loraserve_client import Client

    with Client(env["srv"].url, api_key=API_KEY) as client:  # the client package sends it as is
        g = client.generate(
            "Describe a thing.", adapter="beta", max_new_tokens=BUDGET, temperature=0, json_schema=SMALL
        )
    assert (g.text, g.finish_reason) == (out["text"], "eos")


def test_bad_schema_is_a_422_naming_the_keyword(env):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": BAD_SCHEMA}}
    for stream in (False, True):
        for call in (chat, complete):
            with pytest.raises(openai.UnprocessableEntityError) as err:
                call(env, "base", stream=stream, response_format=bad)
            body = err.value.body
            assert body["code"] == "invalid_json_schema", body
            assert body["param"] == "response_format.json_schema.schema"
            assert '"not"' in body["message"], body
    r = env["http"].post(
        "/generate", json={"prompt": "x", "json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json_schema" and err["param"] == "json_schema"
    assert "minimum" in err["message"]
    for fmt, param in [
        ({"type": "json_schema"}, "response_format"),  # no json_schema
        ({"type": "yaml"}, "response_format.type"),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SMALL}},
            "response_format.json_schema.name",
        ),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": SMALL}}, "response_format"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError) as err:
            chat(env, "base", response_format=fmt)
        assert err.value.body["param"] == param, err.value.body
    for schema, word in [
        ({"x-guidance": {"lenient": True}, "not": {}}, "x-guidance"),
        ({"enum": []}, "anyOf"),
    ]:
        r = env["http"].post("/generate", json={"prompt": "x", "json_schema": schema})
        assert r.status_code == 422 and word in r.json()["error"]["message"], r.text
    for value in ([1], "schema", 1):
        r = env["http"].post("/generate", json={"prompt": "x", "json_schema": value})
        assert r.status_code == 422 and r.json()["error"]["param"].startswith("json_schema"), r.text

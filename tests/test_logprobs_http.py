"""Log-probabilities, penalties and logit_bias through real HTTP: ``/generate`` with httpx and the
OpenAI routes with the official ``openai`` package, against one real server (tiny random GPT-2
and a random LoRA ``beta``). Expected values come from the server itself (the other route, the
non-streamed reply, a solo request) or from GPT-2's real tokenizer, never hard-coded output.
The engine-level tests (tests/test_engine.py, tests/test_prompt_logprobs.py) hold the numbers
against the model's own logits. lm-evaluation-harness, as users run it (its ``local-completions`` and
``local-chat-completions`` models, the documented command), scores the repository's tasks
(tests/data/lm_eval) against this server exactly as its own ``hf`` backend (+ ``peft``) does.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from loracore.atomic import publish_dir, staging_dir
from testing.server import REPO, running_server
from testing.weights import make_random_lora

PROMPT = "The quick brown fox jumps over the lazy"
MAX_NEW = 12


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("logprobs")
    adapters = root / "adapters"
    adapters.mkdir()
    staging = staging_dir(adapters, "beta")
    make_random_lora(tiny_base, staging, seed=2)
    publish_dir(staging, adapters / "beta")
    # fp32: the batch-invariance checks compare greedy tokens across batch shapes, and bf16 matmuls
    # (the CPU default where bf16 is native) round differently per shape, flipping near-ties
    args = ("--dtype", "float32")
    with running_server(tiny_base, adapters, root / "data", args=args) as srv, srv.client() as http:
        oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        tok = AutoTokenizer.from_pretrained(tiny_base)
        yield {"http": http, "oai": oai, "tok": tok, "url": srv.url, "base": tiny_base, "adapters": adapters}
        oai.close()


def generate(env, **body) -> dict:
    body = {"prompt": PROMPT, "raw": True, "max_new_tokens": MAX_NEW, "temperature": 0.0, **body}
    r = env["http"].post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def generate_stream(env, **body) -> list[dict]:
    body = {"prompt": PROMPT, "raw": True, "max_new_tokens": MAX_NEW, "temperature": 0.0, **body}
    with env["http"].stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def error_of(r: httpx.Response, status: int = 422) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def check_top(top: list[float], chosen: float, greedy: bool) -> None:
    assert all(a >= b for a, b in zip(top, top[1:], strict=False)), "most likely first"
    assert sum(math.exp(v) for v in top) <= 1 + 1e-6
    assert all(v <= 0 for v in top) and chosen <= 0
    if greedy and top:
        assert chosen == pytest.approx(top[0], abs=1e-6)


# --- /generate ------------------------------------------------------------------------------------
def test_generate_logprobs_shape_and_stream(env):
    plain = generate(env)
    assert plain["tokens"] is None  # not asked for: nothing extra
    body = generate(env, logprobs=4, adapter="beta")
    tokens = body["tokens"]
    assert len(tokens) == body["usage"]["completion_tokens"] == MAX_NEW and body["finish_reason"] == "length"
    tok = env["tok"]
    for t in tokens:
        assert set(t) == {"id", "text", "bytes", "logprob", "top"}
        # greedy: the chosen token is a most likely one (ties: the random model has exactly equal logits)
        assert len(t["top"]) == 4 and t["logprob"] == t["top"][0]["logprob"], t
        assert (
            t["text"] == tok.decode([t["id"]]) and bytes(t["bytes"]).decode("utf-8", "replace") == t["text"]
        )
        check_top([a["logprob"] for a in t["top"]], t["logprob"], greedy=True)
    assert "".join(t["text"] for t in tokens) == body["text"]
    # streamed: each chunk carries the tokens since the previous one; together they are the same
    chunks = generate_stream(env, logprobs=4, adapter="beta")
    streamed = [t for c in chunks for t in c["tokens"]]
    assert [t["id"] for t in streamed] == [t["id"] for t in tokens]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in tokens], abs=1e-5)
    assert all(c["tokens"] for c in chunks)  # no chunk without a token in it
    assert "".join(c["text"] for c in chunks) == body["text"]
    # logprobs 0: the chosen token only
    zero = generate(env, logprobs=0, adapter="beta")
    assert [t["top"] for t in zero["tokens"]] == [[]] * MAX_NEW
    assert [t["logprob"] for t in zero["tokens"]] == pytest.approx([t["logprob"] for t in tokens], abs=1e-5)


def test_generate_sampled_logprobs_follow_temperature(env):
    """A sampled row reports the distribution after its temperature: sharper at a low temperature."""
    cold = generate(env, logprobs=3, temperature=0.5, seed=1)
    warm = generate(env, logprobs=3, temperature=1.5, seed=1)
    greedy = generate(env, logprobs=3)
    assert cold["tokens"][0]["top"][0]["logprob"] > greedy["tokens"][0]["top"][0]["logprob"]
    assert warm["tokens"][0]["top"][0]["logprob"] < greedy["tokens"][0]["top"][0]["logprob"]
    for t in cold["tokens"] + warm["tokens"]:
        check_top([a["logprob"] for a in t["top"]], t["logprob"], greedy=False)


def test_generate_logit_bias_and_penalties(env):
    tok = env["tok"]
    target = tok.encode(" banana")[0]
    forced = generate(env, logit_bias={str(target): 100})
    assert forced["text"] == tok.decode([target] * MAX_NEW)
    plain = generate(env, max_new_tokens=24)
    ids = tok.encode(plain["text"])
    assert len(set(ids)) < len(ids) / 2, plain["text"]  # the premise: a repetitive random model
    for name in ("presence_penalty", "frequency_penalty"):
        penalized = generate(env, max_new_tokens=24, **{name: 2.0})
        assert len(set(tok.encode(penalized["text"]))) > len(set(ids)), name


def test_rows_without_them_are_unchanged_in_the_same_batch(env):
    """Concurrent requests share engine batches; the plain ones answer as they do alone."""
    alone = generate(env, adapter="beta")
    jobs = [{"adapter": "beta"}, {"presence_penalty": 2.0, "logprobs": 2}, {"adapter": "beta"}]
    jobs += [{"logit_bias": {"11": 50}, "adapter": "beta"}, {"frequency_penalty": 1.0}, {"adapter": "beta"}]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda kw: generate(env, **kw), jobs * 2))
    for kw, res in zip(jobs * 2, results, strict=True):
        if kw == {"adapter": "beta"}:
            assert res["text"] == alone["text"] and res["tokens"] is None
    for i in (1, 3, 4):
        assert results[i]["text"] == results[i + len(jobs)]["text"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"50257": 1}}, "logit_bias"),  # GPT-2's vocabulary has ids 0..50256
        ({"logit_bias": [1, 2]}, "logit_bias"),
    ],
)
def test_generate_bad_values_are_422(env, extra, param):
    for stream in (False, True):
        body = {"prompt": "Hi", "max_new_tokens": 2, "stream": stream, **extra}
        err = error_of(env["http"].post("/generate", json=body))
        assert err["param"] == param and param in err["message"], err


def test_generate_non_finite_and_oversized_values(env):
    hdr = {"content-type": "application/json"}
    for field, literal in (
        ("frequency_penalty", "NaN"),
        ("presence_penalty", "Infinity"),
        ("logit_bias", '{"5": NaN}'),
        ("logit_bias", '{"5": -Infinity}'),
    ):
        body = f'{{"prompt": "hi", "max_new_tokens": 2, "{field}": {literal}}}'.encode()
        err = error_of(env["http"].post("/generate", content=body, headers=hdr))
        assert err["param"] == field, (literal, err)
    err = error_of(
        env["http"].post("/generate", json={"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}})
    )
    assert err["param"] == "logit_bias", err
    ok = generate(env, max_new_tokens=2, logit_bias={str(i): -1 for i in range(300)})
    assert ok["usage"]["completion_tokens"] == 2


def test_client_package_sends_and_reads_them(env):
    import loraserve_client as lc

    tok = env["tok"]
    target = tok.encode(" banana")[0]
    ref = generate(env, logprobs=2, presence_penalty=1.0)
    with lc.Client(str(env["http"].base_url)) as client:
        g = client.generate(
            PROMPT, raw=True, max_new_tokens=MAX_NEW, temperature=0, logprobs=2, presence_penalty=1.0
        )
        assert g.text == ref["text"] and [t.id for t in g.tokens] == [t["id"] for t in ref["tokens"]]
        assert all(len(t.top) == 2 and isinstance(t.top[0], lc.TopToken) for t in g.tokens)
        with client.stream(
            PROMPT, raw=True, max_new_tokens=4, temperature=0, logit_bias={target: 100}, logprobs=0
        ) as s:
            text = "".join(s)
        assert text == tok.decode([target] * 4) and [t.id for t in s.tokens] == [target] * 4
        assert client.generate(PROMPT, raw=True, max_new_tokens=2).tokens is None
        scored = client.generate(PROMPT, raw=True, max_new_tokens=0, prompt_logprobs=1)
        ref_prompt = generate(env, max_new_tokens=0, prompt_logprobs=1)["prompt_logprobs"]
        assert [(t.id, t.logprob) for t in scored.prompt_logprobs] == [
            (t["id"], t["logprob"]) for t in ref_prompt
        ]
        assert scored.prompt_logprobs[0].logprob is None and isinstance(
            scored.prompt_logprobs[1], lc.PromptToken
        )


# --- /v1/completions -----------------------------------------------------------------------------
def test_completions_logprobs_shape_matches_generate(env):
    ref = generate(env, logprobs=3, adapter="beta")["tokens"]
    out = env["oai"].completions.create(
        model="beta", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, logprobs=3
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp.tokens == [t["text"] for t in ref]
    assert lp.token_logprobs == pytest.approx([t["logprob"] for t in ref], abs=1e-5)
    assert "".join(lp.tokens) == choice.text
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    for token, chosen, top, r in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref, strict=True):
        # OpenAI's legacy shape: the k most likely plus the chosen token (here among them: greedy)
        assert list(top)[:3] == [a["text"] for a in r["top"]] and top[token] == chosen
        check_top(list(top.values()), chosen, greedy=True)
    plain = env["oai"].completions.create(model="beta", prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completions_streamed_equals_non_streamed(env):
    kw = {"model": "base", "prompt": [PROMPT, "Once upon a time"], "max_tokens": MAX_NEW, "logprobs": 2}
    whole = env["oai"].completions.create(temperature=0, n=2, **kw)
    parts: dict[int, dict] = {}
    for chunk in env["oai"].completions.create(temperature=0, n=2, stream=True, **kw):
        for c in chunk.choices:
            acc = parts.setdefault(c.index, {"text": "", "tokens": [], "lps": [], "tops": [], "offsets": []})
            acc["text"] += c.text
            if c.logprobs is not None:
                acc["tokens"] += c.logprobs.tokens
                acc["lps"] += c.logprobs.token_logprobs
                acc["tops"] += c.logprobs.top_logprobs
                acc["offsets"] += c.logprobs.text_offset
    assert len(whole.choices) == 4
    for c in whole.choices:
        got = parts[c.index]
        assert got["text"] == c.text
        assert got["tokens"] == c.logprobs.tokens and got["offsets"] == c.logprobs.text_offset
        assert got["lps"] == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)
        assert [list(t) for t in got["tops"]] == [list(t) for t in c.logprobs.top_logprobs]
        assert len(c.logprobs.tokens) == MAX_NEW


def test_completions_logit_bias_and_penalties(env):
    tok = env["tok"]
    target = tok.encode(" banana")[0]
    out = env["oai"].completions.create(
        model="base", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(target): 100}
    )
    assert out.choices[0].text == tok.decode([target] * 6)
    plain = env["oai"].completions.create(model="base", prompt=PROMPT, max_tokens=24, temperature=0)
    pen = env["oai"].completions.create(
        model="base", prompt=PROMPT, max_tokens=24, temperature=0, presence_penalty=2.0
    )
    assert len(set(tok.encode(pen.choices[0].text))) > len(set(tok.encode(plain.choices[0].text)))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),  # generates nothing without echo
        ({"prompt": [1, 50257]}, "prompt"),  # GPT-2's vocabulary has ids 0..50256
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logit_bias": {"99999": 3}}, "logit_bias"),
        ({"logit_bias": {"1": -101}}, "logit_bias"),
    ],
)
def test_completions_bad_values_are_422(env, kwargs, param):
    for stream in (False, True):
        with pytest.raises(openai.UnprocessableEntityError) as err:
            body = {"model": "base", "prompt": "Hi", "max_tokens": 2, "stream": stream, **kwargs}
            env["oai"].completions.create(**body)
        assert err.value.body["param"] == param, err.value.body


# --- prompt log-probabilities (echo) -------------------------------------------------------------
def _hf_prompt_logprobs(base: Path, ids: list[int]) -> list[float]:
    """log_softmax of the Hugging Face model's own logits: each prompt token given the ones before."""
    import torch

    from trainer.model import load_base_model

    with torch.no_grad():
        lp = torch.log_softmax(load_base_model(base).eval()(torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]


def test_generate_prompt_logprobs(env, tiny_base: Path):
    ids = env["tok"].encode(PROMPT)
    body = generate(env, prompt_logprobs=3, logprobs=1)
    prompt = body["prompt_logprobs"]
    assert [t["id"] for t in prompt] == ids and body["usage"]["prompt_tokens"] == len(ids)
    assert prompt[0]["logprob"] is None and prompt[0]["top"] == []
    assert [t["logprob"] for t in prompt[1:]] == pytest.approx(_hf_prompt_logprobs(tiny_base, ids), abs=1e-4)
    for t in prompt[1:]:
        assert len(t["top"]) == 3 and t["text"] == env["tok"].decode([t["id"]])
        check_top([a["logprob"] for a in t["top"]], t["logprob"], greedy=False)
    assert body["tokens"] == generate(env, logprobs=1)["tokens"]  # generation unchanged by scoring
    # streamed: the first chunk carries them, once
    chunks = generate_stream(env, prompt_logprobs=3)
    assert chunks[0]["prompt_logprobs"] == prompt and all(c["prompt_logprobs"] is None for c in chunks[1:])
    # max_new_tokens 0: the prompt alone
    only = generate(env, prompt_logprobs=0, max_new_tokens=0, adapter="beta")
    assert only["text"] == "" and only["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0}
    assert [t["top"] for t in only["prompt_logprobs"]] == [[]] * len(ids)
    assert [t["logprob"] for t in only["prompt_logprobs"][1:]] != pytest.approx(
        [t["logprob"] for t in prompt[1:]], abs=1e-3
    )  # the adapter's, not the base's
    err = error_of(env["http"].post("/generate", json={"prompt": "Hi", "max_new_tokens": 0}))
    assert "prompt_logprobs" in err["message"], err
    err = error_of(env["http"].post("/generate", json={"prompt": "Hi", "prompt_logprobs": 21}))
    assert err["param"] == "prompt_logprobs", err


def test_completions_echo_logprobs_is_the_prompt_then_the_completion(env):
    """OpenAI's legacy shape with echo: the prompt's tokens (the first with null) and then the
    completion's, in one list; text offsets run over prompt + completion."""
    ids = env["tok"].encode(PROMPT)
    plain = env["oai"].completions.create(
        model="beta", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    ref = generate(env, adapter="beta", prompt_logprobs=2, max_new_tokens=0)["prompt_logprobs"]
    for prompt in (PROMPT, ids, [ids]):  # text, token ids, a list of token-id lists: the same answer
        out = env["oai"].completions.create(
            model="beta", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True
        )
        choice = out.choices[0]
        lp = choice.logprobs
        n = len(ids)
        assert choice.text == PROMPT + plain.choices[0].text
        assert lp.tokens == [t["text"] for t in ref] + plain.choices[0].logprobs.tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:n] == pytest.approx([t["logprob"] for t in ref[1:]], abs=1e-5)
        assert lp.token_logprobs[n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for token, chosen, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert top[token] == chosen and len(top) in (2, 3)
        assert out.usage.prompt_tokens == n and out.usage.completion_tokens == 4
    # max_tokens 0: the prompt scored alone; streamed, the same in one chunk
    only = env["oai"].completions.create(model="beta", prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == PROMPT and only.choices[0].finish_reason == "length"
    assert only.usage.completion_tokens == 0 and len(only.choices[0].logprobs.tokens) == len(ids)
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [t["logprob"] for t in ref[1:]], abs=1e-5
    )
    chunks = list(
        env["oai"].completions.create(
            model="beta", prompt=PROMPT, max_tokens=0, logprobs=1, echo=True, stream=True
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == PROMPT
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == only.choices[0].logprobs.tokens
    # echo without logprobs: the text only
    bare = env["oai"].completions.create(model="beta", prompt=ids, max_tokens=0, echo=True)
    assert bare.choices[0].text == PROMPT and bare.choices[0].logprobs is None


# --- /v1/chat/completions ------------------------------------------------------------------------
def chat(env, **kw):
    kw.setdefault("max_tokens", MAX_NEW)
    return env["oai"].chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "What do you say?"}], temperature=0, **kw
    )


def test_chat_logprobs_shape_streamed_equals_non_streamed(env):
    whole = chat(env, logprobs=True, top_logprobs=4)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 4 and item.top_logprobs[0].logprob == item.logprob
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert all(bytes(a.bytes).decode("utf-8", "replace") == a.token for a in item.top_logprobs)
        check_top([a.logprob for a in item.top_logprobs], item.logprob, greedy=True)
    streamed, text = [], ""
    for chunk in chat(env, logprobs=True, top_logprobs=4, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert text == whole.choices[0].message.content
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [
        [a.token for a in t.top_logprobs] for t in content
    ]
    # the tokens spell the reply; the template's answer prefix (a space) is not part of the content
    joined = "".join(t.token for t in content)
    if whole.choices[0].finish_reason == "length":
        assert joined.removeprefix(" ") == whole.choices[0].message.content


def test_chat_logprobs_options(env):
    only = chat(env, logprobs=True, max_tokens=4)  # no top_logprobs: the chosen tokens only
    assert [t.top_logprobs for t in only.choices[0].logprobs.content] == [[]] * 4
    assert chat(env, max_tokens=4).choices[0].logprobs is None
    assert chat(env, logprobs=False, max_tokens=4).choices[0].logprobs is None
    assert chat(env, top_logprobs=0, max_tokens=2).choices[0].logprobs is None  # 0: the neutral value
    tok = env["tok"]
    target = tok.encode(" banana")[0]
    biased = chat(env, max_tokens=5, logit_bias={str(target): 100}, logprobs=True)
    assert biased.choices[0].message.content == tok.decode([target] * 5).removeprefix(" ")
    assert all(t.logprob > -0.01 for t in biased.choices[0].logprobs.content)  # +100: nearly certain


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"logit_bias": {"x1": 1}}, "logit_bias"),
    ],
)
def test_chat_bad_values_are_422(env, kwargs, param):
    for stream in (False, True):
        with pytest.raises(openai.UnprocessableEntityError) as err:
            chat(env, max_tokens=2, stream=stream, **kwargs)
        assert err.value.body["param"] == param, err.value.body


# --- lm-evaluation-harness -----------------------------------------------------------------------
LM_EVAL_TASKS = REPO / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def harness(env, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module):
    """lm-eval in this process, on the repository's tasks only (the built-in index takes seconds to
    scan), its datasets cache in a temporary folder; the task files name their data relative to the
    repository's root."""
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    monkeypatch_module.chdir(REPO)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)

    def evaluate(model: str, args: dict, tasks: list[str], **kw) -> dict:
        return lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=tasks, task_manager=manager, log_samples=True, **kw
        )

    return evaluate


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _served(env, model: str) -> dict:
    """local-completions' arguments, as docs/openai.md gives them."""
    return {
        "model": model,
        "base_url": f"{env['url']}/v1/completions",
        "tokenizer": str(env["base"]),
        "tokenizer_backend": "huggingface",
        "max_length": 256,
        "batch_size": 8,
    }


def _hf(env, adapter: str | None) -> dict:
    args = {"pretrained": str(env["base"]), "dtype": "float32", "device": "cpu"}
    return args if adapter is None else {**args, "peft": str(env["adapters"] / adapter)}


def _per_item(result: dict, task: str) -> list[list[tuple[float, bool]]]:
    """Each item's (log-likelihood, is greedy) per choice, in document order (the command's samples
    file spells both as strings)."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[(float(r[0][0]), str(r[0][1]) == "True") for r in s["resps"]] for s in samples]


def _same_scores(served: dict, reference: dict, task: str) -> None:
    got, want = _per_item(served, task), _per_item(reference, task)
    assert len(got) == len(want) == 6
    for item, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in w], abs=1e-4), item
        assert [greedy for _, greedy in g] == [greedy for _, greedy in w], item
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"][task][metric] == reference["results"][task][metric], metric


@pytest.fixture(scope="module")
def hf_base(env, harness) -> dict:
    """lm-eval's own hf backend on the base's weights, both tasks."""
    return harness("hf", _hf(env, None), ["loraserve_tiny_choice", "loraserve_tiny_gen"], batch_size=1)


def test_lm_eval_scores_the_base_like_its_hf_backend(env, harness, hf_base):
    tasks = ["loraserve_tiny_choice", "loraserve_tiny_gen"]
    served = harness("local-completions", _served(env, "base"), tasks)
    reference = hf_base
    _same_scores(served, reference, "loraserve_tiny_choice")
    # generate_until: stop sequences, seed and max_gen_toks as lm-eval sends them; greedy answers equal
    answers = [
        s["resps"][0][0] for s in sorted(served["samples"]["loraserve_tiny_gen"], key=lambda s: s["doc_id"])
    ]
    ref = [
        s["resps"][0][0]
        for s in sorted(reference["samples"]["loraserve_tiny_gen"], key=lambda s: s["doc_id"])
    ]
    assert answers == ref and all(answers)


def test_lm_eval_command_scores_an_adapter_like_hf_with_peft(env, harness, hf_base, tmp_path: Path):
    """The command of docs/openai.md ("Evaluate an adapter with lm-evaluation-harness"), run as a user
    runs it, against the adapter; the reference is lm-eval's hf backend with ``peft=`` in this process."""
    import subprocess
    import sys

    args = ",".join(f"{k}={v}" for k, v in _served(env, "beta").items() if k != "batch_size")
    cmd = [
        str(Path(sys.executable).with_name("lm-eval")),
        "run",
        "--model",
        "local-completions",
        "--model_args",
        args,
        "--batch_size",
        "8",
        "--include_path",
        "tests/data/lm_eval",
        "--tasks",
        "loraserve_tiny_choice",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    (samples_file,) = (tmp_path / "out").rglob("samples_loraserve_tiny_choice_*.jsonl")
    served = json.loads(results_file.read_text())
    served["samples"] = {
        "loraserve_tiny_choice": [json.loads(line) for line in samples_file.read_text().splitlines()]
    }
    reference = harness("hf", _hf(env, "beta"), ["loraserve_tiny_choice"], batch_size=1)
    _same_scores(served, reference, "loraserve_tiny_choice")
    assert _per_item(hf_base, "loraserve_tiny_choice") != _per_item(reference, "loraserve_tiny_choice")


def test_lm_eval_chat_completions_requests_are_accepted(env, harness):
    """local-chat-completions' generate_until requests (messages, stop[:4], seed, max_tokens from
    max_gen_toks): each answer is the server's own answer to that chat request."""
    args = {"model": "beta", "base_url": f"{env['url']}/v1/chat/completions", "max_length": 256}
    result = harness("local-chat-completions", args, ["loraserve_tiny_gen"], apply_chat_template=True)
    samples = sorted(result["samples"]["loraserve_tiny_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    for s in samples:
        direct = env["oai"].chat.completions.create(
            model="beta",
            messages=[{"role": "user", "content": s["doc"]["question"]}],
            temperature=0,
            max_tokens=12,
            stop=["\n", "Q:"],
            seed=1234,
        )
        assert s["resps"][0][0] == direct.choices[0].message.content

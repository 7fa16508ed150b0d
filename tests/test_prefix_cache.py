"""The prefix cache (service/engine/prefix.py): the same tokens and log-probabilities with it on and off,
no block ever reached across adapter versions or adapters, eviction within the KV budget.

Real engines on random-weight bases of two families (distilgpt2's shape; a Llama with grouped-query
attention), real PEFT adapters published as versions, greedy decoding. A cached block is
``block_tokens`` positions (16 for distilgpt2's 64-wide heads, 64 for the Llama's 16-wide ones), so
the shared prefixes here span several blocks.
"""

from __future__ import annotations

import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch

from loracore import artifact
from loracore.template import DEFAULT_TEMPLATE
from service.engine import Engine
from service.engine.capacity import kv_bytes_per_token
from service.engine.types import AdapterWeight, GenerationRequest
from service.wire import SamplingParams
from testing.server import running_server

LLAMA_GQA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
PREFIX = 200  # shared prompt tokens: 12 blocks of distilgpt2, 3 of the Llama
NEW = 3
LOGPROB_TOL = 1e-4  # the suffix runs in other matmul shapes than a full prefill: float rounding only


def _make_lora(base: Path, out: Path, seed: int, *, dora: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model

    from loracore.families import family_of_folder
    from trainer.model import load_base_model

    torch.manual_seed(seed)
    model = load_base_model(base)
    gpt2 = model.config.model_type == "gpt2"
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"] if family_of_folder(base).name == "gpt2" else "all-linear",
        init_lora_weights=False,
        fan_in_fan_out=gpt2,
        use_dora=dora,
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _publish(adapters: Path, name: str, source: Path) -> str:
    """Publish ``source`` as the current version of ``name``; its version id."""
    with artifact.staged(adapters / name) as staging:
        for f in source.iterdir():
            if f.is_file():
                shutil.copy(f, staging / f.name)
        artifact.write_record(staging, artifact.Record(template=DEFAULT_TEMPLATE.to_dict()))
        return artifact.publish_version(staging, adapters, name, keep=3).sha256


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import make_random_llama_base

    return make_random_llama_base(tmp_path_factory.mktemp("bases") / "llama-gqa", seed=2, **LLAMA_GQA)


@pytest.fixture(scope="module")
def setups(distil_base: Path, llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per base: an adapter folder with ``a`` (two versions made, the first published), ``b`` and a
    DoRA adapter ``d``."""
    out = {}
    for label, base in (("distilgpt2", distil_base), ("llama-gqa", llama_base)):
        root = tmp_path_factory.mktemp(f"prefix-{label}")
        src = root / "src"
        made = {n: _make_lora(base, src / n, seed) for n, seed in (("a1", 1), ("a2", 2), ("b", 3))}
        made["d"] = _make_lora(base, src / "d", 4, dora=True)
        adapters = root / "adapters"
        adapters.mkdir()
        versions = {n: _publish(adapters, n, made[n if n != "a" else "a1"]) for n in ("a", "b", "d")}
        out[label] = {"base": base, "adapters": adapters, "src": made, "versions": versions}
    return out


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50, 50000) for _ in range(n)]


SHARED = _prompt(0, PREFIX)


def _request(rid: str, target, prompt: list[int], new: int = NEW) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, logprobs=1)
    if isinstance(target, tuple):  # a weighted composition
        parts = tuple(AdapterWeight(name, weight) for name, weight in target)
        return GenerationRequest(rid, list(prompt), None, params, adapters=parts)
    return GenerationRequest(rid, list(prompt), target, params)


def _run(eng: Engine, requests: list[GenerationRequest], check_budget: bool = False) -> dict:
    """Run requests added together to the end: per id (tokens, logprobs); the prefix activity summed
    (``hits`` per id: the hit tokens of the step that admitted it, when it was admitted alone)."""
    for req in requests:
        eng.add(req)
    out: dict = {r.id: ([], []) for r in requests}
    queried = hit = evicted = 0
    while eng.has_active():
        report = eng.step()
        for e in report.events:
            assert e.error is None, e.error
            if e.token_id is not None:
                out[e.id][0].append(e.token_id)
                out[e.id][1].append(e.logprob)
        queried += report.prefix.queried_tokens
        hit += report.prefix.hit_tokens
        evicted += report.prefix.evicted_blocks
        if check_budget and eng.prefix is not None:
            kv = eng.runner.kv
            rows = sum(kv.blocks(r.length) for r in eng.batch.rows) * kv.block_bytes
            assert rows + eng.prefix.nbytes <= eng.plan.kv_budget_bytes
    return {"out": out, "queried": queried, "hit": hit, "evicted": evicted}


def _same(on: dict, off: dict) -> None:
    assert on.keys() == off.keys()
    for rid in on:
        assert on[rid][0] == off[rid][0], rid
        worst = max(abs(a - b) for a, b in zip(on[rid][1], off[rid][1], strict=True))
        assert worst <= LOGPROB_TOL, (rid, worst)


@pytest.mark.parametrize("label", ["distilgpt2", "llama-gqa"])
def test_prefill_after_a_cached_prefix_equals_a_full_prefill(setups: dict, label: str) -> None:
    """``SlotRunner.prefill`` with ``offsets``: slot 1 gets slot 0's first 128 positions (a hit's copy)
    and prefills the other 77 tokens at positions 128..204; its last logits and the K/V it writes
    equal a full prefill's (slot 0) to float rounding, next to a full prompt in the same call."""
    from service.engine.lora import LoraPlan
    from service.engine.runners import make_runner
    from trainer.model import load_base_model

    runner = make_runner(load_base_model(setups[label]["base"]), max_rows=3, max_context=256)
    prompt, other, p = SHARED + [3, 4, 5, 6, 7], _prompt(9, 40), 128
    full = runner.prefill([prompt], [0], LoraPlan([]))
    runner.kv.copy_prefix(0, 1, p)
    split = runner.prefill([other, prompt[p:]], [2, 1], LoraPlan([]), offsets=[0, p])
    assert torch.allclose(split[1], full[0], atol=1e-4), (split[1] - full[0]).abs().max()
    for k in runner.kv.k:
        assert torch.allclose(k[1, :, : len(prompt)], k[0, :, : len(prompt)], atol=1e-5)
    alone = runner.prefill([other], [0], LoraPlan([]))
    assert torch.allclose(split[0], alone[0], atol=1e-4)  # a batch-mate without offset is untouched


@pytest.mark.parametrize("label", ["distilgpt2", "llama-gqa"])
def test_outputs_equal_with_the_cache_on_and_off(setups: dict, label: str) -> None:
    """Base, an adapter, its pinned version, a weighted composition, a DoRA adapter: a first wave
    fills the cache, a second wave with the same prefix and other endings hits it; every token and
    log-probability equals the run without the cache."""
    s = setups[label]
    pinned = f"a@{s['versions']['a'][:12]}"
    targets = [None, "a", pinned, (("a", 0.6), ("b", 0.4)), "d"]
    waves = [
        [_request(f"w{w}-{i}", t, SHARED + _prompt(100 * w + i, 5)) for i, t in enumerate(targets)]
        for w in range(2)
    ]
    results = {}
    for on in (True, False):
        eng = Engine(s["base"], s["adapters"], max_batch_size=8, prefix_cache=on)
        results[on] = [_run(eng, wave) for wave in waves]
    for got, want in zip(results[True], results[False], strict=True):
        _same(got["out"], want["out"])
    first, second = results[True]
    assert first["hit"] == 0  # nothing cached yet: every row of the first wave prefilled it all
    # the second wave: each row hits the full blocks of the shared prefix its own target cached
    # (192 tokens: 12 blocks of 16 on distilgpt2, 3 of 64 on the Llama)
    assert second["hit"] == len(targets) * 192
    assert results[False][1]["queried"] == 0  # off: no lookups at all


def test_a_new_version_never_reaches_the_old_versions_blocks(setups: dict) -> None:
    """``a`` is cached on version 1; after version 2 is published, a row on ``a`` finds nothing and
    answers as a cold engine does on version 2; a row pinned to version 1 still hits version 1's
    blocks. Other adapters, the base and a composition with the same prompt find nothing either."""
    s = setups["llama-gqa"]
    root = s["adapters"].parent / "republish"
    adapters = root / "adapters"
    shutil.copytree(s["adapters"], adapters, symlinks=True)
    v1 = s["versions"]["a"]
    eng = Engine(s["base"], adapters, max_batch_size=4, prefix_cache=True)
    prompt = SHARED + [7, 8, 9]
    first = _run(eng, [_request("v1", "a", prompt)])
    assert first["hit"] == 0 and eng.prefix.blocks
    assert _run(eng, [_request("v1-again", "a", prompt)])["hit"] == 192  # 3 blocks of 64

    for rid, target in (("b", "b"), ("base", None), ("mix", (("a", 0.5), ("b", 0.5))), ("dora", "d")):
        assert _run(eng, [_request(rid, target, prompt)])["hit"] == 0, rid  # another identity: no share

    v2 = _publish(adapters, "a", s["src"]["a2"])
    assert v2 != v1
    new = _run(eng, [_request("v2", "a", prompt)])
    assert new["hit"] == 0  # version 2 never reaches version 1's blocks
    cold = Engine(s["base"], adapters, max_batch_size=4, prefix_cache=False)
    _same(new["out"], _run(cold, [_request("v2", "a", prompt)])["out"])
    assert new["out"]["v2"][0] != first["out"]["v1"][0]  # the versions differ: the check has teeth

    pinned = _run(eng, [_request("pin", f"a@{v1[:12]}", prompt)])
    assert pinned["hit"] > 0  # version 1's own blocks are still its own
    assert pinned["out"]["pin"][0] == first["out"]["v1"][0]
    _same(pinned["out"], _run(cold, [_request("pin", f"a@{v1[:12]}", prompt)])["out"])


def test_eviction_under_a_small_budget_keeps_running_rows_going(llama_base: Path, tmp_path: Path) -> None:
    """A KV budget of three rows at a 256-token context: two rows of 200-token prompts hold most of
    it, so the blocks their prompts leave in the cache are evicted as rows grow and arrive. Every
    request finishes with the cache-off answer, and after every step the rows and the cache together
    stay within the budget."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    row_bytes = kv_bytes_per_token(2, 2 * 16, torch.float32) * 256  # 2 layers, 2 KV heads of 16
    prompts = [_prompt(500 + i, 200) for i in range(3)] * 2  # each prefix twice: hits between evictions
    runs = {}
    for on in (True, False):
        eng = Engine(
            llama_base,
            adapters,
            max_context=256,
            kv_cache_bytes=3 * row_bytes,
            max_batch_size=2,
            prefix_cache=on,
        )
        assert eng.max_batch_size == 2
        runs[on] = _run(
            eng, [_request(f"r{i}", None, p, new=8) for i, p in enumerate(prompts)], check_budget=on
        )
    _same(runs[True]["out"], runs[False]["out"])
    assert all(len(t) == 8 for t, _ in runs[True]["out"].values())
    assert runs[True]["evicted"] > 0


def test_prompt_scoring_rows_skip_the_lookup_but_fill_the_cache(setups: dict) -> None:
    s = setups["llama-gqa"]
    eng = Engine(s["base"], s["adapters"], max_batch_size=4, prefix_cache=True)
    prompt = SHARED + [11, 12]
    scoring = GenerationRequest(
        "score", list(prompt), None, SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=1)
    )
    first = _run(eng, [scoring])
    assert first["queried"] == 0 and len(eng.prefix.blocks) == (len(prompt) - 1) // eng.runner.kv.block_tokens
    again = GenerationRequest(
        "again", list(prompt), None, SamplingParams(max_new_tokens=0, temperature=0.0, prompt_logprobs=1)
    )
    assert _run(eng, [again])["queried"] == 0
    assert (
        _run(eng, [_request("gen", None, prompt)])["hit"]
        == len(eng.prefix.blocks) * eng.runner.kv.block_tokens
    )


def test_the_prefill_budget_counts_what_rows_prefill_not_their_cached_prefix() -> None:
    """Three 530-token prompts and a 1000-token prefill budget: whole prompts, one joins a step
    (the second does not fit what the first left); with 512 of each cached, all three join."""
    from service.engine.scheduler import Scheduler

    def run(cached: int) -> list[str]:
        s = Scheduler(max_prefill_tokens=1000)
        for rid in "abc":
            s.add(_request(rid, None, list(range(530))))
        return s.admit(
            running=0, free=8, ready=lambda r: True, join=lambda r: r.id, cost=lambda rid: 530 - cached
        )

    assert run(cached=0) == ["a"]
    assert run(cached=512) == ["a", "b", "c"]


SYSTEM = (
    "You are a careful assistant. Answer in one short sentence, name the facts you rely on, and say "
    "so when you do not know. Never invent a source, a number or a name. Keep the tone plain. "
) * 3  # ~110 tokens of GPT-2: three 32-token blocks of the tiny base (head width 32)


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _complete(url: str, question: str) -> dict:
    body = {
        "model": "base",
        "prompt": SYSTEM + question,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return {"tokens": lp["tokens"], "logprobs": lp["token_logprobs"]}


@pytest.mark.slow
def test_a_shared_prefix_hits_over_http_and_answers_as_with_the_cache_off(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Two servers, ``--prefix-cache on`` and ``off``: the second request sharing the long system
    prompt hits the cache (its counters and /health/ready say so) and both answer alike."""
    args = ["--dtype", "float32"]  # bf16 matmuls round per shape: the comparison is fp32's
    answers = {}
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:  # the two start side by side
        on, off = pool.map(
            lambda mode: stack.enter_context(
                running_server(
                    tiny_base, tmp_path / "ad", tmp_path / mode, args=[*args, "--prefix-cache", mode]
                )
            ),
            ("on", "off"),
        )
        for label, srv in (("on", on), ("off", off)):
            answers[label] = [_complete(srv.url, q) for q in ("What is a prime?", "Who wrote Hamlet?")]
        assert _metric(on.url, "loraserve_prefix_cache_queries_total") > 0
        hits = _metric(on.url, "loraserve_prefix_cache_hits_total")
        assert hits >= 96  # the second request's three blocks of the system prompt, at least
        kv = httpx.get(f"{on.url}/health/ready", timeout=10).json()["kv_cache"]
        assert kv["prefix_cache"] is True and kv["prefix_blocks"] >= 3
        assert kv["prefix_bytes"] == kv["prefix_blocks"] * kv["block_bytes"]
        deadline = time.monotonic() + 5  # the gauge is refreshed between steps and while idle
        while _metric(on.url, "loraserve_prefix_cache_bytes") != kv["prefix_bytes"]:
            assert time.monotonic() < deadline, "loraserve_prefix_cache_bytes never showed the bytes held"
            time.sleep(0.2)
        info = httpx.get(f"{on.url}/metrics", timeout=10).text
        assert f'loraserve_cache_config_info{{block_size="{kv["block_tokens"]}"' in info
        assert _metric(off.url, "loraserve_prefix_cache_hits_total") == 0
        assert "loraserve_cache_config_info{" not in httpx.get(f"{off.url}/metrics", timeout=10).text
        assert httpx.get(f"{off.url}/health/ready", timeout=10).json()["kv_cache"]["prefix_cache"] is False
    for got, want in zip(answers["on"], answers["off"], strict=True):
        assert got["tokens"] == want["tokens"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= LOGPROB_TOL


def test_the_store_keeps_exact_token_chains_and_evicts_least_recently_used_leaves() -> None:
    from service.engine.kv import KVCache
    from service.engine.prefix import PrefixCache

    kv = KVCache(
        n_layer=2,
        slots=2,
        kv_heads=2,
        positions=64,
        head_dim=256,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert kv.block_tokens == 4
    for t in kv.k + kv.v:
        t[0].copy_(torch.randn_like(t[0]))
    store = PrefixCache(kv, "base-path")
    base = ("base",)
    a = list(range(100, 113))  # 13 tokens: 3 full blocks may be cached (never the last token)
    b = a[:8] + [7] * 5  # shares a's first two blocks
    assert store.insert(base, a, 0, []) == 3
    assert store.insert(base, b, 0, store.match(base, b)) == 1  # only its own third block
    assert len(store.blocks) == 4 and store.nbytes == 4 * kv.block_bytes
    assert len(store.match(base, a[:12])) == 2  # 12 tokens: the last is never matched
    assert len(store.match(base, a[:9] + [0] + a[10:])) == 2  # one token off in block 3: no match there
    assert store.match(("adapter", ("a", "v", "c", False)), a) == []  # another identity: nothing
    assert store.restore(store.match(base, a), 1) == 12
    for t in kv.k + kv.v:
        assert torch.equal(t[1, :, :12], t[0, :, :12])
    # a was used last: b's own block is the least recently used leaf (a parent is never older than
    # its children, so eviction never strands one)
    assert store.evict_to(3 * kv.block_bytes) == 1
    assert len(store.match(base, a)) == 3 and len(store.match(base, b)) == 2
    assert store.evict_to(0) == 3 and not store.blocks and store.nbytes == 0

"""Engine behaviour on a real (tiny, random-weight) GPT-2 with real PEFT LoRA adapters.

Adapters are made with PEFT on the ``tiny_base`` fixture with non-zero random B
(``init_lora_weights=False``), so every adapter changes the output and a mix-up shows.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

from loracore.atomic import publish_dir, staging_dir
from service import metrics
from service.engine import (
    AdapterNotFound,
    AdapterWeight,
    Engine,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
    TokenEvent,
)
from tests.helpers.json_schemas import SMALL_SCHEMA

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy", "1 2 3", "Once upon a time"]


def make_adapter(
    base: Path, out: Path, seed: int, r: int = 8, targets: tuple[str, ...] = ("c_attn", "c_proj")
) -> Path:
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    model = load_base_model(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_src(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters-src")
    for i, name in enumerate(["a", "b", "c"]):
        make_adapter(tiny_base, root / name, seed=100 + i)
    make_adapter(tiny_base, root / ".a-v2", seed=999)
    make_adapter(tiny_base, root / "d", seed=104, r=4, targets=("c_attn", "c_fc"))  # other rank and modules
    return root


@pytest.fixture()
def adapter_dir(adapter_src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "adapters"
    shutil.copytree(adapter_src, out)
    return out


@pytest.fixture(scope="module")
def shared_engine(tiny_base: Path, adapter_src: Path) -> Engine:
    """One engine for the tests that do not change the adapter folder (built once: faster)."""
    return Engine(tiny_base, adapter_src, max_batch_size=8)


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


Spec = str | tuple[tuple[str, float], ...] | None  # an adapter, a composition ((name, weight), ...), the base


def request(
    engine: Engine, rid: str, prompt: str, adapter: Spec, params: SamplingParams
) -> GenerationRequest:
    ids = engine.tokenizer.encode(prompt)
    if isinstance(adapter, tuple):
        composition = tuple(AdapterWeight(name, weight) for name, weight in adapter)
        return GenerationRequest(rid, ids, None, params, adapters=composition)
    return GenerationRequest(rid, ids, adapter, params)


class Result:
    def __init__(self):
        self.tokens: list[int] = []
        self.text = ""
        self.events: list[TokenEvent] = []

    @property
    def last(self) -> TokenEvent:
        return self.events[-1]


def step_events(engine: Engine) -> list[TokenEvent]:
    """One engine step, its report exported as metrics as the worker does; the step's events."""
    report = engine.step()
    metrics.record_step(report)
    return report.events


def drain(
    engine: Engine, results: dict[str, Result] | None = None, max_steps: int = 10_000
) -> dict[str, Result]:
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_active():
            break
        for ev in step_events(engine):
            res = results.setdefault(ev.id, Result())
            assert not (res.events and res.last.finished), f"event after finish for {ev.id}"
            res.events.append(ev)
            if ev.token_id is not None:
                res.tokens.append(ev.token_id)
            res.text += ev.text
    assert not engine.has_active()
    return results


def step(engine: Engine, results: dict[str, Result]) -> list[TokenEvent]:
    """One engine step, recorded into ``results`` (for tests that act between steps)."""
    events = step_events(engine)
    for ev in events:
        res = results.setdefault(ev.id, Result())
        res.events.append(ev)
        if ev.token_id is not None:
            res.tokens.append(ev.token_id)
        res.text += ev.text
    return events


def run(engine: Engine, reqs: list[GenerationRequest]) -> dict[str, Result]:
    for r in reqs:
        engine.add(r)
    return drain(engine)


def solo(engine: Engine, req: GenerationRequest) -> Result:
    return run(engine, [req])[req.id]


# --- batching --------------------------------------------------------------------------------------
def test_mixed_batch_greedy_equals_each_alone(shared_engine: Engine):
    eng = shared_engine
    # rows with log-probabilities, penalties and logit_bias share the batch with plain rows
    extras = [
        {},
        {"logprobs": 3},
        {"frequency_penalty": 1.5, "logprobs": 0},
        {},
        {"presence_penalty": 2.0, "logit_bias": {198: 5.0, 13: -3.0}, "logprobs": 5},
        {"logit_bias": {262: 8.0}},
        {"frequency_penalty": -0.5, "presence_penalty": 0.7, "logprobs": 2},
        # composed rows with the same features
        {"logprobs": 2},
        {},
        {"presence_penalty": 1.0, "logit_bias": {262: 4.0}},
        {"frequency_penalty": 0.5},
    ]
    ab, ba = (("a", 0.6), ("b", 0.4)), (("b", 1.5), ("a", -0.7))
    specs = [(0, None), (1, "a"), (2, "b"), (0, "a"), (3, "b"), (1, None), (3, "a")]
    # composed rows: two compositions of the same adapters, one with a third adapter, one of one
    specs += [(0, ab), (1, ba), (2, (("a", 0.5), ("c", 0.5), ("d", 1.0))), (0, (("b", 0.5),))]
    reqs = [request(eng, f"m{i}", PROMPTS[p], ad, greedy(12, **extras[i])) for i, (p, ad) in enumerate(specs)]
    mixed = run(eng, reqs)
    alone = {
        r.id: solo(eng, request(eng, r.id, PROMPTS[p], ad, greedy(12, **extras[i])))
        for i, (r, (p, ad)) in enumerate(zip(reqs, specs, strict=True))
    }
    for i, r in enumerate(reqs):
        assert mixed[r.id].tokens == alone[r.id].tokens, r.id
        assert mixed[r.id].text == alone[r.id].text
        assert mixed[r.id].last.finish_reason == "length"
        assert mixed[r.id].last.completion_tokens == 12 == len(mixed[r.id].tokens)
        assert mixed[r.id].last.prompt_tokens == len(r.prompt_ids)
        k = extras[i].get("logprobs")
        for got, ref in zip(mixed[r.id].events, alone[r.id].events, strict=True):
            if k is None:
                assert got.logprob is None and got.top_logprobs is None
                continue
            assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
            assert [t for t, _ in got.top_logprobs] == [t for t, _ in ref.top_logprobs]
            assert len(got.top_logprobs) == k
    # the adapters really change the output (otherwise the test above could not fail)
    assert mixed["m0"].tokens != mixed["m3"].tokens
    assert mixed["m1"].tokens != mixed["m5"].tokens
    assert mixed["m4"].tokens != mixed["m6"].tokens
    assert mixed["m7"].tokens != mixed["m0"].tokens  # a composition is not the base...
    assert mixed["m7"].tokens != solo(eng, request(eng, "pa", PROMPTS[0], "a", greedy(12))).tokens  # nor a
    assert mixed["m10"].tokens != solo(eng, request(eng, "pb", PROMPTS[0], "b", greedy(12))).tokens
    # and so do the penalties and the bias: the same prompt and adapter without them differs
    for i in (2, 4, 5, 6):
        p, ad = specs[i]
        plain = solo(eng, request(eng, f"plain{i}", PROMPTS[p], ad, greedy(12)))
        assert plain.tokens != mixed[f"m{i}"].tokens, i


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    """The Hugging Face model's own next-token logits after ``ids`` (fp32)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_logprobs_are_the_models_log_softmax(shared_engine: Engine, tiny_base: Path):
    """Each event's logprobs equal a log_softmax of the model's own logits, adjusted the same way
    (logit_bias, penalties over the tokens generated so far, temperature) and before top-k/top-p."""
    from trainer.model import load_base_model

    eng = shared_engine
    model = load_base_model(tiny_base).eval()
    prompt = eng.tokenizer.encode(PROMPTS[1])
    cases = {
        "greedy": greedy(8, logprobs=5),
        "adjusted": greedy(8, logprobs=4, frequency_penalty=0.8, presence_penalty=0.6, logit_bias={11: 2.5}),
        "sampled": SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, seed=3, logprobs=3),
    }
    results = run(eng, [GenerationRequest(name, list(prompt), None, p) for name, p in cases.items()])
    for name, params in cases.items():
        res = results[name]
        temp = 1.0 if params.greedy else params.temperature
        for n, ev in enumerate(res.events):
            logits = _reference_logits(model, prompt + res.tokens[:n])
            for token, bias in params.logit_bias.items():
                logits[token] += bias
            counts = torch.bincount(torch.tensor(res.tokens[:n], dtype=torch.long), minlength=logits.numel())
            counts = counts.float()
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
            expected = torch.log_softmax(logits / temp, dim=-1)
            assert ev.logprob == pytest.approx(float(expected[ev.token_id]), abs=1e-4), (name, n)
            top_vals, top_ids = torch.topk(expected, params.logprobs)
            assert [lp for _, lp in ev.top_logprobs] == pytest.approx(top_vals.tolist(), abs=1e-4)
            assert [t for t, _ in ev.top_logprobs] == top_ids.tolist(), (name, n)
            assert sum(math.exp(lp) for _, lp in ev.top_logprobs) <= 1 + 1e-6
            if params.greedy:  # the chosen token is a most likely one (equal logits tie)
                assert ev.logprob == pytest.approx(ev.top_logprobs[0][1], abs=1e-6)


def test_logit_bias_forces_and_bans_tokens(shared_engine: Engine):
    eng = shared_engine
    plain = solo(eng, request(eng, "lb0", PROMPTS[0], "a", greedy(6)))
    forced = solo(eng, request(eng, "lb1", PROMPTS[0], "a", greedy(6, logit_bias={464: 100.0})))
    assert forced.tokens == [464] * 6 and plain.tokens != forced.tokens
    banned = set(plain.tokens)
    out = solo(eng, request(eng, "lb2", PROMPTS[0], "a", greedy(6, logit_bias=dict.fromkeys(banned, -100.0))))
    assert not banned & set(out.tokens)


def test_penalties_reduce_repeats(shared_engine: Engine):
    """The random base repeats itself under greedy decoding; the penalties break that up."""
    eng = shared_engine
    plain = solo(eng, request(eng, "rep0", PROMPTS[1], None, greedy(24)))
    assert len(set(plain.tokens)) <= 12, plain.tokens  # the premise: a repetitive model
    presence = solo(eng, request(eng, "rep1", PROMPTS[1], None, greedy(24, presence_penalty=2.0)))
    frequency = solo(eng, request(eng, "rep2", PROMPTS[1], None, greedy(24, frequency_penalty=2.0)))
    assert len(set(presence.tokens)) > len(set(plain.tokens))
    assert len(set(frequency.tokens)) > len(set(plain.tokens))
    # a negative penalty makes repeats likelier
    encourage = solo(eng, request(eng, "rep3", PROMPTS[1], None, greedy(24, presence_penalty=-2.0)))
    assert len(set(encourage.tokens)) <= len(set(plain.tokens))


def json_params(schema: dict, n: int = 48, **kw) -> SamplingParams:
    from service import structured

    return SamplingParams(max_new_tokens=n, json_schema=structured.check(schema), **kw)


def test_mixed_batch_with_json_rows_free_rows_equal_each_alone(shared_engine: Engine):
    """Constrained and free rows share every forward pass; the mask touches the constrained rows only."""
    import jsonschema

    eng = shared_engine
    free = {
        "f0": (0, None, greedy(12)),
        "f1": (1, "a", greedy(12)),
        "f2": (2, "b", SamplingParams(max_new_tokens=12, temperature=0.9, seed=7)),
        "f3": (3, None, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)),
    }
    constrained = {
        "j0": (0, None, json_params(SMALL_SCHEMA, temperature=0)),
        "j1": (1, "a", json_params(SMALL_SCHEMA, temperature=0)),
        "j2": (2, "b", json_params(SMALL_SCHEMA, temperature=1.0, seed=11)),
        "j3": (3, "d", json_params({"type": "object"}, n=64, temperature=0.8, top_k=50, seed=5)),
    }
    specs = {**free, **constrained}
    mixed = run(eng, [request(eng, rid, PROMPTS[p], ad, sp) for rid, (p, ad, sp) in specs.items()])
    for rid, (p, ad, sp) in specs.items():
        assert mixed[rid].tokens == solo(eng, request(eng, rid, PROMPTS[p], ad, sp)).tokens, rid
    for rid in ("j0", "j1", "j2"):
        assert mixed[rid].last.finish_reason == "eos", (rid, mixed[rid].text)
        jsonschema.validate(json.loads(mixed[rid].text), SMALL_SCHEMA)
    j3 = mixed["j3"]
    if j3.last.finish_reason == "eos":
        assert isinstance(json.loads(j3.text), dict)
    else:  # JSON mode has no size bound: a random model may run out of tokens first
        assert j3.last.finish_reason == "length" and j3.last.completion_tokens == 64
        assert j3.text.startswith("{")
    # without the mask the same rows produce no JSON (so the test above could fail)
    unconstrained = solo(eng, request(eng, "u0", PROMPTS[0], None, greedy(48)))
    assert unconstrained.tokens[: len(mixed["j0"].tokens)] != mixed["j0"].tokens


def test_json_row_out_of_tokens_is_length_and_state_leaves_with_the_row(shared_engine: Engine):
    eng = shared_engine
    eng.add(request(eng, "short", PROMPTS[0], None, json_params(SMALL_SCHEMA, n=3, temperature=0)))
    res: dict[str, Result] = {}
    step(eng, res)
    row = eng.batch.rows[0]
    assert row.constraint is not None and not row.constraint.accepting
    drain(eng, res)
    assert res["short"].last.finish_reason == "length" and res["short"].last.completion_tokens == 3
    assert row.constraint is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(res["short"].text)


def test_json_schema_compiled_once_and_bad_schema_refused(shared_engine: Engine):
    from service import structured

    eng = shared_engine
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}}, "required": ["once"]}
    before = eng.grammars.compiled
    run(eng, [request(eng, f"c{i}", PROMPTS[i], None, json_params(schema, temperature=0)) for i in range(3)])
    assert eng.grammars.compiled == before + 1
    bad = SamplingParams(json_schema=structured.canonical({"not": {"type": "string"}}))
    with pytest.raises(ValueError, match="not"):
        eng.add(request(eng, "bad", PROMPTS[0], None, bad))
    with pytest.raises(ValueError, match="ignore_eos"):
        eng.add(request(eng, "bad2", PROMPTS[0], None, json_params(schema, ignore_eos=True)))
    assert not eng.has_active()


def test_grammar_mask_fits_a_model_vocab_other_than_the_tokenizers(shared_engine: Engine):
    """A padded output layer (more ids than tokens): the extra ids are never allowed."""
    from service import structured
    from service.engine.constraints import Grammars
    from service.engine.sampling import apply_token_bitmask

    tok = shared_engine.tokenizer
    padded = Grammars(tok, model_vocab=len(tok) + 47, eos_ids=shared_engine.eos_ids)
    c = padded.start(structured.check({"type": "string"}))
    mask = padded.masks([c])
    assert mask.shape == (1, (len(tok) + 47 + 31) // 32)
    logits = torch.zeros(2, len(tok) + 47)
    logits = apply_token_bitmask(logits, [1], mask)
    assert torch.all(logits[0] == 0)  # the free row is untouched
    allowed = torch.isfinite(logits[1])
    assert not allowed[len(tok) :].any()
    assert allowed[tok.encode('"')[0]] and not allowed[tok.encode("hello")[0]]
    assert c.advance(tok.encode('"')[0]) is None
    assert "refused" in padded.start(structured.check({"type": "string"})).advance(tok.encode("hello")[0])
    # a model with fewer ids than the mask covers: the mask is cut to the logits
    small = torch.zeros(1, 1000)
    small = apply_token_bitmask(small, [0], mask)
    assert small.shape == (1, 1000) and torch.isfinite(small).sum() >= 1


def test_grammar_cache_is_bounded_and_keyed_by_the_canonical_schema(shared_engine: Engine):
    from service import structured
    from service.engine.constraints import Grammars

    grammars = Grammars(shared_engine.tokenizer, 50257, shared_engine.eos_ids, max_grammars=2)
    texts = [structured.check({"type": "string", "maxLength": n}) for n in (1, 2, 3)]
    for t in texts:
        grammars.start(t)
    assert grammars.compiled == 3 and len(grammars._cache) == 2
    same = structured.check({"maxLength": 3, "type": "string"})  # other key order: the same schema
    assert same == texts[2]
    grammars.start(same)
    assert grammars.compiled == 3
    grammars.start(texts[0])  # evicted: compiled again
    assert grammars.compiled == 4 and len(grammars._cache) == 2


def test_mixed_ranks_and_modules_in_one_batch(shared_engine: Engine):
    """Adapters of different rank and target modules share a decode step (zero-padded stacks)."""
    eng = shared_engine
    specs = [(0, "d"), (1, "a"), (2, "d"), (3, None), (0, "b"), (1, "d")]
    reqs = [request(eng, f"r{i}", PROMPTS[p], ad, greedy(10)) for i, (p, ad) in enumerate(specs)]
    mixed = run(eng, reqs)
    for r, (p, ad) in zip(reqs, specs, strict=True):
        assert mixed[r.id].tokens == solo(eng, request(eng, r.id, PROMPTS[p], ad, greedy(10))).tokens, r.id
    assert mixed["r0"].tokens != solo(eng, request(eng, "base0", PROMPTS[0], None, greedy(10))).tokens


def test_matches_peft_generate(shared_engine: Engine, tiny_base: Path, adapter_src: Path):
    """The engine's own LoRA forward reproduces PEFT's greedy generation."""
    from peft import PeftModel

    from trainer.model import load_base_model

    eng = shared_engine
    model = PeftModel.from_pretrained(load_base_model(tiny_base), adapter_src / "b").eval()
    for p in PROMPTS[:2]:
        ids = eng.tokenizer.encode(p)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=50256)
        assert solo(eng, request(eng, "peft", p, "b", greedy(10))).tokens == out[0, len(ids) :].tolist()


def test_composition_matches_peft_cat(shared_engine: Engine, tiny_base: Path, adapter_src: Path):
    """A weighted composition reproduces PEFT's add_weighted_adapter(combination_type="cat") in fp32,
    alone and in a batch with plain rows, the base and another composition."""
    from peft import PeftModel

    from trainer.model import load_base_model

    eng = shared_engine
    names, weights = ["a", "b", "d"], [0.6, -0.4, 1.3]  # d has another rank: cat sums the ranks
    model = PeftModel.from_pretrained(load_base_model(tiny_base), adapter_src / "a", adapter_name="a")
    for name in names[1:]:
        model.load_adapter(adapter_src / name, adapter_name=name)
    model.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    spec = tuple(zip(names, weights, strict=True))
    want = {}
    for k, p in enumerate(PROMPTS[:3]):
        ids = eng.tokenizer.encode(p)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=50256)
        want[f"cat{k}"] = out[0, len(ids) :].tolist()
        assert solo(eng, request(eng, f"cat{k}", p, spec, greedy(10))).tokens == want[f"cat{k}"]
    others = [(1, "b"), (2, None), (0, (("c", 1.0), ("a", 0.3)))]
    reqs = [request(eng, f"cat{k}", p, spec, greedy(10)) for k, p in enumerate(PROMPTS[:3])]
    reqs += [request(eng, f"o{i}", PROMPTS[p], ad, greedy(10)) for i, (p, ad) in enumerate(others)]
    mixed = run(eng, reqs)
    for rid, tokens in want.items():
        assert mixed[rid].tokens == tokens, rid
    base = solo(eng, request(eng, "base", PROMPTS[0], None, greedy(10))).tokens
    assert want["cat0"] != base
    flipped = tuple(zip(names, [0.6, 0.4, 1.3], strict=True))  # one sign off: another answer
    assert any(
        solo(eng, request(eng, "flip", p, flipped, greedy(10))).tokens != want[f"cat{k}"]
        for k, p in enumerate(PROMPTS[:3])
    )


def test_single_entry_of_weight_one_is_the_adapter(shared_engine: Engine):
    eng = shared_engine
    for p in PROMPTS[:2]:
        plain = solo(eng, request(eng, "plain", p, "c", greedy(10)))
        one = solo(eng, request(eng, "one", p, (("c", 1.0),), greedy(10)))
        assert one.tokens == plain.tokens and one.text == plain.text
        half = solo(eng, request(eng, "half", p, (("c", 0.5),), greedy(10)))
        assert half.tokens != plain.tokens  # the weight is applied


def test_composition_pins_every_adapter_until_it_leaves(tiny_base: Path, adapter_dir: Path):
    eng = Engine(tiny_base, adapter_dir, max_loaded_adapters=3)
    eng.add(request(eng, "ab", PROMPTS[0], (("a", 0.5), ("b", 0.5)), greedy(6)))
    eng.add(request(eng, "bc", PROMPTS[1], (("b", 1.0), ("c", -1.0)), greedy(3)))

    def refs() -> dict[str, int]:
        return {e["name"]: e["refs"] for e in eng.stats()["adapter_cache"]["loaded"]}

    res: dict[str, Result] = {}
    step(eng, res)
    assert refs() == {"a": 1, "b": 2, "c": 1}
    # a fourth adapter does not fit while all three are pinned: its request waits
    eng.add(request(eng, "d", PROMPTS[2], "d", greedy(2)))
    step(eng, res)
    assert eng.stats()["waiting"] == 1
    for _ in range(3):
        step(eng, res)
    assert res["bc"].last.finished and not res["ab"].last.finished
    assert refs()["b"] == 1 and refs()["a"] == 1  # bc left: its pins are released
    drain(eng, res)
    assert all(n == 0 for n in refs().values())
    assert res["d"].last.finish_reason == "length"
    # a composition larger than the cache can never run: refused at once
    with pytest.raises(ValueError, match="at most 3"):
        eng.add(request(eng, "big", PROMPTS[0], (("a", 1), ("b", 1), ("c", 1), ("d", 1)), greedy(2)))
    # deleted between add and admission: the error names the missing component, nothing stays pinned
    shutil.copytree(adapter_dir / "c", adapter_dir / "gone")
    eng.add(request(eng, "g", PROMPTS[0], (("a", 1.0), ("gone", 0.5)), greedy(2)))
    shutil.rmtree(adapter_dir / "gone")
    (ev,) = step_events(eng)
    assert ev.finish_reason == "error" and ev.error_code == "adapter_not_found" and "'gone'" in ev.error
    assert all(n == 0 for n in refs().values())


def test_bad_compositions_rejected(shared_engine: Engine):
    eng = shared_engine
    with pytest.raises(AdapterNotFound, match="nope"):
        eng.add(request(eng, "u", PROMPTS[0], (("a", 0.5), ("nope", 0.5)), greedy(2)))
    for bad, match in [
        ((), "1 to 8"),
        (tuple((n, 0.1) for n in "abcabcabc"), "1 to 8"),
        ((("a", 2.5),), "weight must be in"),
        ((("a", float("nan")),), "weight must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            eng.add(request(eng, "u", PROMPTS[0], bad, greedy(2)))
    both = GenerationRequest("u", [1, 2], "a", greedy(2), adapters=(AdapterWeight("b", 1.0),))
    with pytest.raises(ValueError, match="exclusive"):
        eng.add(both)
    assert not eng.has_active()


def test_join_mid_generation(shared_engine: Engine):
    eng = shared_engine
    first = [
        request(eng, "j0", PROMPTS[0], "a", greedy(20)),
        request(eng, "j1", PROMPTS[1], None, greedy(20)),
    ]
    late = request(eng, "j2", PROMPTS[3], "b", greedy(8))
    ref = {
        r.id: solo(
            eng,
            request(
                eng, r.id, eng.tokenizer.decode(r.prompt_ids), r.adapter, greedy(r.params.max_new_tokens)
            ),
        )
        for r in [*first, late]
    }
    for r in first:
        eng.add(r)
    results: dict[str, Result] = {}
    for _ in range(5):
        step(eng, results)
    assert eng.stats()["rows"] == 2
    eng.add(late)
    step(eng, results)  # the newcomer gets its first token in the very next step
    assert len(results["j2"].tokens) == 1 and eng.stats()["rows"] == 3
    drain(eng, results)
    for rid in ("j0", "j1", "j2"):
        assert results[rid].tokens == ref[rid].tokens, rid
    assert len(results["j2"].tokens) == 8


def test_prefill_and_decode_steps_alternate_under_arrivals(shared_engine: Engine):
    """A newcomer's first token comes from a step that only prefills; with a request arriving
    before every step, the running row still gets a token every second step."""
    eng = shared_engine
    eng.add(request(eng, "run", PROMPTS[0], "a", greedy(12)))
    assert [e.id for e in step_events(eng)] == ["run"]  # nothing was running: admitted at once
    seen = []
    for i in range(6):
        eng.add(request(eng, f"arr{i}", PROMPTS[1], None, greedy(1)))
        seen.append(sorted(e.id for e in step_events(eng)))
    # requests that arrived during a decode step are admitted together in the next one
    assert seen == [["run"], ["arr0", "arr1"], ["run"], ["arr2", "arr3"], ["run"], ["arr4", "arr5"]]
    res = drain(eng)
    assert set(res) == {"run"} and len(res["run"].tokens) == 12 - 4


def test_finished_rows_leave_at_once(shared_engine: Engine):
    eng = shared_engine
    eng.add(request(eng, "short", PROMPTS[0], "a", greedy(2)))
    eng.add(request(eng, "long", PROMPTS[1], "b", greedy(10)))
    step_events(eng)  # prefill: one token each
    ev = {e.id: e for e in step_events(eng)}
    assert ev["short"].finished and ev["short"].finish_reason == "length"
    assert eng.stats()["rows"] == 1
    drain(eng)


def test_seeded_sampling_reproducible_in_batch(shared_engine: Engine):
    eng = shared_engine

    def sampled(rid: str, seed: int | None, **kw) -> GenerationRequest:
        return request(eng, rid, PROMPTS[2], "a", SamplingParams(max_new_tokens=16, seed=seed, **kw))

    alone = solo(eng, sampled("s", 7, temperature=1.3, top_k=50, top_p=0.9)).tokens
    batch = run(
        eng,
        [
            sampled("x", 1, temperature=0.8),
            sampled("s", 7, temperature=1.3, top_k=50, top_p=0.9),
            request(eng, "g", PROMPTS[0], None, greedy(16)),
            sampled("y", None, temperature=2.0, top_p=0.5),
        ],
    )
    assert batch["s"].tokens == alone
    other = solo(eng, sampled("s2", 8, temperature=1.3, top_k=50, top_p=0.9)).tokens
    assert other != alone  # the seed matters
    greedy_tokens = solo(eng, request(eng, "g0", PROMPTS[2], "a", greedy(16))).tokens
    assert alone != greedy_tokens  # sampling is not greedy in disguise


def test_top_k_one_is_greedy(shared_engine: Engine):
    eng = shared_engine
    a = solo(
        eng, request(eng, "k1", PROMPTS[1], "b", SamplingParams(max_new_tokens=10, top_k=1, temperature=5.0))
    )
    b = solo(eng, request(eng, "k0", PROMPTS[1], "b", greedy(10)))
    assert a.tokens == b.tokens


# --- stopping and text ------------------------------------------------------------------------------
def test_stop_string_cuts_text(shared_engine: Engine):
    eng = shared_engine
    full = solo(eng, request(eng, "full", PROMPTS[3], "b", greedy(24)))
    text = full.text
    assert text == eng.tokenizer.decode(full.tokens)
    # a stop string that starts in the middle of the output (spanning tokens when possible)
    start = len(text) // 2
    stop = text[start : start + 5]
    cut = text.find(stop)
    res = solo(eng, request(eng, "stop", PROMPTS[3], "b", greedy(24, stop=["never-appears", stop])))
    assert res.last.finish_reason == "stop"
    assert res.text == text[:cut]
    assert stop not in res.text
    assert res.tokens == full.tokens[: len(res.tokens)] and len(res.tokens) < 24
    # no event released any part of the stop string before the match was certain
    emitted = ""
    for ev in res.events:
        emitted += ev.text
        assert text[:cut].startswith(emitted)


def test_length_and_context_limits(shared_engine: Engine):
    eng = shared_engine
    res = solo(eng, request(eng, "len", PROMPTS[0], None, greedy(5)))
    assert res.last.finish_reason == "length" and res.last.completion_tokens == 5
    n_pos = eng.n_positions
    with pytest.raises(PromptTooLong, match=str(n_pos)):
        eng.add(GenerationRequest("long", [11] * (n_pos - 3), None, greedy(4)))
    # exactly at the limit is fine
    res = run(eng, [GenerationRequest("edge", [11] * (n_pos - 4), None, greedy(4))])["edge"]
    assert res.last.finish_reason == "length" and len(res.tokens) == 4


def test_bad_parameters_rejected(shared_engine: Engine):
    eng = shared_engine
    for params in (SamplingParams(max_new_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0)):
        with pytest.raises(ValueError):
            eng.add(GenerationRequest("bad", [1, 2], None, params))
    with pytest.raises(ValueError, match="token ids"):
        eng.add(GenerationRequest("bad", [10**6], None, greedy(2)))
    for kw, field in (
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {eng.runner.vocab_size: 1.0}}, "logit_bias"),
    ):
        with pytest.raises(ValueError, match=field):
            eng.add(GenerationRequest("bad", [1, 2], None, greedy(2, **kw)))
    eng.add(GenerationRequest("dup", [1, 2], None, greedy(2)))
    with pytest.raises(ValueError, match="already"):
        eng.add(GenerationRequest("dup", [1, 2], None, greedy(2)))
    drain(eng)


def test_eos_finishes_row(tiny_base: Path, tmp_path: Path, adapter_src: Path):
    """A base whose EOS embedding is a scaled copy of a token the model picks greedily ends on EOS."""
    from trainer.model import load_base_model, load_tokenizer

    base = tmp_path / "eos-base"
    shutil.copytree(tiny_base, base)
    model = load_base_model(base)
    tok = load_tokenizer(base)
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    target = int(out[0, -1])
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id] = model.transformer.wte.weight[target] * 3
    model.save_pretrained(base)
    eng = Engine(base, adapter_src)
    res = solo(eng, request(eng, "eos", PROMPTS[1], None, greedy(30)))
    assert res.last.finish_reason == "eos"
    assert res.tokens[-1] == tok.eos_token_id and tok.eos_token_id not in res.tokens[:-1]
    assert len(res.tokens) < 30 and res.last.completion_tokens == len(res.tokens)
    assert res.text == tok.decode(res.tokens[:-1]) and "<|endoftext|>" not in res.text
    # ignore_eos keeps going to the length limit
    res = solo(eng, request(eng, "eos2", PROMPTS[1], None, greedy(30, ignore_eos=True)))
    assert res.last.finish_reason == "length" and len(res.tokens) == 30


def test_text_deltas_concatenate_on_multibyte_output(shared_engine: Engine):
    """Sampling from a random model emits stray bytes of multi-byte characters; deltas still add up."""
    eng = shared_engine
    multibyte = 0
    for seed in range(6):
        params = SamplingParams(max_new_tokens=40, temperature=3.0, seed=seed)
        res = solo(eng, request(eng, f"mb{seed}", "日本語のテキスト 🎉 héllo", "a", params))
        assert res.text == eng.tokenizer.decode(res.tokens)
        for ev in res.events[:-1]:
            assert "\ufffd" not in ev.text or ev.text.count("\ufffd") <= res.text.count("\ufffd")
        multibyte += sum(1 for ch in res.text if ord(ch) > 127)
    assert multibyte > 0  # the test exercised multi-byte output


# --- adapters ----------------------------------------------------------------------------------------
def test_unknown_and_invalid_adapter(shared_engine: Engine):
    eng = shared_engine
    with pytest.raises(AdapterNotFound, match="nope"):
        eng.add(request(eng, "u", PROMPTS[0], "nope", greedy(2)))
    for bad in ("../a", ".a-v2", "", "a/b"):
        with pytest.raises(AdapterNotFound):
            eng.add(request(eng, "u", PROMPTS[0], bad, greedy(2)))
    with pytest.raises(AdapterNotFound):
        eng.adapter_template("nope")
    assert not eng.has_active()


def test_adapter_appears_and_disappears(tiny_base: Path, adapter_dir: Path, adapter_src: Path):
    eng = Engine(tiny_base, adapter_dir)
    with pytest.raises(AdapterNotFound):
        eng.add(request(eng, "n0", PROMPTS[0], "new", greedy(4)))
    shutil.copytree(adapter_src / "b", adapter_dir / "new")  # appears: servable with no call
    new = solo(eng, request(eng, "n1", PROMPTS[0], "new", greedy(6)))
    assert new.tokens == solo(eng, request(eng, "n2", PROMPTS[0], "b", greedy(6))).tokens
    # deleted while running: the running row finishes, new requests are rejected
    eng.add(request(eng, "n3", PROMPTS[1], "new", greedy(10)))
    res: dict[str, Result] = {}
    step(eng, res)
    shutil.rmtree(adapter_dir / "new")
    with pytest.raises(AdapterNotFound):
        eng.add(request(eng, "n4", PROMPTS[0], "new", greedy(4)))
    drain(eng, res)
    assert res["n3"].last.finish_reason == "length" and len(res["n3"].tokens) == 10
    assert "new" in eng.stats()["adapters_loaded"]
    with pytest.raises(AdapterNotFound):  # the folder is gone and nothing uses it: memory is freed
        eng.add(request(eng, "n4", PROMPTS[0], "new", greedy(4)))
    assert "new" not in eng.stats()["adapters_loaded"]
    # deleted between add and admission: an error event names the adapter
    shutil.copytree(adapter_src / "c", adapter_dir / "gone")
    eng.add(request(eng, "n5", PROMPTS[0], "gone", greedy(4)))
    shutil.rmtree(adapter_dir / "gone")
    (ev,) = step_events(eng)
    assert ev.finished and ev.finish_reason == "error" and "gone" in ev.error
    assert ev.error_code == "adapter_not_found"  # the server answers 404, not 500


def test_lru_eviction(tiny_base: Path, adapter_dir: Path):
    eng = Engine(tiny_base, adapter_dir, max_loaded_adapters=2)
    before = metrics.ADAPTER_CACHE_EVICTIONS._value.get()
    ref = {}
    for name in ("a", "b", "c"):
        ref[name] = solo(eng, request(eng, name, PROMPTS[0], name, greedy(6))).tokens
    st = eng.stats()
    assert st["adapters_loaded"] == ["b", "c"]
    assert st["adapter_cache"]["misses"] == 3 and st["adapter_cache"]["evictions"] == 1
    assert metrics.ADAPTER_CACHE_EVICTIONS._value.get() - before == 1
    solo(eng, request(eng, "b2", PROMPTS[0], "b", greedy(2)))  # hit, b becomes most recent
    assert eng.stats()["adapter_cache"]["hits"] == 1
    again = solo(eng, request(eng, "a2", PROMPTS[0], "a", greedy(6)))  # reload a, evict c (LRU)
    assert again.tokens == ref["a"]
    assert eng.stats()["adapters_loaded"] == ["b", "a"]
    assert eng.stats()["adapter_cache"]["misses"] == 4


def test_pinned_adapters_are_not_evicted(tiny_base: Path, adapter_dir: Path):
    """With both cache entries in use, a third adapter's request waits for a free entry."""
    eng = Engine(tiny_base, adapter_dir, max_loaded_adapters=2)
    eng.add(request(eng, "pa", PROMPTS[0], "a", greedy(3)))
    eng.add(request(eng, "pb", PROMPTS[1], "b", greedy(12)))
    eng.add(request(eng, "pc", PROMPTS[2], "c", greedy(4)))
    step_events(eng)
    assert eng.stats()["rows"] == 2 and eng.stats()["waiting"] == 1
    res = drain(eng)
    assert all(res[r].last.finish_reason == "length" for r in ("pa", "pb", "pc"))
    assert len(eng.stats()["adapters_loaded"]) <= 2
    ref = Engine(tiny_base, adapter_dir)
    assert res["pc"].tokens == solo(ref, request(ref, "pc", PROMPTS[2], "c", greedy(4))).tokens


def test_replaced_adapter_is_picked_up(tiny_base: Path, adapter_dir: Path, tmp_path: Path):
    eng = Engine(tiny_base, adapter_dir)
    v1_long = solo(eng, request(eng, "v1", PROMPTS[1], "a", greedy(12))).tokens
    eng.add(request(eng, "old", PROMPTS[1], "a", greedy(12)))
    res: dict[str, Result] = {}
    step(eng, res)  # running on version 1
    staging = staging_dir(adapter_dir, "a")
    shutil.copytree(adapter_dir / ".a-v2", staging, dirs_exist_ok=True)
    publish_dir(staging, adapter_dir / "a")  # atomic swap, as uploads and training publish
    eng.add(request(eng, "new", PROMPTS[1], "a", greedy(12)))
    drain(eng, res)
    assert res["old"].tokens == v1_long  # kept the weights it started with
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    shutil.copytree(adapter_dir / "a", fresh_dir / "a")
    fresh = Engine(tiny_base, fresh_dir)
    assert res["new"].tokens == solo(fresh, request(fresh, "v2", PROMPTS[1], "a", greedy(12))).tokens
    assert res["new"].tokens != v1_long
    assert eng.stats()["adapter_cache"]["reloads"] == 1


def test_pinned_versions_share_a_batch_with_the_newest(tiny_base: Path, adapter_dir: Path):
    """``a@<id prefix>`` is served by exactly that version (a kept copy in .versions/) while ``a`` gets
    the newest, in one batch; each version is one cache entry keyed by its sha256."""
    from loracore import artifact

    eng = Engine(tiny_base, adapter_dir)
    v1 = artifact.weights_digest(adapter_dir / "a")
    v1_tokens = solo(eng, request(eng, "v1", PROMPTS[1], "a", greedy(12))).tokens
    artifact.keep_version(adapter_dir, "a", 3, replacing=True)
    staging = staging_dir(adapter_dir, "a")
    shutil.copytree(adapter_dir / ".a-v2", staging, dirs_exist_ok=True)
    publish_dir(staging, adapter_dir / "a")
    v2 = artifact.weights_digest(adapter_dir / "a")
    assert v2 != v1
    res = run(
        eng,
        [
            request(eng, "new", PROMPTS[1], "a", greedy(12)),
            request(eng, "old", PROMPTS[1], f"a@{v1[:8]}", greedy(12)),
            request(eng, "full", PROMPTS[1], f"a@{v1.upper()}", greedy(12)),
        ],
    )
    assert res["old"].tokens == res["full"].tokens == v1_tokens
    assert res["new"].tokens != v1_tokens
    loaded = eng.stats()["adapter_cache"]["loaded"]
    assert sorted((e["name"], e["version"]) for e in loaded) == sorted([("a", v1), ("a", v2)])
    assert eng.stats()["adapters_loaded"] == ["a"]
    with pytest.raises(AdapterNotFound):
        eng.add(request(eng, "gone", PROMPTS[1], "a@0123456789abcdef", greedy(2)))
    with pytest.raises(AdapterNotFound, match="invalid adapter name or version"):
        eng.add(request(eng, "short", PROMPTS[1], f"a@{v1[:7]}", greedy(2)))


def test_broken_adapter_fails_only_its_request(tiny_base: Path, adapter_dir: Path):
    eng = Engine(tiny_base, adapter_dir)
    (adapter_dir / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cfg = json.loads((adapter_dir / "b" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter_dir / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    res = run(
        eng,
        [
            request(eng, "x", PROMPTS[0], "a", greedy(4)),
            request(eng, "y", PROMPTS[0], "b", greedy(4)),
            request(eng, "z", PROMPTS[0], "c", greedy(4)),
        ],
    )
    assert res["x"].last.finish_reason == "error" and "'a'" in res["x"].last.error
    assert res["y"].last.finish_reason == "error" and "DoRA" in res["y"].last.error
    assert res["z"].last.finish_reason == "length"
    # a composition with a broken component fails alone; its loaded components are not left pinned
    res = run(eng, [request(eng, "w", PROMPTS[0], (("c", 0.5), ("a", 0.5)), greedy(4))])
    assert res["w"].last.finish_reason == "error" and "'a'" in res["w"].last.error
    assert all(e["refs"] == 0 for e in eng.stats()["adapter_cache"]["loaded"])
    assert "c" in eng.stats()["adapters_loaded"]


def test_adapter_template(tiny_base: Path, adapter_dir: Path):
    from loracore.template import DEFAULT_TEMPLATE, PromptTemplate

    eng = Engine(tiny_base, adapter_dir)
    assert eng.adapter_template(None) == DEFAULT_TEMPLATE
    assert eng.adapter_template("a") == DEFAULT_TEMPLATE  # no loraserve.json
    custom = PromptTemplate(name="q-a", user="Q: {content}\n", assistant_prefix="A:")
    (adapter_dir / "b" / "loraserve.json").write_text(json.dumps({"template": custom.to_dict(), "format": 1}))
    assert eng.adapter_template("b") == custom


# --- engine plumbing ------------------------------------------------------------------------------------
def test_cancel_and_capacity(shared_engine: Engine):
    eng = shared_engine
    for i in range(eng.max_batch_size):
        assert eng.has_capacity()
        eng.add(request(eng, f"c{i}", PROMPTS[i % 4], None, greedy(50)))
    assert not eng.has_capacity()
    eng.add(request(eng, "extra", PROMPTS[0], None, greedy(3)))  # accepted: waits for a row
    step_events(eng)
    assert eng.stats()["rows"] == eng.max_batch_size and eng.stats()["waiting"] == 1
    eng.cancel("c3")
    eng.cancel("does-not-exist")
    ids = {e.id for e in step_events(eng)}  # a decode step (the last step prefilled): c3 is gone
    assert "c3" not in ids and len(ids) == eng.max_batch_size - 1
    ids = {e.id for e in step_events(eng)}  # a prefill step: the freed row takes the waiting request
    assert ids == {"extra"}
    for i in range(eng.max_batch_size):
        eng.cancel(f"c{i}")
    res = drain(eng)
    assert set(res) == {"extra"} and res["extra"].last.finish_reason == "length"


def test_single_thread_enforced(tiny_base: Path, adapter_src: Path):
    eng = Engine(tiny_base, adapter_src)
    step_events(eng)
    errors = []

    def other():
        try:
            step_events(eng)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "one thread" in str(errors[0])


def test_metrics_updated(shared_engine: Engine):
    from prometheus_client import REGISTRY

    eng = shared_engine

    def value(name, labels=None):
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    gen0 = value("loraserve_generated_tokens_total", {"adapter": "a"})
    prompt0 = value("loraserve_prompt_tokens_total", {"adapter": "__base__"})
    ttft0 = value("loraserve_time_to_first_token_seconds_count", {"adapter": "a"})
    batch0 = value("loraserve_batch_size_count")
    reqs = [request(eng, "ma", PROMPTS[0], "a", greedy(5)), request(eng, "mb", PROMPTS[1], None, greedy(3))]
    run(eng, reqs)
    assert value("loraserve_generated_tokens_total", {"adapter": "a"}) - gen0 == 5
    assert value("loraserve_prompt_tokens_total", {"adapter": "__base__"}) - prompt0 == len(
        reqs[1].prompt_ids
    )
    assert value("loraserve_time_to_first_token_seconds_count", {"adapter": "a"}) - ttft0 == 1
    assert value("loraserve_batch_size_count") - batch0 == 4  # decode steps after the shared prefill
    assert value("loraserve_num_requests_running") == 0
    # a composed row counts per component adapter (bounded labels), never under a label of its own
    gen_b, gen_c = (value("loraserve_generated_tokens_total", {"adapter": n}) for n in ("b", "c"))
    ttft_b = value("loraserve_time_to_first_token_seconds_count", {"adapter": "b"})
    run(eng, [request(eng, "mix", PROMPTS[0], (("b", 0.5), ("c", 0.5)), greedy(4))])
    assert value("loraserve_generated_tokens_total", {"adapter": "b"}) - gen_b == 4
    assert value("loraserve_generated_tokens_total", {"adapter": "c"}) - gen_c == 4
    assert value("loraserve_time_to_first_token_seconds_count", {"adapter": "b"}) - ttft_b == 1
    assert value("loraserve_generated_tokens_total", {"adapter": "b+c"}) == 0

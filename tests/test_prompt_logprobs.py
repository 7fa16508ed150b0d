"""Prompt log-probabilities in the engine: every prompt token's logprob and top-k equal a log_softmax
of the Hugging Face (+ PEFT) model's own logits on the same tokens, for the base, an adapter, a pinned
older version and a weighted composition, on GPT-2 and on a Llama-family (Qwen2) base; rows that score
their prompt share a batch with rows that do not and generate exactly what they would alone;
``max_new_tokens=0`` scores the prompt and generates nothing.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from test_engine import drain, greedy
from test_engine import request as engine_request
from test_families import CONFIGS, make_lora

from loracore import artifact
from loracore.atomic import publish_dir, staging_dir
from service.engine import Engine, GenerationRequest, SamplingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello there, how are", "1 2 3 4"]
K = 3


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def setup(request: pytest.FixtureRequest, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A base, adapters ``a`` (published twice: ``v1`` is the older version) and ``b``, an engine on
    them and the reference models: HF for the base and PEFT for each adapter and the composition."""
    from peft import PeftModel

    from trainer.model import load_base_model, make_random_llama_base

    root = tmp_path_factory.mktemp(f"prompt-logprobs-{request.param}")
    if request.param == "gpt2":
        base = tiny_base
    else:
        base = make_random_llama_base(root / "qwen2", seed=1, **CONFIGS["qwen2"])
    hf = load_base_model(base).eval()
    src, adapters = root / "src", root / "adapters"
    for name, seed in (("a", 1), ("a2", 2), ("b", 3)):
        make_lora(base, src / name, seed=seed, model=copy.deepcopy(hf))
    adapters.mkdir()
    for name in ("a", "b"):
        staging = staging_dir(adapters, name)
        shutil.copytree(src / name, staging, dirs_exist_ok=True)
        publish_dir(staging, adapters / name)
    v1 = artifact.weights_digest(adapters / "a")
    artifact.adopt(adapters, "a", 3)
    staging = staging_dir(adapters, "a")
    shutil.copytree(src / "a2", staging, dirs_exist_ok=True)
    publish_dir(staging, adapters / "a")
    mix = PeftModel.from_pretrained(copy.deepcopy(hf), src / "a2", adapter_name="a")  # a: the newest
    mix.load_adapter(src / "b", adapter_name="b")
    mix.add_weighted_adapter(["a", "b"], [0.7, -0.5], adapter_name="mix", combination_type="cat")
    mix.set_adapter("mix")
    refs = {
        "base": hf,
        "a": PeftModel.from_pretrained(copy.deepcopy(hf), src / "a2").eval(),
        f"a@{v1[:12]}": PeftModel.from_pretrained(copy.deepcopy(hf), src / "a").eval(),
        "mix": mix.eval(),
    }
    return Engine(base, adapters, max_batch_size=8, dtype=torch.float32), refs


def _expected(model, ids: list[int], k: int) -> list[tuple[int, float | None, list[int], list[float]]]:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    out: list[tuple[int, float | None, list[int], list[float]]] = [(ids[0], None, [], [])]
    for j in range(1, len(ids)):
        vals, top = torch.topk(lp[j - 1], k)
        out.append((ids[j], float(lp[j - 1, ids[j]]), top.tolist(), vals.tolist()))
    return out


def test_prompt_logprobs_equal_hf_and_peft_in_a_mixed_batch(setup):
    eng, refs = setup
    spec = {"base": None, "mix": (("a", 0.7), ("b", -0.5))}
    reqs, want = [], {}
    for target, model in refs.items():
        for p, prompt in enumerate(PROMPTS[:2]):
            adapter = spec.get(target, target)
            rid = f"{target}-{p}"
            reqs.append(engine_request(eng, rid, prompt, adapter, greedy(4, prompt_logprobs=K)))
            reqs.append(
                engine_request(eng, f"plain-{rid}", prompt, adapter, greedy(4))
            )  # the same, not scoring
            want[rid] = _expected(model, eng.tokenizer.encode(prompt), K)
    for r in reqs:
        eng.add(r)
    res = drain(eng)
    for rid, expected in want.items():
        first, *rest = res[rid].events
        assert all(ev.prompt_logprobs is None for ev in rest)
        got = first.prompt_logprobs
        assert len(got) == len(expected) == first.prompt_tokens, rid
        assert got[0] == (expected[0][0], None, [])
        assert [t for t, _, _ in got] == [e[0] for e in expected], rid
        for (_, lp, top), (_, ref_lp, ref_ids, ref_vals) in zip(got[1:], expected[1:], strict=True):
            assert lp == pytest.approx(ref_lp, abs=1e-4), rid
            assert [t for t, _ in top] == ref_ids, rid
            assert [v for _, v in top] == pytest.approx(ref_vals, abs=1e-4), rid
        # scoring the prompt changes nothing of what is generated, and plain rows carry no scores
        assert res[rid].tokens == res[f"plain-{rid}"].tokens, rid
        assert all(ev.prompt_logprobs is None for ev in res[f"plain-{rid}"].events)
    # the references differ, so each row was checked against its own target
    assert want["a-0"][1][1] != pytest.approx(want["base-0"][1][1], abs=1e-3)
    assert want["mix-0"][1][1] != pytest.approx(want["a-0"][1][1], abs=1e-3)
    pinned = next(t for t in refs if "@" in t)
    assert want[f"{pinned}-0"][1][1] != pytest.approx(want["a-0"][1][1], abs=1e-3)


def test_zero_new_tokens_scores_the_prompt_alone(setup):
    eng, refs = setup
    ids = eng.tokenizer.encode(PROMPTS[2])
    eng.add(GenerationRequest("score", list(ids), None, SamplingParams(max_new_tokens=0, prompt_logprobs=0)))
    eng.add(engine_request(eng, "gen", PROMPTS[0], None, greedy(3)))
    res = drain(eng)
    (only,) = res["score"].events
    assert only.finished and only.finish_reason == "length" and only.token_id is None
    assert (only.prompt_tokens, only.completion_tokens) == (len(ids), 0)
    expected = _expected(refs["base"], ids, 1)
    assert [top for _, _, top in only.prompt_logprobs] == [[]] * len(ids)
    assert [t for t, _, _ in only.prompt_logprobs] == ids
    got = [lp for _, lp, _ in only.prompt_logprobs]
    assert got[0] is None and got[1:] == pytest.approx([e[1] for e in expected[1:]], abs=1e-4)
    assert len(res["gen"].tokens) == 3
    assert eng.stats()["rows"] == 0  # the scoring row left the batch in its prefill step
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.add(GenerationRequest("bad", list(ids), None, SamplingParams(max_new_tokens=0)))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        eng.add(GenerationRequest("bad", list(ids), None, greedy(2, prompt_logprobs=21)))

"""The engine's parts on their own: the GPT-2 forward against Hugging Face's, LoRA against PEFT's,
incremental detokenization, stop strings, sampling filters and adapter parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.engine.dense import Dense, prepack_supported
from service.engine.gpt2 import GPT2Runner
from service.engine.lora import (
    AdapterFormatError,
    LoraPlan,
    LoraWeights,
    Mix,
    parse_adapter,
    read_adapter_files,
)
from service.engine.sampling import filter_logits
from service.engine.text import Detokenizer, StopMatcher, byte_table


@pytest.fixture(scope="module")
def tiny(tiny_base: Path):
    from trainer.model import load_base_model, load_tokenizer

    return load_base_model(tiny_base).eval(), load_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def table(tiny):
    t = byte_table(tiny[1])
    assert t is not None  # GPT-2's tokenizer is byte-level: the fast path is the one in use
    return t


def test_runner_matches_hf_logits_with_join_and_leave(tiny):
    model, _ = tiny
    runner = GPT2Runner(model, max_rows=4)
    prompts = [[464, 2068, 7586, 21831, 18045, 625], [15496, 11], [16, 362, 513, 604]]
    none = LoraPlan([])
    logits = runner.prefill(prompts, [0, 1, 2], none)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for i, p in enumerate(seqs):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-5)
    lengths = [len(p) for p in prompts]
    for step in range(3):
        toks = [int(t) for t in logits.argmax(-1)]
        logits = runner.decode(toks, lengths, none)
        for i, t in enumerate(toks):
            seqs[i].append(t)
            lengths[i] += 1
        if step == 1:  # row 0 leaves: the last row moves into its slot
            runner.move_row(2, 0, lengths[2])
            seqs, lengths, logits = [seqs[2], seqs[1]], [lengths[2], lengths[1]], logits[[2, 1]]
    with torch.no_grad():
        for i, p in enumerate(seqs):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-5)


def test_bf16_runner_on_cpu_keeps_cache_in_bf16_and_follows_hf(tiny_base: Path):
    from trainer.model import load_base_model

    model = load_base_model(tiny_base, dtype=torch.bfloat16).eval()
    runner = GPT2Runner(model, max_rows=2)
    prompts = [[464, 2068, 7586, 21831, 18045, 625], [15496, 11]]
    logits = runner.prefill(prompts, [0, 1], LoraPlan([]))
    assert runner.k[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    lengths = [len(p) for p in prompts]
    toks = [int(t) for t in logits.argmax(-1)]
    logits = runner.decode(toks, lengths, LoraPlan([]))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p + [toks[i]]])).logits[0, -1].float()
            # both run attention in bf16 (fused differently): equal to bf16 rounding
            torch.testing.assert_close(logits[i], ref, rtol=0.05, atol=0.05)
            assert int(logits[i].argmax()) == int(ref.argmax())


def test_lora_matches_peft_logits(tiny_base: Path, tmp_path: Path, tiny):
    from peft import LoraConfig, PeftModel, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(5)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        use_rslora=True,
    )
    get_peft_model(load_base_model(tiny_base), cfg).save_pretrained(tmp_path / "ad")
    peft = PeftModel.from_pretrained(load_base_model(tiny_base), tmp_path / "ad").eval()
    runner = GPT2Runner(tiny[0], max_rows=2)
    cfg_bytes, weights, _ = read_adapter_files(tmp_path / "ad")
    w = parse_adapter(cfg_bytes, weights, runner.module_shapes(), dtype=torch.float32, device="cpu")
    assert w.rank == 4 and w.target_modules == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    prompts = [[464, 2068, 7586], [15496, 11, 995, 0]]
    # row 0 base, row 1 LoRA, in one packed prefill
    logits = runner.prefill(prompts, [0, 1], LoraPlan.for_segments([(0, 3, None), (3, 7, w)]))
    with torch.no_grad():
        ref_lora = peft(torch.tensor([prompts[1]])).logits[0, -1]
        with peft.disable_adapter():
            ref_base = peft(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(logits[1], ref_lora, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0], ref_base, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base_same_prompt = tiny[0](torch.tensor([prompts[1]])).logits[0, -1]
    assert (ref_lora - base_same_prompt).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_layer_packed_or_not_equals_linear(dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    x = torch.randn(5, 24, generator=g).to(dtype)
    want = torch.nn.functional.linear(x, w, b).float()
    cpu = torch.device("cpu")
    packs = prepack_supported(cpu, dtype)
    with torch.inference_mode():
        for pack in (False, packs):
            layer = Dense(w, b, pack=pack, batch_hint=8)
            assert (layer.packed is not None) == pack
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(layer(x).float(), want, rtol=tol, atol=tol)
    monkeypatch.setenv("LORASERVE_CPU_PREPACK", "0")
    assert not prepack_supported(cpu, dtype)


def _random_adapter(shapes, rank: int, modules: tuple[str, ...], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)

    def pair(fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(fan_in, rank, generator=g), torch.randn(rank, fan_out, generator=g)

    layers = [{m: pair(*s[m]) for m in modules} for s in shapes]
    return LoraWeights(layers=layers, rank=rank, alpha=float(rank), target_modules=list(modules), nbytes=0)


def test_lora_plan_forms_add_the_same_deltas(tiny):
    """Masked (prepacked, few rows), stacked (bmm) and one-adapter-at-a-time plans agree, with base
    rows, adapters of different ranks and an adapter that skips a module in one batch."""
    runner = GPT2Runner(tiny[0], max_rows=8)
    shapes = runner.module_shapes()
    a = _random_adapter(shapes, 4, ("attn.c_attn", "attn.c_proj", "mlp.c_proj"), 1)
    b = _random_adapter(shapes, 2, ("attn.c_attn", "mlp.c_fc"), 2)
    c = _random_adapter(shapes, 4, ("attn.c_attn", "attn.c_proj", "mlp.c_proj"), 3)
    ab, cba = Mix(((a, 0.6), (b, -0.4))), Mix(((c, 1.5), (b, 0.5), (a, -1.0)))
    rows = [a, None, b, c, a, b, None, ab, ab, cba, Mix(((b, 0.3), (b, 0.2)))]
    masked = LoraPlan.for_rows(rows, "cpu", packed=True)
    stacked = LoraPlan.for_rows(rows, "cpu", packed=False)
    assert masked.row_scale is not None and masked.stacks.dense is not None
    assert stacked.row_scale is None and stacked.gather is not None
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer in range(len(shapes)):
            for module, (fan_in, fan_out) in shapes[layer].items():
                x = torch.randn(len(rows), fan_in, generator=g)
                want = torch.zeros(len(rows), fan_out)
                for i, w in enumerate(rows):  # one row at a time, one adapter at a time
                    terms = w.parts if isinstance(w, Mix) else [] if w is None else [(w, 1.0)]
                    for adapter, weight in terms:
                        want[i : i + 1] += weight * LoraPlan([(slice(0, 1), adapter, 1.0)]).apply(
                            torch.zeros(1, fan_out), x[i : i + 1], layer, module
                        )
                # packed prefill: one token range per row (ranges on one adapter merge)
                prefill = LoraPlan.for_segments([(i, i + 1, w) for i, w in enumerate(rows)])
                # 13 terms; adjacent equal terms share a range: ab twice, and b at 0.5 in the last two rows
                assert len(prefill.groups) == 10
                for plan in (masked, stacked, prefill):
                    got = plan.apply(torch.zeros(len(rows), fan_out), x, layer, module)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    assert not got[[1, 6]].any()  # base rows get nothing
    # many rows x adapters: the masked form would do too much work, the plan stacks instead
    wide = LoraPlan.for_rows([a, b, c] * 50, "cpu", packed=True)
    assert wide.row_scale is None and wide.gather is not None


def test_parse_adapter_rejects_what_does_not_fit(tiny):
    from safetensors.torch import save

    runner = GPT2Runner(tiny[0], max_rows=1)
    shapes = runner.module_shapes()
    cfg = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}).encode()
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
    good = {key.format("A"): torch.zeros(2, 64), key.format("B"): torch.zeros(192, 2)}
    assert parse_adapter(cfg, save(good), shapes, dtype=torch.float32, device="cpu").rank == 2
    cases = {
        "do not fit": {key.format("A"): torch.zeros(2, 65), key.format("B"): torch.zeros(192, 2)},
        "not both": {key.format("A"): torch.zeros(2, 64)},
        "unsupported tensor": {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)},
        "layer 7": {k.replace("h.0", "h.7"): v for k, v in good.items()},
        "NaN": {key.format("A"): torch.full((2, 64), float("nan")), key.format("B"): torch.zeros(192, 2)},
    }
    for message, tensors in cases.items():
        with pytest.raises(AdapterFormatError, match=message):
            parse_adapter(cfg, save(tensors), shapes, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterFormatError, match="does not parse"):
        parse_adapter(cfg, b"garbage", shapes, dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterFormatError, match="DoRA"):
        bad = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}).encode()
        parse_adapter(bad, save(good), shapes, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize(
    "text", ["héllo wörld 日本語のテキスト 🎉🎉 ✓ naïve Ωμέγα", "emoji 👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
)
def test_detokenizer_deltas_on_multibyte_text(tiny, table, text: str):
    tok = tiny[1]
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    for tbl in (table, None):  # the byte-level fast path and the generic fallback
        d = Detokenizer(tok, tbl)
        deltas = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(deltas) == tok.decode(ids) == text
        assert all("\ufffd" not in x for x in deltas)  # no half characters ever emitted
        assert any(x == "" for x in deltas)  # some tokens completed no character


def test_detokenizer_invalid_bytes_match_decode(tiny, table):
    tok = tiny[1]
    ids = tok.encode("日本") + tok.encode(" 🎉")[:2] + tok.encode("ok") + tok.encode("🎉")[-1:]
    d = Detokenizer(tok, table)
    assert "".join([d.push(i) for i in ids] + [d.flush()]) == tok.decode(ids)
    assert "\ufffd" in tok.decode(ids)


def test_stop_matcher():
    m = StopMatcher(["###", "\nUser:"])
    out = [m.feed(piece) for piece in ["Hello", " wor", "ld\n", "Us", "ual #", "#", "#tail"]]
    text = "".join(t for t, _ in out)
    assert out[-1][1] is True and all(not s for _, s in out[:-1])
    assert text == "Hello world\nUsual "
    assert out[2] == ("ld", False)  # "\n" held: it may start "\nUser:"
    assert out[3] == ("", False)  # "\nUs" held
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("", final=True) == ("ab", False)  # end of generation releases held text
    m = StopMatcher(["b", "abc"])
    assert m.feed("zabc") == ("z", True)  # the earliest match wins
    assert StopMatcher([""]).feed("text") == ("text", False)


def test_filter_logits():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))
    assert kept.tolist() == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.5))
    assert kept.tolist() == [True, False, False, False, False]
    assert torch.isfinite(filter_logits(logits, 0.5, 0, 1.0)).all()


def test_choose_tokens_follows_each_rows_filter():
    """Batch sampling draws from exactly the distribution the reference filter defines, per row."""
    from service.engine.sampling import choose_tokens, make_generator
    from service.engine.types import SamplingParams

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]] * 4)
    params = [
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=0),
    ]
    gens = [make_generator(i, "cpu")[0] for i in range(3)] + [None]
    reps = 1000  # every row type repeated, each copy with its own generator: 3000 draws per type
    many = torch.cat([logits] * reps)
    many_params = params * reps
    many_gens = [
        make_generator(100 + i, "cpu")[0] if p.temperature else None for i, p in enumerate(many_params)
    ]
    counts = torch.zeros(4, 6)
    for _ in range(3):
        for i, tok in enumerate(choose_tokens(many, many_params, many_gens)):
            counts[i % 4, tok] += 1
    draws = 3 * reps
    for row, p in enumerate(params[:3]):
        expected = torch.softmax(filter_logits(logits[row], p.temperature, p.top_k, p.top_p), -1)
        assert ((counts[row] > 0) == (expected > 0)).all(), row  # same support
        assert (counts[row] / draws - expected).abs().max() < 0.03, row  # same frequencies
    assert counts[3, 0] == draws  # greedy row
    # the same seed gives the same draws, alone or next to other rows
    g_alone, g_batch = make_generator(7, "cpu")[0], make_generator(7, "cpu")[0]
    alone = [choose_tokens(logits[1:2], params[1:2], [g_alone])[0] for _ in range(50)]
    batch = [choose_tokens(logits, params, [gens[0], g_batch, gens[2], None])[1] for _ in range(50)]
    assert alone == batch and len(set(alone)) > 1


def test_engine_package_writes_no_metrics():
    """The engine measures and reports; the worker exports (service.metrics is not imported)."""
    import subprocess
    import sys

    code = "import sys, service.engine; assert 'service.metrics' not in sys.modules, 'engine imports metrics'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_greedy_rows_take_the_first_of_tied_maxima():
    """Greedy choice equals ``argmax`` (the first maximum) where top logits tie, as bf16 logits often do."""
    from service.engine.sampling import choose_tokens
    from service.engine.types import SamplingParams

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50257, generator=g).bfloat16().float()
    for row in range(64):
        tied = torch.randint(0, 50257, (1 + row % 5,), generator=g)
        logits[row, tied] = 9.0
    want = torch.argmax(logits, dim=-1).tolist()
    assert choose_tokens(logits, [SamplingParams(temperature=0)] * 64, [None] * 64) == want


def test_decode_at_padded_rows_and_a_wider_span_gives_the_same_logits(tiny):
    """What a CUDA graph replays (``graphs.py``): the step at more rows than running (padding rows
    writing position 0 of free slots) and over more cached positions than the longest row (masked)."""
    model, _ = tiny
    runner = GPT2Runner(model, max_rows=8)
    plan = LoraPlan([])
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    runner.prefill(prompts, [0, 1], plan)
    want = runner.decode([3, 4], [5, 3], plan)
    runner.prefill(prompts, [0, 1], plan)  # the same cache state again
    ids, pos = torch.tensor([3, 4, 0, 0, 0]), torch.tensor([5, 3, 0, 0, 0])
    got = runner.decode_rows(ids, pos, 64, plan)[:2]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert runner.enable_graphs() is False and runner.graphs is None  # CUDA only

"""DoRA adapters (``use_dora``) against PEFT's DoRA in fp32, served per row beside LoRA and the base.

Adapters are PEFT's own DoRA layers with random non-zero B and magnitudes moved off their initial
value (at PEFT's initialisation the magnitude equals the norm, so DoRA would compute plain LoRA and
a missing factor could not show). Checked: the rule table accepts DoRA folders and names what a
broken one lacks; the runner's logits equal PEFT's in every LoRA form (packed prefill, one adapter's
decode rows, the stacked and the masked decode batch) on GPT-2 (``Conv1D``, transposed) and on a
Llama-family base with q/k/v biases (qwen2); greedy tokens equal PEFT's generate on a distilgpt2-shaped
base and on a Llama base, in a mixed batch of base, LoRA and DoRA rows and alone; a composition with a
DoRA adapter is refused naming it, and so is a DoRA adapter by the GGUF and merged exports; the
trainer trains DoRA (a warm start keeps DoRA or plain LoRA) and the engine serves what it saved.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_engine import greedy, request, run, solo
from test_families import CONFIGS

from loracore.lora_format import BaseLayout, LoraFormatError, check_tensors
from service.engine import Engine
from service.engine.lora import LoraPlan, parse_adapter, read_adapter_files
from service.engine.runners import make_runner
from tests.helpers.adapters import torch_threads

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy", "1 2 3", "Once upon a time"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Small models run several times faster on one thread on a busy machine (idle threads spin); PEFT
    caches DoRA's norm in eval mode when asked (its own switch: the same numbers, computed once)."""
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    with torch_threads(1):
        yield


def make_adapter(base: Path, out: Path, seed: int, *, dora: bool = True, r: int = 4, model=None) -> Path:
    """A PEFT LoRA (DoRA with ``dora``) on every linear target of the family, random non-zero B, and
    magnitudes scaled by 1 ± 40 % (``model``: a loaded copy of the base to wrap, to save a load)."""
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    model = model if model is not None else load_base_model(base)
    gpt2 = model.config.model_type == "gpt2"
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["c_attn", "c_proj", "c_fc"] if gpt2 else "all-linear",
        fan_in_fan_out=gpt2,
        init_lora_weights=False,
        use_dora=dora,
    )
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.4 * (2 * torch.rand_like(p) - 1))
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import make_random_llama_base

    return make_random_llama_base(tmp_path_factory.mktemp("dora-bases") / "qwen2", seed=1, **CONFIGS["qwen2"])


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import make_random_llama_base

    return make_random_llama_base(tmp_path_factory.mktemp("dora-bases") / "llama", seed=1, **CONFIGS["llama"])


# --- the rule table ----------------------------------------------------------------------------------
def test_rule_table_accepts_dora_and_names_what_is_missing():
    layout = BaseLayout.gpt2(n_layer=1, n_embd=8)
    key = "base_model.model.transformer.h.0.attn.c_attn"
    plain = {f"{key}.lora_A.weight": (2, 8), f"{key}.lora_B.weight": (24, 2)}
    dora_cfg = {"r": 2, "lora_alpha": 4, "use_dora": True}
    pairs = check_tensors(dora_cfg, {**plain, f"{key}.lora_magnitude_vector": (24,)}, layout)
    assert pairs[(0, "attn.c_attn")]["M"] == f"{key}.lora_magnitude_vector"
    # PEFT's older spelling with the adapter name and .weight is the same tensor
    check_tensors(dora_cfg, {**plain, f"{key}.lora_magnitude_vector.default.weight": (24,)}, layout)
    cases = {
        "holds no lora_magnitude_vector": (dora_cfg, plain),
        "use_dora is not set": ({"r": 2, "lora_alpha": 4}, {**plain, f"{key}.lora_magnitude_vector": (24,)}),
        "expected [24]": (dora_cfg, {**plain, f"{key}.lora_magnitude_vector": (8,)}),
    }
    for says, (cfg, tensors) in cases.items():
        with pytest.raises(LoraFormatError, match=says.replace("[", r"\[")):
            check_tensors(cfg, tensors, layout)
    two = BaseLayout.gpt2(n_layer=2, n_embd=8)
    other = {k.replace("h.0", "h.1"): v for k, v in plain.items()}
    with pytest.raises(LoraFormatError, match=r"transformer.h.1.attn.c_attn has no lora_magnitude_vector"):
        check_tensors(dora_cfg, {**plain, f"{key}.lora_magnitude_vector": (24,), **other}, two)


# --- logits in every form ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_runner_logits_equal_peft_in_every_lora_form(
    family: str, tiny_base: Path, qwen2_base: Path, tmp_path: Path
):
    from peft import PeftModel

    from trainer.model import load_base_model

    base = tiny_base if family == "gpt2" else qwen2_base
    model = load_base_model(base).eval()
    folders = {
        name: make_adapter(base, tmp_path / name, seed, dora=name != "lora", model=copy.deepcopy(model))
        for name, seed in (("d1", 1), ("d2", 2), ("lora", 3))
    }
    runner = make_runner(model, max_rows=8)
    layout = BaseLayout(runner.family.name, tuple(runner.module_shapes()), layer_path=runner.family.blocks)
    served, peft = {}, {}
    for name, folder in folders.items():
        cfg, weights, _ = read_adapter_files(folder)
        served[name] = parse_adapter(
            cfg, weights, layout, dtype=torch.float32, device="cpu", base_weight=runner.base_weight
        )
        peft[name] = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    assert served["lora"].dora is None and served["d1"].dora is not None
    g = next(iter(served["d1"].dora[0].values()))[0]
    assert (g - 1).abs().max() > 0.05  # the factor is not 1: a missing one would show

    def reference(name: str | None, seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return (model if name is None else peft[name])(torch.tensor([seq])).logits[0, -1]

    names = [None, "d1", "lora", "d2", "d1"]
    prompts = [[464, 2068, 7586], [15496, 11, 995, 0], [16, 362, 513], [50, 51, 52, 53, 54], [1, 2]]
    segments, start = [], 0
    for p, name in zip(prompts, names, strict=True):
        segments.append((start, start + len(p), served.get(name)))
        start += len(p)
    logits = runner.prefill(prompts, list(range(len(prompts))), LoraPlan.for_segments(segments))
    seqs, lengths = [list(p) for p in prompts], [len(p) for p in prompts]
    for i, name in enumerate(names):
        torch.testing.assert_close(logits[i], reference(name, seqs[i]), rtol=1e-4, atol=1e-5)
    assert (reference("d1", seqs[1]) - reference(None, seqs[1])).abs().max() > 1e-2
    forms = []
    for packed in (True, False):  # masked (prepacked stacks) and stacked
        plan = LoraPlan.for_rows([served.get(n) for n in names], "cpu", packed=packed)
        forms.append("masked" if plan.row_scale is not None else "stacked")
        tokens = [int(t) for t in logits.argmax(-1)]
        logits = runner.decode(tokens, lengths, plan)
        for i, name in enumerate(names):
            seqs[i].append(tokens[i])
            lengths[i] += 1
            torch.testing.assert_close(logits[i], reference(name, seqs[i]), rtol=1e-4, atol=1e-5)
    # one DoRA adapter on rows that are not contiguous, beside the base: the per-group form (index rows)
    one = ["d2", None, "d2"]
    seqs = [list(p) for p in prompts[:3]]
    segments = [(0, 3, served["d2"]), (3, 7, None), (7, 10, served["d2"])]
    logits = runner.prefill(seqs, [0, 1, 2], LoraPlan.for_segments(segments))
    plan = LoraPlan.for_rows([served.get(n) for n in one], "cpu", packed=runner.prepacked)
    assert plan.stacks is None and len(plan.groups) == 1 and not isinstance(plan.groups[0][0], slice)
    tokens = [int(t) for t in logits.argmax(-1)]
    logits = runner.decode(tokens, [len(s) for s in seqs], plan)
    for i, name in enumerate(one):
        seqs[i].append(tokens[i])
        torch.testing.assert_close(logits[i], reference(name, seqs[i]), rtol=1e-4, atol=1e-5)
    if runner.prepacked:
        assert forms == ["masked", "stacked"]


# --- greedy generation -------------------------------------------------------------------------------
def _peft_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", ["distilgpt2", "llama"])
def test_greedy_equals_peft_dora_in_a_mixed_batch(
    family: str, distil_base: Path, llama_base: Path, tmp_path: Path
):
    """Base, LoRA and two DoRA adapters' rows in one batch each get PEFT's greedy tokens (fp32), and
    the same alone."""
    from peft import PeftModel

    from trainer.model import load_base_model

    base = distil_base if family == "distilgpt2" else llama_base
    hf = load_base_model(base).eval()
    adapters = tmp_path / "adapters"
    for name, seed in (("d1", 11), ("d2", 12), ("lora", 13)):
        make_adapter(base, adapters / name, seed, dora=name != "lora", model=copy.deepcopy(hf))
    eng = Engine(base, adapters, max_batch_size=8)
    n = 8
    want = {f"base{k}": _peft_greedy(hf, eng.tokenizer, p, n) for k, p in enumerate(PROMPTS[:2])}
    for name in ("d1", "d2", "lora"):
        peft = PeftModel.from_pretrained(copy.deepcopy(hf), adapters / name).eval()
        for k, p in enumerate(PROMPTS[:2]):
            want[f"{name}{k}"] = _peft_greedy(peft, eng.tokenizer, p, n)
    ad_of = {"base": None, "d1": "d1", "d2": "d2", "lora": "lora"}
    order = ["d10", "base1", "lora0", "d21", "d11", "base0", "d20", "lora1"]
    mixed = run(eng, [request(eng, rid, PROMPTS[int(rid[-1])], ad_of[rid[:-1]], greedy(n)) for rid in order])
    for rid, tokens in want.items():
        assert mixed[rid].tokens == tokens, rid
    for rid in ("d10", "d21"):
        assert solo(eng, request(eng, rid, PROMPTS[int(rid[-1])], rid[:-1], greedy(n))).tokens == want[rid]
    assert want["d10"] != want["base0"] and want["d10"] != want["d20"]


def test_composition_with_a_dora_adapter_is_refused_naming_it(tiny_base: Path, tmp_path: Path):
    adapters = tmp_path / "adapters"
    make_adapter(tiny_base, adapters / "dora", 21)
    make_adapter(tiny_base, adapters / "plain", 22, dora=False)
    eng = Engine(tiny_base, adapters, max_batch_size=4)
    res = run(
        eng,
        [
            request(eng, "mix", PROMPTS[0], (("plain", 0.5), ("dora", 0.5)), greedy(4)),
            request(eng, "ok", PROMPTS[0], "dora", greedy(4)),
        ],
    )
    last = res["mix"].last
    assert last.finish_reason == "error" and last.error_code == "invalid_adapter", last
    assert "'dora'" in last.error and "DoRA" in last.error and "composition" in last.error
    assert res["ok"].last.finish_reason == "length"
    assert all(e.refs == 0 for e in eng.adapters.entries.values())  # the refused row pinned nothing
    # one entry of weight 1 is the adapter alone: served, the same tokens
    alone = solo(eng, request(eng, "one", PROMPTS[1], (("dora", 1.0),), greedy(6)))
    assert alone.tokens == solo(eng, request(eng, "plain", PROMPTS[1], "dora", greedy(6))).tokens


# --- training ----------------------------------------------------------------------------------------
def test_trainer_trains_dora_and_the_engine_serves_it(tiny_base: Path, tmp_path: Path):
    """``lora.use_dora`` trains PEFT's DoRA (the magnitudes move from the norms they start at) and the
    saved folder is served with PEFT's greedy tokens."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.helpers.adapters import write_fixed_sentence_data
    from trainer import train_adapter
    from trainer.model import load_base_model

    data = write_fixed_sentence_data(tmp_path / "data.jsonl", "The answer is always forty two.")
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn"], "use_dora": True}
    cfg = {
        "lora": lora,
        "training": {
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "warmup_ratio": 0.0,
            "eval_fraction": 0.0,
            "save_steps": 0,
            "seed": 0,
        },
    }
    out = tmp_path / "adapters" / "trained-dora"
    train_adapter(cfg, data, out, model=str(tiny_base))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert len(magnitudes) == 2  # c_attn in each of the two layers
    hf = load_base_model(tiny_base).eval()
    for key, m in magnitudes.items():  # trained: no longer the norm of the base's weight
        layer = int(key.split(".h.")[1].split(".")[0])
        norm = torch.linalg.norm(hf.transformer.h[layer].attn.c_attn.weight.detach().t(), dim=1)
        assert (m - norm).abs().max() > 1e-3, key
    eng = Engine(tiny_base, out.parent, max_batch_size=2)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    for p in PROMPTS[:2]:
        want = _peft_greedy(peft, eng.tokenizer, p, 8)
        assert solo(eng, request(eng, "t", p, "trained-dora", greedy(8))).tokens == want


def test_gguf_and_merged_exports_refuse_dora_naming_it(tiny_base: Path, tmp_path: Path):
    """llama.cpp's GGUF adapters and the merge here are plain LoRA: a DoRA adapter is refused by name
    before a byte is written (its PEFT folder is the export that keeps it)."""
    from trainer.export import write_gguf, write_merged
    from trainer.export_plan import ExportError

    folder = make_adapter(tiny_base, tmp_path / "dora-x", 31)
    for write, out in ((write_gguf, tmp_path / "x.gguf"), (write_merged, tmp_path / "merged")):
        with pytest.raises(ExportError, match="dora-x: a DoRA adapter") as info:
            write(tiny_base, [(folder, 1.0)], out)
        assert info.value.code == "export_failed" and not out.exists()


def test_a_warm_start_keeps_dora_or_plain_lora(tiny_base: Path, tmp_path: Path):
    """``--init-adapter`` must match ``lora.use_dora`` like the rank and the scale: DoRA's magnitudes have
    no place in a plain LoRA run, and a DoRA run would start them from nothing."""
    from trainer.config import TrainConfig
    from trainer.errors import TrainerError
    from trainer.setup import check_init_adapter

    folder = make_adapter(tiny_base, tmp_path / "dora-init", 41)
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    lora = {"r": 4, "lora_alpha": 8, "target_modules": targets}
    check_init_adapter(folder, TrainConfig.model_validate({"lora": {**lora, "use_dora": True}}))
    with pytest.raises(TrainerError, match="use_dora True, this config False"):
        check_init_adapter(folder, TrainConfig.model_validate({"lora": lora}))

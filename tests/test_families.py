"""Every supported base family against Hugging Face and PEFT, on small random-weight configs.

One config per ``model_type`` with the parts that make it different: ``llama`` with llama3 rope
scaling and grouped-query attention, ``qwen2`` with q/k/v biases and tied embeddings, ``qwen3`` with
per-head q/k RMSNorm and a head_dim apart from hidden/heads, ``mistral`` with a sliding window
shorter than its positions, and GPT-2 at gpt2-medium's width and heads (1024 wide, 16 heads; two
layers instead of 24 to stay fast). GPT-2's real tokenizer stands in (vocabulary sized to it).

Checked: the runner's logits equal the HF model's to float rounding through prefill, decode and a
row leaving (every config); greedy tokens equal ``transformers`` + PEFT in fp32 for the base,
single adapters on every linear target with per-module ranks (``rank_pattern``), a mixed batch of
them, and a weighted composition (PEFT's ``add_weighted_adapter(combination_type="cat")``), for each
Llama-family config (GPT-2's are tests/test_engine.py's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_engine import greedy, request, run, solo

from loracore.lora_format import BaseLayout
from service.engine import Engine
from service.engine.lora import LoraPlan, parse_adapter, read_adapter_files
from service.engine.model import UnsupportedModel
from service.engine.runners import cache_shape, make_runner

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
CONFIGS = {
    "llama": {
        "model_type": "llama",
        **SMALL,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "llama-linear": {
        "model_type": "llama",
        **SMALL,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "mlp_bias": True,
        "attention_bias": True,
    },
    "qwen2": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 32, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", **SMALL, "sliding_window": 128},
}
GPT2_MEDIUM_WIDTH = {"n_layer": 2, "n_embd": 1024, "n_head": 16, "n_positions": 256}
FAMILIES = [*CONFIGS, "gpt2-medium-width"]
PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy", "1 2 3", "Once upon a time"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trainer.model import make_random_base, make_random_llama_base

    root = tmp_path_factory.mktemp("family-bases")
    out = {name: make_random_llama_base(root / name, seed=1, **cfg) for name, cfg in CONFIGS.items()}
    out["gpt2-medium-width"] = make_random_base(root / "gpt2-medium-width", **GPT2_MEDIUM_WIDTH, seed=1)
    return out


def targets_of(base: Path) -> str | list[str]:
    from loracore.families import family_of_folder

    return "all-linear" if family_of_folder(base).name == "llama" else ["c_attn", "c_proj", "c_fc"]


def make_lora(
    base: Path, out: Path, seed: int, r: int = 4, rank_pattern: dict | None = None, model=None
) -> Path:
    """A PEFT LoRA on every linear target of the family, with non-zero random B (``model``: a loaded
    copy of the base to wrap, to save a load)."""
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    model = model if model is not None else load_base_model(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets_of(base),
        init_lora_weights=False,
        rank_pattern=rank_pattern or {},
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_logits_equal_hf(bases: dict[str, Path], family: str):
    from trainer.model import load_base_model

    model = load_base_model(bases[family]).eval()
    runner = make_runner(model, max_rows=4)
    prompts = [[464, 2068, 7586, 21831, 18045, 625], [15496, 11], [16, 362, 513, 604]]
    none = LoraPlan([])
    logits = runner.prefill(prompts, [0, 1, 2], none)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for i, p in enumerate(seqs):
            torch.testing.assert_close(
                logits[i], model(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-5
            )
    lengths = [len(p) for p in prompts]
    for step in range(4):
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
            torch.testing.assert_close(
                logits[i], model(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_logits_equal_peft(bases: dict[str, Path], family: str, tmp_path: Path):
    from peft import PeftModel

    from trainer.model import load_base_model

    base = bases[family]
    make_lora(base, tmp_path / "ad", seed=3, r=4, rank_pattern={"down_proj": 2, "q_proj": 6})
    model = load_base_model(base).eval()
    runner = make_runner(model, max_rows=2)
    cfg, weights, _ = read_adapter_files(tmp_path / "ad")
    layout = BaseLayout(runner.family.name, tuple(runner.module_shapes()), layer_path=runner.family.blocks)
    w = parse_adapter(cfg, weights, layout, dtype=torch.float32, device="cpu")
    assert len(w.target_modules) == 7 and w.rank == 6
    assert w.layers[0]["mlp.down_proj"][0].shape[1] == 2 and w.layers[0]["self_attn.q_proj"][0].shape[1] == 6
    peft = PeftModel.from_pretrained(load_base_model(base), tmp_path / "ad").eval()
    prompts = [[464, 2068, 7586], [15496, 11, 995, 0]]
    logits = runner.prefill(prompts, [0, 1], LoraPlan.for_segments([(0, 3, None), (3, 7, w)]))
    with torch.no_grad():
        ref = peft(torch.tensor([prompts[1]])).logits[0, -1]
        with peft.disable_adapter():
            ref_base = peft(torch.tensor([prompts[0]])).logits[0, -1]
            plain = peft(torch.tensor([prompts[1]])).logits[0, -1]
    torch.testing.assert_close(logits[1], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0], ref_base, rtol=1e-4, atol=1e-5)
    assert (ref - plain).abs().max() > 1e-3  # the adapter matters


def _peft_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])  # llama-linear: logits above
def test_greedy_equals_transformers_and_peft(bases: dict[str, Path], family: str, tmp_path: Path):
    """Base, single adapters (per-module ranks), a mixed batch and a weighted composition, fp32."""
    from peft import PeftModel

    from trainer.model import load_base_model

    base = bases[family]
    adapters = tmp_path / "adapters"
    hf = load_base_model(base).eval()
    make_lora(base, adapters / "a", seed=10, model=copy.deepcopy(hf))
    make_lora(
        base, adapters / "b", seed=11, rank_pattern={"gate_proj": 2, "v_proj": 8}, model=copy.deepcopy(hf)
    )
    eng = Engine(base, adapters, max_batch_size=8)
    n = 8
    want: dict[str, list[int]] = {}
    for k, p in enumerate(PROMPTS[:2]):
        want[f"base{k}"] = _peft_greedy(hf, eng.tokenizer, p, n)
    for name in ("a", "b"):
        peft = PeftModel.from_pretrained(copy.deepcopy(hf), adapters / name).eval()
        for k, p in enumerate(PROMPTS[:2]):
            want[f"{name}{k}"] = _peft_greedy(peft, eng.tokenizer, p, n)
    names, weights = ["a", "b"], [0.7, -0.5]
    mix = PeftModel.from_pretrained(copy.deepcopy(hf), adapters / "a", adapter_name="a")
    mix.load_adapter(adapters / "b", adapter_name="b")
    mix.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
    mix.set_adapter("mix")
    mix.eval()
    for k, p in enumerate(PROMPTS[:2]):
        want[f"mix{k}"] = _peft_greedy(mix, eng.tokenizer, p, n)
    spec = tuple(zip(names, weights, strict=True))
    ad_of = {"base": None, "a": "a", "b": "b", "mix": spec}
    reqs = [
        request(eng, rid, PROMPTS[int(rid[-1])], ad_of[rid[:-1]], greedy(n))
        for rid in ["a0", "base1", "mix0", "b1", "b0", "a1", "mix1", "base0"]
    ]
    mixed = run(eng, reqs)
    for rid, tokens in want.items():
        assert mixed[rid].tokens == tokens, rid
    rid = "mix1"  # and alone
    assert solo(eng, request(eng, rid, PROMPTS[1], spec, greedy(n))).tokens == want[rid]
    assert want["a0"] != want["base0"] and want["b0"] != want["a0"] and want["mix0"] != want["a0"]


def test_sliding_window_caps_the_context(bases: dict[str, Path]):
    from transformers import AutoConfig

    assert cache_shape(AutoConfig.from_pretrained(bases["mistral"])).n_positions == 128
    assert cache_shape(AutoConfig.from_pretrained(bases["llama"])).n_positions == 256
    assert cache_shape(AutoConfig.from_pretrained(bases["llama"]), max_context=100).n_positions == 100


def test_gqa_cache_holds_kv_heads_only(bases: dict[str, Path]):
    eng = Engine(bases["qwen3"], bases["qwen3"] / "no-adapters", max_batch_size=2)
    # 2 layers x K and V x 2 KV heads x head_dim 32 x fp32
    assert eng.plan.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert eng.runner.n_kv_head == 2 and eng.runner.n_head == 4


def test_unsupported_model_type_is_one_line(tmp_path: Path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt_neox", hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg.save_pretrained(tmp_path / "neox")
    with pytest.raises(UnsupportedModel) as info:
        Engine(tmp_path / "neox", tmp_path / "adapters")
    message = str(info.value)
    assert "\n" not in message and "'gpt_neox'" in message
    assert "llama, mistral, qwen2, qwen3" in message and "gpt2" in message
    (tmp_path / "custom").mkdir()  # a model_type transformers itself does not know
    (tmp_path / "custom" / "config.json").write_text('{"model_type": "my-own-lm"}')
    with pytest.raises(UnsupportedModel, match="'my-own-lm'"):
        Engine(tmp_path / "custom", tmp_path / "adapters")


def test_unsupported_rope_type_is_refused():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "llama", **SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, vocab_size=100
    )
    with pytest.raises(UnsupportedModel, match="dynamic"):
        cache_shape(cfg)


def test_the_server_refuses_an_unsupported_base_in_one_line(tmp_path: Path):
    import subprocess
    import sys

    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text('{"model_type": "gpt_neox", "hidden_size": 32}')
    args = [
        "--model",
        str(tmp_path / "neox"),
        "--adapter-dir",
        str(tmp_path / "a"),
        "--data-dir",
        str(tmp_path / "d"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "service", *args, "--port", "8799"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m service: unsupported base model: config.json has model_type='gpt_neox'; "
        "supported: gpt2, llama, mistral, qwen2, qwen3"
    ]


def test_engine_batch_invariance_on_a_llama_family_base(bases: dict[str, Path], tmp_path: Path):
    """tests/test_engine.py's mixed-batch test (log-probabilities, penalties, logit_bias and
    compositions sharing a batch with plain rows, each row equal to itself alone) on a Qwen3 base."""
    import test_engine

    from trainer.model import load_base_model

    base = bases["qwen3"]
    hf = load_base_model(base).eval()
    for i, name in enumerate("abc"):
        make_lora(base, tmp_path / name, seed=100 + i, model=copy.deepcopy(hf))
    make_lora(base, tmp_path / "d", seed=104, r=2, rank_pattern={"up_proj": 6}, model=copy.deepcopy(hf))
    test_engine.test_mixed_batch_greedy_equals_each_alone(Engine(base, tmp_path, max_batch_size=8))

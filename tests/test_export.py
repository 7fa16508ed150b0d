"""Exports: a GGUF LoRA in llama.cpp's layout, a merged model that generates what serving does, a PEFT zip.

The GGUF checks read the file back with the ``gguf`` package and hold every pair to what llama.cpp's
loader (src/llama-adapter.cpp) requires of a LoRA for a base weight of ggml shape ``ne = [n_in, n_out]``:
``lora_a.ne = [n_in, r]``, ``lora_b.ne = [r, n_out]``, and ``alpha / r * lora_b @ lora_a`` (numpy shapes,
the reverse of ggml's) equal to the change PEFT's own ``merge_and_unload`` makes to that weight, in the
orientation llama.cpp's convert_hf_to_gguf.py writes the base weight: GPT-2's ``Conv1D`` weights
(stored ``(in, out)``) transposed to ``(out, in)``; Llama's ``q_proj``/``k_proj`` rows permuted for RoPE.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import zipfile
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch

from loracore import artifact
from loracore.template import DEFAULT_TEMPLATE
from testing.server import running_server
from testing.weights import make_random_lora
from trainer.export import write_gguf
from trainer.export_plan import ExportError, Part, parse_parts

GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")


def _read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _peft_deltas(base: Path, parts: list[tuple[Path, float]], model_cls=None) -> dict[str, torch.Tensor]:
    """sum_i w_i * (what PEFT's merge_and_unload adds to each weight), by parameter name, HF orientation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cls = model_cls or AutoModelForCausalLM
    original = cls.from_pretrained(str(base), dtype=torch.float32).state_dict()
    total: dict[str, torch.Tensor] = {}
    for folder, weight in parts:
        merged = PeftModel.from_pretrained(cls.from_pretrained(str(base), dtype=torch.float32), str(folder))
        for key, value in merged.merge_and_unload().state_dict().items():
            delta = value - original[key]
            if delta.abs().max() > 0:
                total[key] = total.get(key, 0) + weight * delta
    return total


def _check_pair(tensors, fields, name: str, base_ggml_ne: tuple[int, int], expected: torch.Tensor) -> None:
    """One lora_a/lora_b pair against llama.cpp's shape rules and the expected delta (numpy (out, in))."""
    a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
    n_in, n_out = base_ggml_ne
    rank = int(a.shape[1])
    assert tuple(int(x) for x in a.shape) == (n_in, rank), name  # ggml ne, as llama-adapter.cpp checks
    assert tuple(int(x) for x in b.shape) == (rank, n_out), name
    assert a.data.shape == (rank, n_in) and b.data.shape == (n_out, rank)  # numpy: reversed
    scale = fields["adapter.lora.alpha"] / rank
    got = scale * (np.asarray(b.data, dtype=np.float64) @ np.asarray(a.data, dtype=np.float64))
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def gpt2_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-gpt2")
    make_random_lora(tiny_base, root / "a", seed=1, r=4, targets=GPT2_CONV1D)
    make_random_lora(tiny_base, root / "b", seed=2, r=8, targets=("c_attn",))
    return root


@pytest.mark.parametrize("spec", [["a"], ["a:0.6", "b:-0.4"]], ids=["one", "composition"])
def test_gguf_gpt2_layout(tiny_base: Path, gpt2_adapters: Path, tmp_path: Path, spec: list[str]) -> None:
    parts = parse_parts(spec)
    folders = [(gpt2_adapters / artifact.split_ref(p.ref)[0], p.weight) for p in parts]
    out = write_gguf(tiny_base, folders, tmp_path / "x.gguf")
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "gpt2"
    config = json.loads((gpt2_adapters / "a" / artifact.CONFIG_FILE).read_text())
    assert fields["adapter.lora.alpha"] == config["lora_alpha"]
    if len(parts) == 1:  # a plain adapter's matrices go in unchanged
        lora_a = tensors["blk.0.attn_qkv.weight.lora_a"].data
        from safetensors.torch import load_file

        peft = load_file(str(gpt2_adapters / "a" / artifact.WEIGHTS_FILE))
        assert np.array_equal(
            lora_a, peft["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].numpy()
        )

    gguf_names = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up"}
    gguf_names["mlp.c_proj"] = "ffn_down"
    deltas = _peft_deltas(tiny_base, folders)
    seen = set()
    for key, delta in deltas.items():  # transformer.h.0.attn.c_attn.weight, Conv1D: (in, out)
        layer, module = key.split(".")[2], ".".join(key.split(".")[3:5])
        name = f"blk.{layer}.{gguf_names[module]}.weight"
        n_in, n_out = delta.shape
        _check_pair(tensors, fields, name, (n_in, n_out), delta.T)  # the converter's transpose
        seen.add(name)
    assert {n.rsplit(".", 1)[0] for n in tensors} == seen  # nothing more, nothing less
    assert len(seen) == 2 * 4  # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj)


def test_gguf_llama_layout(tmp_path: Path) -> None:
    """A random Llama (grouped-query attention) with a LoRA on all seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    folder = tmp_path / "adapters" / "llama-lora"
    get_peft_model(LlamaForCausalLM.from_pretrained(base), lora).save_pretrained(folder)

    out = write_gguf(base, [(folder, 1.0)], tmp_path / "llama.gguf")
    fields, tensors = _read(out)
    assert fields["general.architecture"] == "llama"
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == (
        "adapter",
        "lora",
        16,
    )

    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    gguf_names |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    gguf_names["mlp.down_proj"] = "ffn_down"

    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    deltas = _peft_deltas(base, [(folder, 1.0)], LlamaForCausalLM)
    assert len(deltas) == 2 * 7
    for key, delta in deltas.items():  # model.layers.0.self_attn.q_proj.weight, Linear: (out, in)
        layer, module = key.split(".")[2], ".".join(key.split(".")[3:5])
        if module == "self_attn.q_proj":
            delta = permute(delta, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            delta = permute(delta, cfg.num_key_value_heads)
        n_out, n_in = delta.shape
        _check_pair(tensors, fields, f"blk.{layer}.{gguf_names[module]}.weight", (n_in, n_out), delta)
    assert len(tensors) == 2 * len(deltas)


def test_parse_parts_refuses_bad_input() -> None:
    assert parse_parts(["a@0123abcd:0.5,b"]) == [Part("a@0123abcd", 0.5), Part("b", 1.0)]
    for bad in (["a:3"], ["a:x"], ["a", "a:0.5"], [".a"], ["a@12"], [""], ["a"] * 9):
        with pytest.raises(ExportError):
            parse_parts(bad)


def test_chat_template_renders_the_recorded_template() -> None:
    from jinja2 import Environment

    from trainer.export import chat_template

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is LoRA?"},
    ]
    rendered = Environment().from_string(chat_template(DEFAULT_TEMPLATE))
    assert rendered.render(
        messages=messages, add_generation_prompt=True
    ) == DEFAULT_TEMPLATE.render_chat_prompt(messages)


# ----------------------------------------------------------------------------- through the server

KEY = "export-test-key"
PROMPT = "Where do penguins live?"
MAX_NEW = 16


@pytest.fixture(scope="module")
def server(tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export-http")
    for name, folder in trained_adapters.items():
        shutil.copytree(folder, root / "adapters" / name)
    with running_server(
        tiny_base, root / "adapters", root / "data", api_key=KEY, args=("--dtype", "float32")
    ) as srv:
        yield srv


def _served_ids(srv, **body) -> list[int]:
    with srv.client() as http:
        r = http.post(
            "/generate",
            json={"prompt": PROMPT, "max_new_tokens": MAX_NEW, "temperature": 0, "logprobs": 0, **body},
        )
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["tokens"]]


def _merged_ids(folder: Path) -> list[int]:
    """Greedy tokens of the merged folder through plain transformers, on the chat template it carries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == DEFAULT_TEMPLATE.render_prompt(PROMPT)  # what the server renders for /generate
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.slow
def test_merged_generates_what_the_server_serves(server, tmp_path: Path) -> None:
    from loraserve_client import AsyncClient
    from loraserve_client.cli import main

    # one adapter, through the CLI
    out = tmp_path / "alpha-merged"
    assert (
        main(
            [
                "export",
                "alpha",
                "--format",
                "merged",
                "--out",
                str(out),
                "--url",
                server.url,
                "--api-key",
                KEY,
            ]
        )
        == 0
    )
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    served = _served_ids(server, adapter="alpha")
    assert _merged_ids(out) == served
    assert len(served) > 3  # the adapter's sentence, not an immediate EOS

    # a weighted composition, through the async client
    mix = [("alpha", 0.4), ("beta", 1.0)]

    async def download() -> Path:
        async with AsyncClient(server.url, api_key=KEY) as client:
            return await client.adapters.export([f"{n}:{w}" for n, w in mix], "merged", tmp_path / "mix")

    mix_dir = asyncio.run(download())
    served_mix = _served_ids(server, adapters=[{"name": n, "weight": w} for n, w in mix])
    assert _merged_ids(mix_dir) == served_mix
    assert served_mix != served


def test_gguf_and_peft_downloads(
    server, trained_adapters: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    from loraserve_client import Client

    with Client(server.url, api_key=KEY) as client:
        version = client.adapters.get("beta").versions[0].id
        got = client.adapters.export(f"beta@{version[:8]}", "gguf", tmp_path / "beta.gguf")
        offline = write_gguf(tiny_base, [(trained_adapters["beta"], 1.0)], tmp_path / "offline.gguf")
        assert got.read_bytes() == offline.read_bytes()

        zipped = client.adapters.export("alpha", "peft", tmp_path / "alpha.zip")
        with zipfile.ZipFile(zipped) as zf:
            for name in (artifact.CONFIG_FILE, artifact.WEIGHTS_FILE, artifact.RECORD_FILE):
                assert zf.read(name) == (trained_adapters["alpha"] / name).read_bytes()
    assert not list(tmp_path.glob(".*part"))


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/adapters/alpha/export", {"format": "onnx"}, 422, "invalid_export_format"),
        ("/adapters/alpha/export", {}, 422, "invalid_export_format"),
        ("/adapters/nope/export", {"format": "gguf"}, 404, "adapter_not_found"),
        ("/adapters/alpha@deadbeef/export", {"format": "peft"}, 404, "adapter_not_found"),
        ("/adapters/.x/export", {"format": "peft"}, 422, "invalid_adapter_name"),
        ("/export", {"format": "peft", "adapters": "alpha:0.5,beta:0.5"}, 422, "export_unsupported"),
        ("/export", {"format": "merged", "adapters": "alpha:5"}, 422, "invalid_adapters"),
        ("/export", {"format": "gguf", "adapters": "alpha,nope"}, 404, "adapter_not_found"),
    ],
)
def test_export_errors(server, path: str, params: dict, status: int, code: str) -> None:
    with server.client() as http:
        r = http.get(path, params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_export_needs_the_api_key(server) -> None:
    r = httpx.get(f"{server.url}/adapters/alpha/export", params={"format": "peft"})
    assert r.status_code == 401

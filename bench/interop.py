"""Our GGUF export in llama.cpp: the same greedy tokens as our server (GPT-2) and as PEFT (Llama).

    python -m bench interop [--workdir runs/interop] [--outdir docs/benchmarks] [--max-new-tokens 24]

1. llama.cpp comes from the ``llama-cpp-python`` source distribution on PyPI (``pip download``), whose
   ``vendor/llama.cpp`` is built with cmake (only ``libllama``: minutes on 2 cores; kept in the workdir
   and reused). Its Python bindings (``llama_cpp.llama_cpp``, ctypes) drive that library directly.
2. A random-weight base of distilgpt2's shape is converted to GGUF (f32) by the ``convert_hf_to_gguf.py``
   shipped in that sdist, with the sdist's own ``gguf-py``.
3. Two random LoRA adapters (``alpha``: r=8 on c_attn/c_proj; ``beta``: rsLoRA r=4 on c_attn/c_proj/c_fc)
   are served by our server (fp32, CPU), exported through ``GET /adapters/{name}/export?format=gguf`` and
   ``GET /export?adapters=alpha:0.6,beta:-0.5&format=gguf``, and loaded by llama.cpp
   (``llama_adapter_lora_init``, scale 1).
4. For each prompt, llama.cpp's greedy tokens on the same prompt ids must equal our server's
   (``/generate`` with ``raw: true``, ``temperature: 0``), or differ only from a step where the server's
   top two logits tie (gap below ``TIE``): rounding breaks such ties either way. Also recorded: what
   llama.cpp makes of the adapter converted by its own ``convert_lora_to_gguf.py``.
5. Llama layout (q/k rows permuted for RoPE, seven projections, grouped-query attention): a random Llama
   with a LoRA, exported offline (``python -m trainer export``), against transformers + PEFT (fp32) as the
   reference, since our server serves GPT-2 only.

The llama.cpp side runs in a child process (``python -m bench.interop llama SPEC``): its C library logs
to stderr, which goes to a log file in the workdir.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

from bench.common import REPO, log, machine_description, write_json

SDIST = "llama-cpp-python==0.3.36"
PROMPTS = [
    "The capital of France is",
    "Human: Tell me a joke.\nAssistant:",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
]
ADAPTERS = {
    "alpha": {"r": 8, "lora_alpha": 16, "targets": ["c_attn", "c_proj"], "rslora": False, "seed": 1},
    "beta": {"r": 4, "lora_alpha": 8, "targets": ["c_attn", "c_proj", "c_fc"], "rslora": True, "seed": 2},
}
MIX = [("alpha", 0.6), ("beta", -0.5)]
ADAPTERS_RUNS = ("base", *ADAPTERS, "mix")
LLAMA_SHAPE = {
    "vocab_size": 50257,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,  # larger than the default 0.02: decisive logits, fewer near-ties
}


# ----------------------------------------------------------------------------- llama.cpp


def build_llama(workdir: Path) -> tuple[Path, Path]:
    """(sdist root, folder of libllama.so): downloaded and built once, reused afterwards."""
    root = _sdist_root(workdir)
    if root is None:
        log("interop_download", sdist=SDIST)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SDIST,
                "-d",
                workdir,
            ],
            check=True,
        )
        archive = next(workdir.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tf:
            tf.extractall(workdir, filter="data")
        root = _sdist_root(workdir)
        assert root is not None, f"no llama_cpp_python-* folder in {workdir} after extracting"
    src = root / "vendor" / "llama.cpp"
    lib_dir = src / "build" / "bin"
    if not (lib_dir / "libllama.so").exists():
        log("interop_build", src=str(src), note="cmake, target llama: several minutes on 2 cores")
        t0 = time.monotonic()
        configure = ["cmake", "-S", src, "-B", src / "build", "-DCMAKE_BUILD_TYPE=Release"]
        configure += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF"]
        subprocess.run([str(c) for c in configure], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama", "-j", jobs], check=True)
        log("interop_built", seconds=round(time.monotonic() - t0, 1))
    return root, lib_dir


def _sdist_root(workdir: Path) -> Path | None:
    return next((p for p in sorted(workdir.glob("llama_cpp_python-*")) if p.is_dir()), None)


def _bindings(root: Path, lib_dir: Path):
    """llama-cpp-python's ctypes module alone (its package __init__ pulls in server extras we do not need)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(root / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def llama_worker(spec_path: str) -> None:
    """Child process: llama.cpp's greedy tokens for every model x (label, lora file or None) x prompt."""
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    ll = _bindings(Path(spec["root"]), Path(spec["lib_dir"]))
    ll.llama_backend_init()
    results: dict[str, dict] = {}
    for m in spec["models"]:
        model = ll.llama_model_load_from_file(m["base_gguf"].encode(), ll.llama_model_default_params())
        assert model, f"llama.cpp could not load {m['base_gguf']}"
        n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        out_model: dict[str, object] = {}
        for label, lora in m["runs"].items():
            adapter = None
            if lora is not None:
                adapter = ll.llama_adapter_lora_init(model, lora.encode())
                if not adapter:
                    out_model[label] = {"loaded": False}
                    continue
            outs = []
            for ids in m["prompts"]:
                params = ll.llama_context_default_params()
                params.n_ctx = params.n_batch = 512
                params.n_threads = params.n_threads_batch = 1
                ctx = ll.llama_init_from_model(model, params)
                if adapter is not None:
                    arr = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
                    assert ll.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0)) == 0
                feed, out = list(ids), []
                for _ in range(m["max_new_tokens"]):
                    buf = (ll.llama_token * len(feed))(*feed)
                    assert ll.llama_decode(ctx, ll.llama_batch_get_one(buf, len(feed))) == 0
                    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                    token = int(np.argmax(logits))
                    out.append(token)
                    if token == m["eos"]:
                        break
                    feed = [token]
                ll.llama_free(ctx)
                outs.append(out)
            out_model[label] = {"loaded": True, "tokens": outs}
        results[m["key"]] = out_model
    print(json.dumps(results))


def _converter_env(src: Path, deps: Path) -> dict:
    """The sdist's own gguf-py and the converter's requirements (sentencepiece: it tries it first even for
    a BPE tokenizer), installed once into ``deps``, never into our environment."""
    if not (deps / "sentencepiece").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece~=0.2.0"]
        subprocess.run(pip, check=True)
    return dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{deps}")


def convert_base(root: Path, base: Path, out: Path) -> Path:
    """The base in GGUF (f32) by the sdist's converter. For GPT-2 it reads ``n_ctx``, which transformers no
    longer writes into the config, so a copy gets it (= n_positions, as in distilgpt2's own config)."""
    copy = out.with_suffix(".hf")  # also the --base of convert_lora_to_gguf.py
    if out.exists() and copy.is_dir():
        return out
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    cfg = json.loads((copy / "config.json").read_text())
    if cfg.get("model_type") == "gpt2":
        cfg.setdefault("n_ctx", cfg["n_positions"])
    (copy / "config.json").write_text(json.dumps(cfg))
    src = root / "vendor" / "llama.cpp"
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(copy), "--outfile", str(out)]
    cmd += ["--outtype", "f32"]
    env = _converter_env(src, root.parent / "convert-deps")
    subprocess.run(cmd, check=True, env=env, cwd=src, capture_output=True)
    return out


def convert_lora_with_llama_cpp(root: Path, base_copy: Path, adapter: Path, out: Path) -> str:
    """llama.cpp's own convert_lora_to_gguf.py on our adapter: its last line, or 'ok'."""
    src = root / "vendor" / "llama.cpp"
    cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base_copy)]
    cmd += ["--outfile", str(out), "--outtype", "f32"]
    env = _converter_env(src, root.parent / "convert-deps")
    done = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    return "ok" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


# ----------------------------------------------------------------------------- our side


def make_adapters(base: Path, adapter_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    for name, a in ADAPTERS.items():
        if (adapter_dir / name).is_dir():
            continue
        torch.manual_seed(a["seed"])
        cfg = LoraConfig(
            r=a["r"],
            lora_alpha=a["lora_alpha"],
            target_modules=a["targets"],
            use_rslora=a["rslora"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        get_peft_model(load_base_model(base), cfg).save_pretrained(adapter_dir / name)


def make_llama(gpt2_base: Path, base: Path, adapter_dir: Path) -> None:
    """A random Llama (grouped-query attention) with GPT-2's tokenizer, and a LoRA on all seven projections:
    our server does not serve Llama, so transformers + PEFT (fp32) is the reference for this one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (base / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(**LLAMA_SHAPE, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(base)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            if (gpt2_base / name).exists():
                shutil.copy(gpt2_base / name, base / name)
    if not (adapter_dir / "llama-lora").is_dir():
        torch.manual_seed(3)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        get_peft_model(model, lora).save_pretrained(adapter_dir / "llama-lora")


def hf_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], n: int, eos: int):
    """transformers (+ PEFT) fp32 greedy tokens and each step's top-2 logit gap."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokens, gaps = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
                output_scores=True,
                return_dict_in_generate=True,
            )
        tokens.append(out.sequences[0, len(ids) :].tolist())
        top2 = [torch.topk(score[0], 2).values for score in out.scores]
        gaps.append([float(v[0] - v[1]) for v in top2])
    return tokens, gaps


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
        None if len(a) == len(b) else min(len(a), len(b)),
    )


def compare(label: str, reference: str, ref_tokens, ref_gaps, got: dict) -> dict:
    """One row: llama.cpp vs the reference, and at each first difference the reference's top-2 gap there
    (a gap near 0 is a tie that float rounding may break either way)."""
    row = {"run": label, "reference": reference, "loaded": got["loaded"], "prompts": len(ref_tokens)}
    row["tokens_compared"] = sum(len(t) for t in ref_tokens)
    if not got["loaded"]:
        return {**row, "equal": False, "first_difference": [], "gap_at_difference": []}
    diffs = [first_difference(a, b) for a, b in zip(ref_tokens, got["tokens"], strict=True)]
    gaps = [None if d is None or d >= len(g) else g[d] for d, g in zip(diffs, ref_gaps, strict=True)]
    row |= {"equal": all(d is None for d in diffs), "first_difference": diffs, "gap_at_difference": gaps}
    row |= {"reference_tokens": ref_tokens, "llama_cpp_tokens": got["tokens"]}
    log("interop_compare", run=label, equal=row["equal"], gaps=gaps)
    return row


def run(args: argparse.Namespace) -> dict:
    import httpx
    from loraserve_client import Client
    from transformers import AutoTokenizer

    from bench import servers
    from trainer.model import DISTILGPT2_SHAPE, make_random_base

    work = args.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    root, lib_dir = build_llama(work)
    base = work / "base-distilgpt2-random"
    if not (base / "config.json").exists():
        make_random_base(base, **DISTILGPT2_SHAPE, seed=0)
    base_gguf = convert_base(root, base, work / "base-f32.gguf")
    adapter_dir = work / "adapters"
    make_adapters(base, adapter_dir)
    tok = AutoTokenizer.from_pretrained(str(base))
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    eos = tok.eos_token_id

    served: dict[str, list[list[int]]] = {}
    served_gaps: dict[str, list[list[float]]] = {}
    files: dict[str, str | None] = {"base": None}
    with servers.loraserve(
        model=base,
        adapter_dir=adapter_dir,
        data_dir=work / "data",
        device="cpu",
        max_batch_size=None,
        max_loaded_adapters=4,
        log_path=work / "server.log",
        extra_env={"LORASERVE_DTYPE": "float32"},
    ) as srv:
        runs = {"base": {}, **{n: {"adapter": n} for n in ADAPTERS}}
        runs["mix"] = {"adapters": [{"name": n, "weight": w} for n, w in MIX]}
        with httpx.Client(base_url=srv.base_url, timeout=600) as http:
            for label, which in runs.items():
                served[label], served_gaps[label] = [], []
                for prompt in PROMPTS:
                    body = {"prompt": prompt, "raw": True, "temperature": 0, "logprobs": 2, **which}
                    r = http.post("/generate", json={**body, "max_new_tokens": args.max_new_tokens})
                    r.raise_for_status()
                    steps = r.json()["tokens"]
                    served[label].append([t["id"] for t in steps])
                    served_gaps[label].append(
                        [t["top"][0]["logprob"] - t["top"][1]["logprob"] for t in steps]
                    )
        with Client(srv.base_url, timeout=600) as client:
            t0 = time.monotonic()
            for name in ADAPTERS:
                files[name] = str(client.adapters.export(name, "gguf", work / f"{name}.gguf"))
            mix = [f"{n}:{w}" for n, w in MIX]
            files["mix"] = str(client.adapters.export(mix, "gguf", work / "mix.gguf"))
            export_s = time.monotonic() - t0
    own_out = work / "alpha-llama-cpp.gguf"
    own = convert_lora_with_llama_cpp(root, work / "base-f32.hf", adapter_dir / "alpha", own_out)
    if own == "ok":
        files["alpha_llama_cpp_converter"] = str(own_out)

    # Llama: our exporter offline (python -m trainer export), reference transformers + PEFT
    llama_base, llama_adapters = work / "base-llama-random", work / "llama-adapters"
    make_llama(base, llama_base, llama_adapters)
    llama_gguf = convert_base(root, llama_base, work / "base-llama-f32.gguf")
    llama_lora = work / "llama-lora.gguf"
    cmd = [sys.executable, "-m", "trainer", "export", "llama-lora", "--adapter-dir", str(llama_adapters)]
    cmd += ["--base", str(llama_base), "--format", "gguf", "--out", str(llama_lora)]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    hf = {
        "llama-base": hf_greedy(llama_base, None, prompt_ids, args.max_new_tokens, eos),
        "llama-lora": hf_greedy(
            llama_base, llama_adapters / "llama-lora", prompt_ids, args.max_new_tokens, eos
        ),
    }

    common = {"prompts": prompt_ids, "max_new_tokens": args.max_new_tokens, "eos": eos}
    spec = {
        "root": str(root),
        "lib_dir": str(lib_dir),
        "models": [
            {"key": "gpt2", "base_gguf": str(base_gguf), "runs": files, **common},
            {
                "key": "llama",
                "base_gguf": str(llama_gguf),
                "runs": {"llama-base": None, "llama-lora": str(llama_lora)},
                **common,
            },
        ],
    }
    (work / "llama-spec.json").write_text(json.dumps(spec))
    with open(work / "llama.log", "w") as logf:
        done = subprocess.run(
            [sys.executable, "-m", "bench.interop", "llama", str(work / "llama-spec.json")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=logf,
            text=True,
            check=True,
        )
    llama = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [compare(n, "our server", served[n], served_gaps[n], llama["gpt2"][n]) for n in (*ADAPTERS_RUNS,)]
    rows += [compare(n, "transformers + PEFT", *hf[n], llama["llama"][n]) for n in hf]
    differs_from_base = {n: served[n] != served["base"] for n in (*ADAPTERS, "mix")}
    differs_from_base["llama-lora"] = hf["llama-lora"][0] != hf["llama-base"][0]
    if "alpha_llama_cpp_converter" in llama["gpt2"]:
        own_loaded = llama["gpt2"]["alpha_llama_cpp_converter"]["loaded"]
        log_text = (work / "llama.log").read_text(errors="replace")
        reason = next((ln.strip() for ln in log_text.splitlines() if "incorrect shape" in ln), None)
        own = f"converted; llama.cpp {'loaded it' if own_loaded else 'refused it'}" + (
            f": `{reason}`" if reason else ""
        )
    return {
        "benchmark": "interop",
        "llama_cpp": {"sdist": SDIST, "commit": _ggml_commit(root)},
        "base": "random weights, distilgpt2 shape (6 layers, 768 wide), GGUF f32; our server fp32 on CPU",
        "llama_base": {**LLAMA_SHAPE, "note": "random weights, GPT-2 tokenizer, GGUF f32"},
        "max_new_tokens": args.max_new_tokens,
        "adapters": ADAPTERS,
        "mix": MIX,
        "rows": rows,
        "adapters_change_the_output": differs_from_base,
        "export_seconds": round(export_s, 1),
        "llama_cpp_convert_lora_to_gguf_on_alpha": own,
        "machine": machine_description(),
        "load_average": os.getloadavg(),
    }


def _ggml_commit(root: Path) -> str | None:
    """The ggml version and commit the build stamped into its header, e.g. ``0.25.3 0c1e570-dirty``."""
    header = root / "vendor" / "llama.cpp" / "build" / "ggml" / "src" / "ggml-version.h"
    if not header.exists():
        return None
    found = dict(re.findall(r'#define GGML_(VERSION|COMMIT)\s+"([^"]*)"', header.read_text()))
    return " ".join(v for v in (found.get("VERSION"), found.get("COMMIT")) if v) or None


TIE = 1e-3  # a top-2 logit gap below this is a tie that float rounding may break either way


def explained(row: dict) -> bool:
    """Equal, or every difference starts where the reference's top two logits tie."""
    return row["loaded"] and all(
        d is None or (g is not None and g < TIE)
        for d, g in zip(row["first_difference"], row["gap_at_difference"], strict=True)
    )


def markdown(res: dict) -> str:
    lines = [
        "## Interop: our GGUF export in llama.cpp",
        "",
        f"`python -m bench interop`: llama.cpp built from the `{res['llama_cpp']['sdist']}` sdist "
        f"(ggml {res['llama_cpp']['commit']}); bases converted by its `convert_hf_to_gguf.py` (f32). "
        f"Greedy tokens of llama.cpp with our exported GGUF LoRA vs the reference, {len(PROMPTS)} prompts, "
        f"up to {res['max_new_tokens']} new tokens each. GPT-2: {res['base']}; reference: our server. "
        "Llama (2 layers, 256 wide, 8 heads, 4 KV heads, random weights): our server does not serve Llama, "
        "so the reference is transformers + PEFT (fp32).",
        "",
        "| run | reference | llama.cpp loaded it | tokens compared | equal | first difference per prompt "
        "(reference's top-2 logit gap there) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in res["rows"]:
        cells = [
            "-" if d is None else f"{d} ({g:.1e})" if g is not None else str(d)
            for d, g in zip(row["first_difference"], row["gap_at_difference"], strict=True)
        ]
        equal = "yes" if row["equal"] else ("no, at ties only" if explained(row) else "NO")
        lines.append(
            f"| {row['run']} | {row['reference']} | {'yes' if row['loaded'] else 'no'} | "
            f"{row['tokens_compared']} | {equal} | {', '.join(cells)} |"
        )
    own = res["llama_cpp_convert_lora_to_gguf_on_alpha"]
    load = ", ".join(f"{x:.1f}" for x in res["load_average"])
    changed = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in res["adapters_change_the_output"].items())
    lines += [
        "",
        f"`alpha`: r=8 on c_attn/c_proj; `beta`: rsLoRA r=4 on c_attn/c_proj/c_fc; `mix`: the composition "
        f"{', '.join(f'{n}:{w}' for n, w in res['mix'])} exported as one GGUF adapter; `llama-lora`: r=8 on "
        "q/k/v/o/gate/up/down. The adapters change the greedy output (vs their base): "
        f"{changed}. Exporting the three GPT-2 GGUF files over HTTP took {res['export_seconds']} s.",
        "",
        f"llama.cpp's own `convert_lora_to_gguf.py` on `alpha`: {own}.",
        "",
        f"Load average during the run (2 cores, shared): {load}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench interop", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "interop", help="llama.cpp, models, logs")
    p.add_argument("--outdir", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    res = run(args)
    write_json(args.outdir / "interop.json", res)  # `python -m bench report` adds it to results.md
    print(markdown(res))
    return 0 if all(explained(r) for r in res["rows"]) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["llama"]:
        llama_worker(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))

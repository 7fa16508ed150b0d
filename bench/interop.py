"""Our GGUF export in llama.cpp: the same greedy tokens as our server, for the base, two adapters and a mix.

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
   (``/generate`` with ``raw: true``, ``temperature: 0``). Also recorded: what llama.cpp makes of the
   adapter converted by its own ``convert_lora_to_gguf.py``.

The llama.cpp side runs in a child process (``python -m bench.interop llama SPEC``): its C library logs
to stderr, which goes to a log file in the workdir.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
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
    """Child process: greedy tokens from llama.cpp for every (label, lora file or None) x prompt ids."""
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    ll = _bindings(Path(spec["root"]), Path(spec["lib_dir"]))
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(spec["base_gguf"].encode(), ll.llama_model_default_params())
    assert model, "llama.cpp could not load the base"
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    results: dict[str, object] = {}
    for label, lora in spec["runs"].items():
        adapter = None
        if lora is not None:
            adapter = ll.llama_adapter_lora_init(model, lora.encode())
            if not adapter:
                results[label] = {"loaded": False}
                continue
        outs = []
        for ids in spec["prompts"]:
            params = ll.llama_context_default_params()
            params.n_ctx = params.n_batch = 512
            params.n_threads = params.n_threads_batch = 1
            ctx = ll.llama_init_from_model(model, params)
            if adapter is not None:
                arr = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
                assert ll.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0)) == 0
            feed, out = list(ids), []
            for _ in range(spec["max_new_tokens"]):
                buf = (ll.llama_token * len(feed))(*feed)
                assert ll.llama_decode(ctx, ll.llama_batch_get_one(buf, len(feed))) == 0
                logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                out.append(token)
                if token == spec["eos"]:
                    break
                feed = [token]
            ll.llama_free(ctx)
            outs.append(out)
        results[label] = {"loaded": True, "tokens": outs}
    print(json.dumps(results))


def convert_base(root: Path, base: Path, out: Path) -> Path:
    """The base in GGUF (f32) by the sdist's converter. It reads ``n_ctx``, which transformers no longer
    writes into a GPT-2 config, so a copy gets it (= n_positions, as in distilgpt2's own config)."""
    if out.exists():
        return out
    copy = out.parent / "base-for-convert"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.setdefault("n_ctx", cfg["n_positions"])
    (copy / "config.json").write_text(json.dumps(cfg))
    src = root / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    cmd = [
        sys.executable,
        str(src / "convert_hf_to_gguf.py"),
        str(copy),
        "--outfile",
        str(out),
        "--outtype",
        "f32",
    ]
    subprocess.run(cmd, check=True, env=env, cwd=src, capture_output=True)
    return out


def convert_lora_with_llama_cpp(root: Path, base_copy: Path, adapter: Path, out: Path) -> str:
    """llama.cpp's own convert_lora_to_gguf.py on our adapter: its last line, or 'ok'."""
    src = root / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base_copy)]
    cmd += ["--outfile", str(out), "--outtype", "f32"]
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


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
        None if len(a) == len(b) else min(len(a), len(b)),
    )


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

    served: dict[str, list[list[int]]] = {}
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
                served[label] = []
                for prompt in PROMPTS:
                    body = {"prompt": prompt, "raw": True, "temperature": 0, "logprobs": 0}
                    r = http.post("/generate", json={**body, "max_new_tokens": args.max_new_tokens, **which})
                    r.raise_for_status()
                    served[label].append([t["id"] for t in r.json()["tokens"]])
        with Client(srv.base_url, timeout=600) as client:
            t0 = time.monotonic()
            for name in ADAPTERS:
                files[name] = str(client.adapters.export(name, "gguf", work / f"{name}.gguf"))
            mix = [f"{n}:{w}" for n, w in MIX]
            files["mix"] = str(client.adapters.export(mix, "gguf", work / "mix.gguf"))
            export_s = time.monotonic() - t0
    own = convert_lora_with_llama_cpp(
        root, work / "base-for-convert", adapter_dir / "alpha", work / "alpha-llama-cpp.gguf"
    )
    if own == "ok":
        files["alpha_llama_cpp_converter"] = str(work / "alpha-llama-cpp.gguf")

    spec = {
        "root": str(root),
        "lib_dir": str(lib_dir),
        "base_gguf": str(base_gguf),
        "runs": files,
        "prompts": prompt_ids,
        "max_new_tokens": args.max_new_tokens,
        "eos": tok.eos_token_id,
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
    rows = []
    for label in ("base", *ADAPTERS, "mix"):
        got = llama[label]
        same = got["loaded"] and got["tokens"] == served[label]
        diffs = [first_difference(a, b) for a, b in zip(got.get("tokens", []), served[label], strict=False)]
        rows.append(
            {
                "run": label,
                "loaded": got["loaded"],
                "prompts": len(PROMPTS),
                "tokens_compared": sum(len(t) for t in served[label]),
                "equal": bool(same),
                "first_difference": diffs,
            }
        )
        log("interop_compare", run=label, equal=bool(same))
    differs_from_base = {n: served[n] != served["base"] for n in (*ADAPTERS, "mix")}
    if "alpha_llama_cpp_converter" in llama:
        own_loaded = llama["alpha_llama_cpp_converter"]["loaded"]
        log_text = (work / "llama.log").read_text(errors="replace")
        reason = next((ln.strip() for ln in log_text.splitlines() if "incorrect shape" in ln), None)
        own = f"converted; llama.cpp {'loaded it' if own_loaded else 'refused it'}" + (
            f": {reason}" if reason else ""
        )
    return {
        "benchmark": "interop",
        "llama_cpp": {"sdist": SDIST, "commit": _ggml_commit(root)},
        "base": "random weights, distilgpt2 shape (6 layers, 768 wide), GGUF f32; our server fp32 on CPU",
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
    cache = root / "vendor" / "llama.cpp" / "build" / "CMakeCache.txt"
    for line in cache.read_text(errors="replace").splitlines() if cache.exists() else []:
        if line.startswith("GGML_BUILD_COMMIT"):
            return line.split("=", 1)[1]
    return None


def markdown(res: dict) -> str:
    lines = [
        "## Interop: our GGUF export in llama.cpp",
        "",
        f"`python -m bench interop`: llama.cpp from the `{res['llama_cpp']['sdist']}` sdist; {res['base']}. "
        f"Greedy tokens of llama.cpp (our exported GGUF LoRA on the base converted by llama.cpp's "
        f"`convert_hf_to_gguf.py`) vs our server, {len(PROMPTS)} prompts, up to {res['max_new_tokens']} new "
        "tokens each.",
        "",
        "| run | llama.cpp loaded it | tokens compared | equal | first difference per prompt |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in res["rows"]:
        diffs = ", ".join("-" if d is None else str(d) for d in row["first_difference"])
        lines.append(
            f"| {row['run']} | {'yes' if row['loaded'] else 'no'} | {row['tokens_compared']} | "
            f"{'yes' if row['equal'] else 'NO'} | {diffs} |"
        )
    changed = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in res["adapters_change_the_output"].items())
    lines += [
        "",
        f"The adapters change the output (vs the base): {changed}. `mix` is the composition "
        f"{', '.join(f'{n}:{w}' for n, w in res['mix'])}, exported as one GGUF adapter.",
        f"llama.cpp's own `convert_lora_to_gguf.py` on `alpha`: "
        f"{res['llama_cpp_convert_lora_to_gguf_on_alpha']}.",
        f"Load average during the run: {', '.join(f'{x:.1f}' for x in res['load_average'])}.",
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
    write_json(args.outdir / "interop.json", res)
    (args.outdir / "interop.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if all(r["equal"] for r in res["rows"]) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["llama"]:
        llama_worker(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))

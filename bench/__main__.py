"""Benchmarks, one command each (CPU by default; ``--device cuda`` on a GPU):

    python -m bench serve   # server vs naive FastAPI + PEFT vs offline ceiling; churn; short vs long
    python -m bench engine  # the engine in-process vs batched HF generate / PEFT (its own options: --help)
    python -m bench decode  # where a decode step's time goes, against the dense-matmul limit
    python -m bench train   # this trainer vs HF Trainer + PEFT (padding to max_length, and dynamic padding)
    python -m bench serve-train  # 32-client /generate p99 with a training job running vs without
    python -m bench serve-mix    # /generate tokens/s on weighted compositions and JSON-constrained rows
    python -m bench short-load   # short requests while long ones grow; RSS; base tokens/s (--baseline-src)
    python -m bench serve-dora   # /generate tokens/s on 8 DoRA adapters vs 8 LoRA adapters of the same rank
    python -m bench prefix-cache # 512-token system prompt, 8 adapters: TTFT, tokens/s, prefix cache on vs off
    python -m bench serve --base smollm2-135m  # the same serving rows on a SmolLM2-135M-shaped base
    python -m bench fits    # what fits a 12 GB GPU per base, computed from the configs (not measured)
    python -m bench interop      # our GGUF export in llama.cpp: same greedy tokens as our server
    python -m bench report  # re-render docs/benchmarks/results.md and the plots from the JSON results

Results go to docs/benchmarks/ (JSON, results.md, PNG plots); progress is JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.common import REPO, log, write_json
from trainer.model import SMOLLM2_135M_SHAPE

TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 512}
# --base: the random-weight stand-ins (shape only; GPT-2's tokenizer, vocabulary sized to it)
BASES = {"distilgpt2": {}, "smollm2-135m": SMOLLM2_135M_SHAPE}


def render(outdir: Path) -> Path:
    """Write results.md and the plots from whatever results JSON exist in ``outdir``."""
    from bench import report

    parts = [
        "# Benchmark results",
        "",
        "Every ratio below was measured in one run on one machine, with the methods interleaved; "
        "the machine is shared and noisy, so absolute numbers mean little. How to reproduce: "
        "[README.md](README.md).",
        "",
    ]
    serve_json, train_json = outdir / "serve.json", outdir / "train.json"
    serve_train_json = outdir / "serve_train.json"
    if serve_json.exists():
        res = json.loads(serve_json.read_text())
        parts.append(report.serve_markdown(res))
        report.plot_throughput(res, outdir / "throughput.png")
        report.plot_latency_cdf(res, outdir / "latency_cdf.png")
        report.plot_churn(res, outdir / "churn_memory.png")
        parts += [
            "![throughput](throughput.png)",
            "",
            "![latency CDF](latency_cdf.png)",
            "",
            "![memory under churn](churn_memory.png)",
            "",
        ]
    if train_json.exists():
        res = json.loads(train_json.read_text())
        parts.append(report.train_markdown(res))
        report.plot_loss_curves(res, outdir / "loss_curves.png")
        parts += ["![loss curves](loss_curves.png)", ""]
    if serve_train_json.exists():
        from bench import serve_train

        parts.append(serve_train.markdown(json.loads(serve_train_json.read_text())))
    shares_json = outdir / "serve_train_shares.json"
    if shares_json.exists():
        from bench import serve_train

        res = json.loads(shares_json.read_text())
        serve_train.plot_shares(res, outdir / "serve_train_shares.png")
        parts.append(serve_train.shares_markdown(res))
    for path in sorted(outdir.glob("serve-*.json")):  # other bases' serving rows
        res = json.loads(path.read_text())
        parts += [f"## Serving on a {res.get('base', path.stem)}-shaped base", "", report.serve_markdown(res)]
    for path in sorted(outdir.glob("short_load*.json")):
        from bench import short_load

        parts.append(short_load.markdown(json.loads(path.read_text())))
    interop_json = outdir / "interop.json"
    serve_mix_json = outdir / "serve_mix.json"
    if serve_mix_json.exists():
        from bench import serve_mix

        parts.append(serve_mix.markdown(json.loads(serve_mix_json.read_text())))
    serve_dora_json = outdir / "serve_dora.json"
    if serve_dora_json.exists():
        from bench import serve_mix

        parts.append(serve_mix.markdown(json.loads(serve_dora_json.read_text())))
    prefix_json = outdir / "prefix_cache.json"
    if prefix_json.exists():
        from bench import prefix_cache

        parts.append(prefix_cache.markdown(json.loads(prefix_json.read_text())))
    if interop_json.exists():
        from bench import interop

        parts.append(interop.markdown(json.loads(interop_json.read_text())))
    path = outdir / "results.md"
    path.write_text("\n".join(parts))
    return path


def config_from(cls: type, a: argparse.Namespace, **given: Any) -> Any:
    """A benchmark's config dataclass from the parsed options: every field named like an option's
    ``dest`` takes its value, the others keep their defaults; ``given`` wins over both."""
    values = {f.name: getattr(a, f.name) for f in fields(cls) if f.init and hasattr(a, f.name)}
    return cls(**{**values, **given})


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def print_targets(res: dict) -> None:
    print(f"\n{res['benchmark']} benchmark: targets (printed, never asserted)")
    for t in res["targets"]:
        m = t["measured"]
        status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        val = "n/a" if m is None else f"{m:.3f}"
        print(f"  {t['what']:<75} {val:>9}  target {t['op']} {t['target']:<6} {status}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument(
            "--workdir", type=Path, default=REPO / "runs" / "bench", help="models, adapters, logs"
        )
        sp.add_argument("--outdir", type=Path, default=REPO / "docs" / "benchmarks", help="results and plots")
        sp.add_argument("--rounds", type=int, default=2, help="interleaved rounds (order alternates)")
        sp.add_argument("--rank", type=int, default=32)
        sp.add_argument(
            "--base",
            default="distilgpt2",
            choices=sorted(BASES),
            help="the random-weight base's architecture (serve writes serve.json for distilgpt2, "
            "serve-<base>.json for the others)",
        )
        sp.add_argument(
            "--tiny", action="store_true", help="a 2-layer, 64-wide base (smoke tests), not distilgpt2"
        )
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument(
            "--threads",
            type=int,
            default=None,
            help="OMP/MKL threads for every process under test (default: torch's choice, all cores)",
        )
        sp.add_argument(
            "--quiet-wait",
            dest="quiet_wait_s",
            metavar="SECONDS",
            type=float,
            default=10.0,
            help="seconds to wait for other processes to calm down before each timed phase",
        )

    s = sub.add_parser("serve", help="serving benchmark")
    common(s)
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    s.add_argument("--clients", type=int, default=32)
    s.add_argument("--adapters", type=int, default=8)
    s.add_argument(
        "--sweep", type=_ints, default=(1, 8, 32), help="concurrency levels for the throughput plot"
    )
    s.add_argument(
        "--duration",
        dest="duration_s",
        metavar="SECONDS",
        type=float,
        default=40.0,
        help="time bound of each load run, seconds",
    )
    s.add_argument("--max-requests", type=int, default=512, help="count bound of each load run")
    s.add_argument(
        "--max-new-tokens", type=int, default=256, help="upper end of the 16..N max_new_tokens mix"
    )
    s.add_argument("--churn-adapters", type=int, default=200)
    s.add_argument("--churn-requests", type=int, default=200)
    s.add_argument("--cache-size", type=int, default=16)
    s.add_argument("--churn-duration", dest="churn_duration_s", metavar="SECONDS", type=float, default=90.0)
    s.add_argument("--long-clients", type=int, default=8)
    s.add_argument(
        "--server-batch",
        default="tuned",
        choices=["tuned", "default"],
        help="tuned: --max-batch-size = the clients; default: the server derives its batch capacity",
    )
    s.add_argument("--long-new-tokens", type=int, default=256)
    s.add_argument("--short-new-tokens", type=int, default=16)
    s.add_argument("--n-short", type=int, default=8)
    s.add_argument("--profile", action="store_true", help="py-spy the server during an extra, unmeasured run")

    t = sub.add_parser("train", help="training benchmark")
    common(t)
    t.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--grad-accum", type=int, default=4)
    t.add_argument("--max-length", type=int, default=256, help="the prototype pads every row to this")
    t.add_argument("--train-rows", type=int, default=160)
    t.add_argument("--eval-rows", type=int, default=40)
    t.add_argument(
        "--methods", type=_names, default=("loraserve", "hf-maxlen", "hf-dynamic", "hf-dynamic-bf16")
    )

    st = sub.add_parser("serve-train", help="serving latency with a training job running vs without")
    common(st)
    st.add_argument("--clients", type=int, default=32)
    st.add_argument("--adapters", type=int, default=4)
    st.add_argument(
        "--duration",
        dest="duration_s",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="seconds of load alone (and at least with the job)",
    )
    st.add_argument(
        "--max-new-tokens", type=int, default=64, help="upper end of the 16..N max_new_tokens mix"
    )
    st.add_argument("--job-steps", type=int, default=8)
    st.add_argument("--job-batch-size", type=int, default=4)
    st.add_argument("--job-rows", type=int, default=64)
    st.add_argument(
        "--max-pause",
        dest="max_pause_s",
        metavar="SECONDS",
        type=float,
        default=None,
        help="LORASERVE_TRAIN_MAX_PAUSE (server default)",
    )
    st.add_argument(
        "--yield-rows", type=int, default=None, help="LORASERVE_TRAIN_YIELD_ROWS (0: no yielding)"
    )
    st.add_argument(
        "--min-share",
        dest="min_shares",
        metavar="SHARE",
        type=float,
        nargs="+",
        default=None,
        help="LORASERVE_TRAIN_MIN_SHARE (server default); several: one run each, the trade-off drawn "
        "(serve_train_shares.json and .png)",
    )
    st.add_argument("--train-threads", type=int, default=None, help="LORASERVE_TRAIN_THREADS")

    sm = sub.add_parser("serve-mix", help="composed and JSON-constrained traffic vs plain adapters")
    sd = sub.add_parser("serve-dora", help="DoRA adapters vs LoRA adapters of the same rank, in one run")
    for sp in (sm, sd):
        common(sp)
        sp.add_argument("--clients", type=int, default=32)
        sp.add_argument("--adapters", type=int, default=8)
        sp.add_argument(
            "--duration",
            dest="duration_s",
            metavar="SECONDS",
            type=float,
            default=30.0,
            help="seconds of load per phase",
        )
        sp.add_argument(
            "--max-new-tokens", type=int, default=64, help="upper end of the 16..N max_new_tokens mix"
        )
    sm.add_argument(
        "--json-every", type=int, default=4, help="every n-th constrained-traffic request has a schema"
    )

    sl = sub.add_parser(
        "short-load", help="short requests while long ones grow, fresh server, default capacity"
    )
    common(sl)
    sl.add_argument("--adapters", type=int, default=8)
    sl.add_argument("--clients", type=int, default=32, help="closed-loop clients of the base-only run")
    sl.add_argument(
        "--duration",
        dest="duration_s",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="time bound of the base-only run, seconds",
    )
    sl.add_argument("--max-new-tokens", type=int, default=256, help="upper end of the base-only 16..N mix")
    sl.add_argument("--long-clients", type=int, default=8)
    sl.add_argument("--long-new-tokens", type=int, default=480)
    sl.add_argument("--short-new-tokens", type=int, default=4)
    sl.add_argument("--n-short", type=int, default=15)
    sl.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run the server of this source tree (before/after)",
    )

    pc = sub.add_parser("prefix-cache", help="a shared system prompt over adapters: --prefix-cache on vs off")
    common(pc)
    pc.add_argument("--clients", type=int, default=32)
    pc.add_argument("--adapters", type=int, default=8)
    pc.add_argument("--system-tokens", type=int, default=512, help="the shared system prompt's length")
    pc.add_argument(
        "--duration",
        dest="duration_s",
        metavar="SECONDS",
        type=float,
        default=25.0,
        help="seconds of load per phase",
    )
    pc.add_argument("--max-new-tokens", type=int, default=32, help="upper end of the 8..N max_new_tokens mix")

    r = sub.add_parser("report", help="re-render results.md and plots from the JSON results")
    r.add_argument("--outdir", type=Path, default=REPO / "docs" / "benchmarks")

    sub.add_parser("interop", help="GGUF export in llama.cpp vs our server (python -m bench interop --help)")
    sub.add_parser("engine", help="engine micro-benchmark in one process (python -m bench engine --help)")
    sub.add_parser("decode", help="decode-step time and profile vs the dense-matmul limit (bench/decode.py)")
    sub.add_parser("fits", help="print what fits a 12 GB GPU per base, computed from configs (bench/fits.py)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["interop"]:  # its options are its own (bench/interop.py)
        from bench import interop

        return interop.main(argv[1:])
    if argv[:1] == ["engine"]:  # its options are its own (bench/engine.py)
        from bench import engine

        engine.main(argv[1:])
        return 0
    if argv[:1] == ["decode"]:  # its options are its own (bench/decode.py)
        from bench import decode

        decode.main(argv[1:])
        return 0
    a = p.parse_args(argv)
    if a.cmd == "fits":
        from bench import fits

        print(fits.markdown())
        return 0
    if a.cmd == "report":
        print(render(a.outdir))
        return 0
    shape = TINY_SHAPE if a.tiny else BASES[a.base]
    if a.threads:  # inherited by every server, offline and training process this command starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    if a.cmd == "prefix-cache":
        from bench import prefix_cache

        res = prefix_cache.run(config_from(prefix_cache.PrefixCacheConfig, a, base_shape=shape))
        write_json(a.outdir / "prefix_cache.json", res)
        print(prefix_cache.markdown(res))
        log("done", results=str(render(a.outdir)))
        return 0
    if a.cmd == "serve":
        from bench.serve import ServeConfig, run

        res = run(config_from(ServeConfig, a, base_shape=shape))
        res["base"] = a.base
        write_json(a.outdir / ("serve.json" if a.base == "distilgpt2" else f"serve-{a.base}.json"), res)
    elif a.cmd == "serve-train":
        from bench.serve_train import ServeTrainConfig, run

        shares = a.min_shares or [None]
        cfg = config_from(ServeTrainConfig, a, base_shape=shape, min_share=shares[0])
        if len(shares) > 1:
            from bench.serve_train import sweep_shares

            swept = sweep_shares(cfg, shares)
            write_json(a.outdir / "serve_train_shares.json", swept)
            for share, res in zip(shares, swept["runs"], strict=True):
                log("share_done", min_share=share, **res["ratios"])
                if share != shares[-1]:
                    print_targets(res)  # the last one's are printed below
        else:
            res = run(cfg)
            write_json(a.outdir / "serve_train.json", res)
    elif a.cmd == "short-load":
        from bench.short_load import ShortLoadConfig, run

        res = run(config_from(ShortLoadConfig, a, base_shape=shape))
        res["base"] = a.base
        name = "short_load.json" if a.base == "distilgpt2" else f"short_load-{a.base}.json"
        write_json(a.outdir / name, res)
    elif a.cmd in ("serve-mix", "serve-dora"):
        from bench.serve_mix import DORA_KINDS, KINDS, ServeMixConfig, run

        kinds = DORA_KINDS if a.cmd == "serve-dora" else KINDS
        res = run(config_from(ServeMixConfig, a, base_shape=shape, kinds=kinds))
        write_json(a.outdir / ("serve_dora.json" if a.cmd == "serve-dora" else "serve_mix.json"), res)
    else:
        from bench.train import TrainConfig, run

        res = run(config_from(TrainConfig, a, base_shape=shape))
        write_json(a.outdir / "train.json", res)
    path = render(a.outdir)
    print_targets(res)
    log("done", results=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode-step benchmark: where one decode step's time goes, and how far it is from the dense-matmul limit.

    python -m bench decode [--base distilgpt2|smollm2-135m] [--batch 32] [--adapters 8] [--rank 32]
                           [--steps 24] [--reps 3] [--dtype bfloat16] [--threads 1] [--profile]

``B`` rows (prompts of 10-60 tokens, greedy, EOS ignored) are admitted into an ``Engine`` on a
random-weight base, then ``--steps`` decode steps (``Engine.step``: plan, forward, sampling) are timed,
base-only rows against rows round-robin over ``--adapters`` LoRA adapters (every adapter in flight),
interleaved, the order reversed every repetition. Each figure is tokens per CPU-second of this
process (steadier than wall time on a shared box) and tokens/s by wall time.

The *dense-matmul limit* is what the step's dense layers alone allow: every block linear layer of the
base (the model's own, unfused shapes) and the LM head called at ``B`` rows as ``dense.Dense`` layers
(prepacked on CPU), one pass over all of them in order (median of ``--limit-calls`` passes, CPU time);
``B / seconds`` is the limit in tokens/s. ``alone`` sums each layer timed alone instead (its weights
stay in cache: a bound no step reaches). ``--profile`` adds a ``torch.profiler`` table of one
repetition's steps per kind: self CPU time per op, and what is left over (Python).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch


def dense_limit(runner, rows: int, calls: int) -> dict:
    """CPU seconds the step's dense layers take at ``rows`` rows: every LoRA-targetable layer of the
    base (unfused, the model's own shapes) and the LM head as the runner's dense layers
    (``dense.Dense``, prepacked on CPU). ``seconds``: one pass over all of them in order, as a step
    reads them (median of ``calls`` passes); ``alone_seconds``: each layer timed alone, repeatedly
    (its weights then stay in the CPU's cache: a lower bound no step reaches), summed."""
    from service.engine.dense import Dense, prepack_supported

    pack = prepack_supported(runner.device, runner.dtype)
    layers = [
        Dense(*runner.base_weight(i, name), pack=pack, batch_hint=rows)
        for i, shapes in enumerate(runner.module_shapes())
        for name in shapes
    ] + [runner.head]
    xs = [torch.randn(rows, d.in_features).to(runner.dtype) for d in layers]
    alone, passes = 0.0, []
    with torch.inference_mode():
        for d, x in zip(layers, xs, strict=True):
            d(x)
            times = []
            for _ in range(calls):
                c0 = time.process_time()
                d(x)
                times.append(time.process_time() - c0)
            alone += statistics.median(times)
        for _ in range(calls):  # one pass over every layer, as a step reads them (from memory, not cache)
            c0 = time.process_time()
            for d, x in zip(layers, xs, strict=True):
                d(x)
            passes.append(time.process_time() - c0)
    one_pass = statistics.median(passes)
    return {
        "seconds": one_pass,
        "tokens_per_s": rows / one_pass,
        "alone_seconds": alone,
        "alone_tokens_per_s": rows / alone,
        "layers": len(layers),
    }


def _profile(engine, steps: int, top: int = 14) -> dict:
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    wall = time.perf_counter() - t0
    ops = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total_self = sum(e.self_cpu_time_total for e in ops) / 1e6
    ranked = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "step_ms": 1e3 * wall / steps,
        "ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in ranked},
        "op_calls_per_step": round(sum(e.count for e in ops) / steps, 1),
        "outside_ops_ms_per_step": round(1e3 * (wall - total_self) / steps, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="distilgpt2", choices=["distilgpt2", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-calls", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--masked-max", type=int, default=0, help="set lora.MASKED_MAX_ROWS_X_ADAPTERS_BF16 (0: keep)"
    )
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache" / "loraserve" / "bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench.engine import build
    from service.engine import lora

    if args.masked_max:
        lora.MASKED_MAX_ROWS_X_ADAPTERS_BF16 = args.masked_max
    from service.engine import Engine, GenerationRequest, SamplingParams

    base, adapter_dir = build(args.root, args.adapters, args.rank, args.base)
    names = [f"bench-{i:02d}" for i in range(args.adapters)]
    B = args.batch
    rnd = random.Random(0)
    prompts = [[rnd.randrange(50000) for _ in range(rnd.randint(10, 60))] for _ in range(B)]
    kinds = {"base": [None] * B, "lora": [names[i % len(names)] for i in range(B)]}
    t_start = time.perf_counter()
    engines = {
        kind: Engine(
            base,
            adapter_dir,
            dtype=getattr(torch, args.dtype),
            max_batch_size=B,
            max_loaded_adapters=16,
            max_context=1024,
        )
        for kind in kinds
    }
    load_s = time.perf_counter() - t_start
    budget = args.steps * (2 * args.reps + 2) + 8
    for kind, engine in engines.items():
        for i, adapter in enumerate(kinds[kind]):
            params = SamplingParams(max_new_tokens=budget, temperature=0, ignore_eos=True)
            engine.add(GenerationRequest(f"{kind}{i}", prompts[i], adapter, params))
        for _ in range(4 * B):
            if len(engine.batch.rows) == B:
                break
            for ev in engine.step().events:
                if ev.finish_reason == "error":
                    raise RuntimeError(f"{ev.id}: {ev.error}")
        else:
            raise RuntimeError(f"{len(engine.batch.rows)} of {B} rows admitted")
        t0 = time.perf_counter()
        for _ in range(args.steps):  # warm-up: first decode steps (stacks, masks, kernels)
            engine.step()
        log_first = time.perf_counter() - t0
        print(json.dumps({"warmup": kind, "first_steps_s": round(log_first, 2)}), flush=True)

    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    order = list(kinds)
    for rep in range(args.reps):
        for kind in order if rep % 2 == 0 else order[::-1]:
            engine = engines[kind]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            runs[kind].append({"tok_per_cpu_s": B * args.steps / cpu, "tok_per_s": B * args.steps / wall})
    limit = dense_limit(engines["base"].runner, B, args.limit_calls)
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("tok_per_cpu_s", "tok_per_s")}
        for k, v in runs.items()
    }
    ratio = statistics.median(
        a["tok_per_cpu_s"] / b["tok_per_cpu_s"] for a, b in zip(runs["lora"], runs["base"], strict=True)
    )
    out = {
        "base": args.base,
        "batch": B,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "engines_load_s": round(load_s, 2),
        "runs": runs,
        "median": med,
        "lora_over_base_cpu": round(ratio, 3),
        "dense_limit": limit,
        "of_limit_cpu": {k: round(v["tok_per_cpu_s"] / limit["tokens_per_s"], 3) for k, v in med.items()},
        "of_alone_limit_cpu": {
            k: round(v["tok_per_cpu_s"] / limit["alone_tokens_per_s"], 3) for k, v in med.items()
        },
    }
    if args.profile:
        out["profile"] = {kind: _profile(engine, args.steps) for kind, engine in engines.items()}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

"""Engine micro-benchmark: the engine against batched ``generate`` in the same process and run.

    python -m bench engine [--batch 32] [--adapters 8] [--rank 32] [--new-tokens 64] [--reps 3]
                           [--compose-size 2] [--dtype float32] [--json out.json]

On a random-weights distilgpt2-shaped base (``--base smollm2-135m``: SmolLM2-135M-shaped; built once
under ~/.cache/loraserve/bench) with ``--adapters`` PEFT LoRA adapters (r=``--rank``, the family's
default targets: c_attn+c_proj on GPT-2, every linear layer on the Llama family) it times, interleaved and in
alternating order each repetition:

- ``generate_base``: ``GPT2LMHeadModel.generate`` on a left-padded batch, base only;
- ``generate_lora``: PEFT ``generate(adapter_names=...)``, same batch, rows round-robin over adapters;
- ``engine_base`` / ``engine_lora``: the same requests through ``Engine`` (all added at once);
- ``engine_stream``: ``4 x batch`` requests with max_new_tokens 16..256 kept ``batch`` in flight
  (a new one joins as soon as one leaves), against ``generate_stream``: the same requests as
  offline ``generate`` batches (sorted by length inside windows of 4 batches; only each request's
  own tokens count);
- ``engine_json``: ``engine_base`` with ``--json-rows`` of the rows (default a quarter) constrained
  to a JSON schema (an array of at least ``2 x new-tokens`` strings: it cannot be finished within
  the budget, so those rows run their whole budget too), with the grammar mask's time per step;
- ``engine_composed``: the ``engine_lora`` batch with each row on one of 8 distinct weighted
  compositions of ``--compose-size`` adapters (drawn from the same adapters) instead of one
  adapter; the target is ``engine_composed / engine_lora`` >= 0.9;
- ``engine_dora`` (run only when ``--only`` names it): the ``engine_lora`` batch on as many DoRA
  adapters (``use_dora``, the same rank and targets, magnitudes off their initial norms) instead; the
  target is ``engine_dora / engine_lora`` >= 0.9;
- adapter cold loads (read + parse + place, the cache's miss path).

EOS is ignored everywhere so every row produces exactly its token budget (constrained rows cannot
ignore EOS, but their grammar never allows it within the budget). Ratios are computed per
repetition (same run, same load) and their median is reported: the machine is shared and noisy.
This is a development tool (it needs PEFT), part of the benchmarks, not of the service.
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


def build(
    root: Path, n_adapters: int, rank: int, base_name: str = "distilgpt2", dora: bool = False
) -> tuple[Path, Path]:
    """The base and its adapters ``bench-NN`` (and DoRA adapters ``bench-dora-NN`` with ``dora``)."""
    from peft import LoraConfig, get_peft_model

    from loracore.families import family_of_folder
    from trainer.model import (
        DISTILGPT2_SHAPE,
        SMOLLM2_135M_SHAPE,
        load_base_model,
        make_random_base,
        make_random_llama_base,
    )

    base = root / f"{base_name}-random"
    if not (base / "config.json").exists():
        if base_name == "smollm2-135m":
            make_random_llama_base(base, **SMOLLM2_135M_SHAPE, seed=0)
        else:
            make_random_base(base, **DISTILGPT2_SHAPE, seed=0)
    family = family_of_folder(base)
    # the distilgpt2 adapters keep their folder name; others get their own
    adapters = root / (f"adapters-r{rank}" if base_name == "distilgpt2" else f"adapters-{base_name}-r{rank}")
    for i, use_dora in [(i, False) for i in range(n_adapters)] + [
        (i, True) for i in range(n_adapters * dora)
    ]:
        out = adapters / (f"bench-dora-{i:02d}" if use_dora else f"bench-{i:02d}")
        if (out / "adapter_model.safetensors").exists():
            continue
        torch.manual_seed(1000 + i)
        model = load_base_model(base)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(family.default_targets),
            fan_in_fan_out=family.conv1d,
            init_lora_weights="gaussian",
            use_dora=use_dora,
        )
        pm = get_peft_model(model, cfg)
        with torch.no_grad():  # non-zero B so the adapters change the output; DoRA's magnitudes moved
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.05 * torch.randn_like(p))
        pm.save_pretrained(out)
    return base, adapters


def wait_idle(max_wait: float = 20.0, threshold: float = 1.0) -> float:
    """Wait (bounded) for the 1-minute load average to drop; returns the load average seen."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < max_wait:
        time.sleep(2)
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument(
        "--json-rows", type=int, default=-1, help="constrained rows of engine_json (-1: batch / 4)"
    )
    ap.add_argument(
        "--compose-size", type=int, default=2, help="adapters per composition in engine_composed (1..8)"
    )
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=20.0,
        help="most seconds to wait for a calm machine before each run",
    )
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated method names to run (default: all)")
    ap.add_argument(
        "--stream-requests", type=int, default=0, help="requests in the stream run (0: 4 x batch)"
    )
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache" / "loraserve" / "bench")
    ap.add_argument(
        "--base",
        default="distilgpt2",
        choices=["distilgpt2", "smollm2-135m"],
        help="the random-weight base's architecture (adapters on the family's default targets)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel

    from service import structured
    from service.engine import AdapterWeight, Engine, GenerationRequest, SamplingParams
    from trainer.model import load_base_model

    dtype = getattr(torch, args.dtype)
    only = set(args.only.split(",")) if args.only else set()
    base, adapter_dir = build(args.root, args.adapters, args.rank, args.base, dora="engine_dora" in only)
    names = [f"bench-{i:02d}" for i in range(args.adapters)]
    rnd = random.Random(0)
    B, N = args.batch, args.new_tokens
    n_stream = max(B, args.stream_requests or 4 * B)
    prompts = [[rnd.randrange(50000) for _ in range(rnd.randint(10, 60))] for _ in range(n_stream)]
    stream_new = [rnd.randint(16, 256) for _ in range(n_stream)]

    engine = Engine(
        base,
        adapter_dir,
        device=args.device,
        dtype=dtype,
        max_batch_size=B,
        max_loaded_adapters=max(16, 2 * args.adapters),
    )
    # the HF and PEFT references load only when a generate_* method runs (they take a while)
    with_generate = not only or any(m.startswith("generate") for m in only)
    hf = peft = None
    if with_generate:
        hf = load_base_model(base, dtype=dtype, device=args.device).eval()
        peft = PeftModel.from_pretrained(
            load_base_model(base, dtype=dtype, device=args.device),
            str(adapter_dir / names[0]),
            adapter_name=names[0],
        )
        for n in names[1:]:
            peft.load_adapter(str(adapter_dir / n), adapter_name=n)
        peft.eval()
    pad = engine.tokenizer.eos_token_id
    dev = torch.device(args.device)

    def gen_batch(model, rows: list[list[int]], adapters: list[str | None] | None, new: int) -> int:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        kw = {"adapter_names": [a or "__base__" for a in adapters]} if adapters else {}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
                **kw,
            )
        return (out.shape[1] - width) * len(rows)

    Composition = tuple[AdapterWeight, ...]

    def engine_run(
        rows: list[list[int]],
        adapters: list[str | Composition | None],
        news: list[int],
        in_flight: int,
        schemas: list[str | None] | None = None,
    ) -> int:
        queue = list(range(len(rows)))
        produced = 0
        live = 0
        while queue or engine.has_active():
            while queue and live < in_flight:
                i = queue.pop(0)
                schema = schemas[i] if schemas else None
                params = SamplingParams(
                    max_new_tokens=news[i], temperature=0, ignore_eos=schema is None, json_schema=schema
                )
                composed = isinstance(adapters[i], tuple)
                engine.add(
                    GenerationRequest(
                        f"q{i}",
                        rows[i],
                        None if composed else adapters[i],
                        params,
                        adapters=adapters[i] if composed else None,
                    )
                )
                live += 1
            for ev in engine.step().events:
                produced += ev.token_id is not None
                live -= ev.finished
        return produced

    batch_rows = prompts[:B]
    lora_adapters = [names[i % len(names)] for i in range(B)]
    stream_adapters = [names[i % len(names)] for i in range(len(prompts))]
    # 8 distinct compositions: composition k weighs adapters k, k+1, ... (mod the pool), rows round-robin
    size = max(1, min(args.compose_size, len(names)))
    compositions = [
        tuple(AdapterWeight(names[(k + j) % len(names)], round(0.9 - 0.3 * j, 2)) for j in range(size))
        for k in range(8)
    ]
    composed_rows = [compositions[i % len(compositions)] for i in range(B)]
    dora_adapters = [f"bench-dora-{i % len(names):02d}" for i in range(B)]

    def gen_stream() -> int:
        order = sorted(range(len(prompts)), key=lambda i: (i // (4 * B), stream_new[i]))
        produced = 0
        for s in range(0, len(order), B):
            idx = order[s : s + B]
            gen_batch(
                peft,
                [prompts[i] for i in idx],
                [stream_adapters[i] for i in idx],
                max(stream_new[i] for i in idx),
            )
            produced += sum(stream_new[i] for i in idx)  # only each request's own tokens count
        return produced

    n_json = B // 4 if args.json_rows < 0 else min(args.json_rows, B)
    long_array = {"type": "array", "items": {"type": "string"}, "minItems": 2 * N}
    json_text = structured.check(long_array)
    json_rows = set(range(0, B, max(1, B // n_json))[:n_json]) if n_json else set()  # spread out
    json_schemas = [json_text if i in json_rows else None for i in range(B)]
    mask_seconds: list[float] = []
    masks = engine.grammars.masks

    def timed_masks(constraints):
        t0 = time.perf_counter()
        out = masks(constraints)
        mask_seconds.append(time.perf_counter() - t0)
        return out

    engine.grammars.masks = timed_masks  # the benchmark's probe: the grammar part of each step

    methods = {
        "generate_base": lambda: gen_batch(hf, batch_rows, None, N),
        "generate_lora": lambda: gen_batch(peft, batch_rows, lora_adapters, N),
        "engine_base": lambda: engine_run(batch_rows, [None] * B, [N] * B, B),
        "engine_lora": lambda: engine_run(batch_rows, lora_adapters, [N] * B, B),
        "engine_json": lambda: engine_run(batch_rows, [None] * B, [N] * B, B, json_schemas),
        "engine_composed": lambda: engine_run(batch_rows, composed_rows, [N] * B, B),
        "engine_dora": lambda: engine_run(batch_rows, dora_adapters, [N] * B, B),
    }
    if not args.skip_stream:
        methods["engine_stream"] = lambda: engine_run(prompts, stream_adapters, stream_new, B)
        methods["generate_stream"] = gen_stream
    if only:
        methods = {k: v for k, v in methods.items() if k in only}
    else:
        del methods["engine_dora"]  # its adapters are built on request only
    # warm-up (untimed): first calls allocate caches and load adapters
    if with_generate:
        gen_batch(peft, batch_rows[:2], lora_adapters[:2], 4)
    engine_run(batch_rows[:2], lora_adapters[:2], [4, 4], 2)
    engine_run(batch_rows, lora_adapters, [2] * B, B)
    engine_run(batch_rows, [None] * B, [2] * B, B, json_schemas)  # compiles the schema
    mask_seconds.clear()
    if "engine_composed" in methods:
        engine_run(batch_rows, composed_rows, [2] * B, B)
    if "engine_dora" in methods:
        engine_run(batch_rows, dora_adapters, [2] * B, B)

    runs: list[dict[str, float]] = []
    cpu_runs: list[dict[str, float]] = []  # tokens per CPU-second: steadier than wall time on a busy box
    loads: list[float] = []
    order = list(methods)
    for rep in range(args.reps):
        tps, cps = {}, {}
        for name in order if rep % 2 == 0 else reversed(order):
            loads.append(wait_idle(args.idle_wait))
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = methods[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tps[name] = tokens / wall
            cps[name] = tokens / cpu
            print(f"rep {rep} {name:16s} {tps[name]:8.1f} tok/s wall {cps[name]:8.1f} tok/cpu-s", flush=True)
        runs.append(tps)
        cpu_runs.append(cps)

    ratio_defs = {
        "engine_lora / engine_base": ("engine_lora", "engine_base"),
        "engine_json / engine_base": ("engine_json", "engine_base"),
        "engine_composed / engine_lora": ("engine_composed", "engine_lora"),
        "engine_dora / engine_lora": ("engine_dora", "engine_lora"),
        "engine_lora / generate_lora": ("engine_lora", "generate_lora"),
        "engine_base / generate_base": ("engine_base", "generate_base"),
        "generate_lora / generate_base": ("generate_lora", "generate_base"),
        "engine_stream / generate_stream": ("engine_stream", "generate_stream"),
    }
    ratios = {
        k: round(statistics.median(r[a] / r[b] for r in runs), 3)
        for k, (a, b) in ratio_defs.items()
        if a in runs[0] and b in runs[0]
    }
    medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    cpu_ratios = {
        k: round(statistics.median(r[a] / r[b] for r in cpu_runs), 3)
        for k, (a, b) in ratio_defs.items()
        if a in cpu_runs[0] and b in cpu_runs[0]
    }
    cpu_medians = {k: round(statistics.median(r[k] for r in cpu_runs), 1) for k in cpu_runs[0]}
    # Contention only ever slows a run down, so the best repetition of each method is the closest
    # to its speed on an idle machine; ratios of bests complement the same-repetition medians.
    best = {k: round(max(r[k] for r in runs), 1) for k in runs[0]}
    best_ratios = {
        k: round(best[a] / best[b], 3) for k, (a, b) in ratio_defs.items() if a in best and b in best
    }

    # adapter cold loads: the cache's miss path (read both files, parse, transpose, scale, place)
    from service.engine.lora import parse_adapter, read_adapter_files

    loads_ms = []
    for i in range(60):
        t0 = time.perf_counter()
        cfg, w, _ = read_adapter_files(adapter_dir / names[i % len(names)])
        parse_adapter(cfg, w, engine.layout, dtype=engine.dtype, device=engine.device)
        loads_ms.append((time.perf_counter() - t0) * 1e3)
    loads_ms.sort()
    # the sampler's side of the mask: unpack and apply 8 rows' bitmasks to a [batch, vocab] logits
    from service.engine.sampling import apply_token_bitmask

    logits = torch.randn(B, engine.runner.vocab_size, device=engine.device)
    rows = [i for i, s in enumerate(json_schemas) if s is not None]
    apply_ms = []
    if rows:
        probes = [engine.grammars.start(json_text) for _ in rows]  # one matcher per row, as in a batch
        bits = masks(probes)
        for _ in range(50):
            t0 = time.perf_counter()
            apply_token_bitmask(logits, rows, bits)
            apply_ms.append((time.perf_counter() - t0) * 1e3)
    json_steps = {
        "constrained_rows": len(rows),
        "grammar_mask_ms_per_step_median": round(statistics.median(mask_seconds) * 1e3, 3)
        if mask_seconds
        else None,
        "grammar_mask_ms_per_step_p99": round(
            sorted(mask_seconds)[int(len(mask_seconds) * 0.99) - 1] * 1e3, 3
        )
        if mask_seconds
        else None,
        "apply_mask_ms_median": round(statistics.median(apply_ms), 3) if apply_ms else None,
    }
    result = {
        "json_rows": json_steps,
        "config": {
            "batch": B,
            "adapters": args.adapters,
            "rank": args.rank,
            "new_tokens": N,
            "compose_size": size,
            "reps": args.reps,
            "dtype": args.dtype,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "load_avg_before_runs": [round(x, 2) for x in loads],
        },
        "tok_per_s_median": medians,
        "ratios_median_of_same_rep": ratios,
        "tok_per_s_best": best,
        "ratios_of_best": best_ratios,
        "tok_per_cpu_s_median": cpu_medians,
        "cpu_ratios_median_of_same_rep": cpu_ratios,
        "adapter_cold_load_ms": {
            "p50": round(loads_ms[len(loads_ms) // 2], 2),
            "p99": round(loads_ms[int(len(loads_ms) * 0.99) - 1], 2),
            "max": round(loads_ms[-1], 2),
        },
        "runs": runs,
        "cpu_runs": cpu_runs,
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "tok_per_s_median",
                    "ratios_median_of_same_rep",
                    "tok_per_s_best",
                    "ratios_of_best",
                    "tok_per_cpu_s_median",
                    "cpu_ratios_median_of_same_rep",
                    "adapter_cold_load_ms",
                    "json_rows",
                )
            },
            indent=2,
        )
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

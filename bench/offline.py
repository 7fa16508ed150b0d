"""The offline ceilings: the same requests as direct batched generation in one process, no HTTP.

Two ways. ``engine``: this project's engine (``service.engine.Engine``) driven in-process with all
requests queued up front and ``batch_size`` rows running: the server minus HTTP, processes and
queues, so the server's ratio to it is what serving costs. ``generate`` (the default):
PEFT mixed-adapter batches (``adapter_names=[...]``, ``__base__`` for the base model), greedy,
left padding. An offline job knows all its requests up front, so requests are taken in
windows of 4 batches and sorted by ``max_new_tokens`` inside each window: batch-mates then
need similar lengths and little compute is spent on rows that are already done. Only each
request's own tokens (up to its ``max_new_tokens`` or EOS) count as generated.

Runs as a child process (``python -m bench.offline IN.json OUT.json``) so the load-generating
process never holds a model or competes for the cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import write_json
from bench.workload import Request


def run_offline(
    model_dir: Path,
    adapter_dir: Path,
    requests: list[Request],
    *,
    batch_size: int,
    device: str = "cpu",
    dtype: str = "float32",
    time_limit_s: float | None = None,
) -> dict:
    import torch
    from peft import PeftModel

    from loracore.families import served_context
    from loracore.template import DEFAULT_TEMPLATE
    from trainer.model import load_base_model, load_tokenizer

    tok = load_tokenizer(model_dir, padding_side="left")
    base = load_base_model(model_dir, dtype=getattr(torch, dtype), device=device)
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    model = base
    if names:
        model = PeftModel.from_pretrained(base, str(adapter_dir / names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(adapter_dir / n), adapter_name=n)
    model.eval()
    context = served_context(base.config.to_dict())  # what the server serves of this base

    def generate(batch: list[Request]) -> list[int]:
        enc = tok(
            [DEFAULT_TEMPLATE.render_prompt(r.prompt) for r in batch], return_tensors="pt", padding=True
        )
        enc = enc.to(device)
        room = context - enc["input_ids"].shape[1]  # never run past the context
        kwargs = dict(
            max_new_tokens=min(room, max(r.max_new_tokens for r in batch)),
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        if names:
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in batch]
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        counts = []
        for row, r in zip(out[:, enc["input_ids"].shape[1] :].tolist(), batch, strict=True):
            row = row[: r.max_new_tokens]
            counts.append(row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row))
        return counts

    generate(requests[: min(len(requests), 2)] if len(requests) > 1 else requests)  # warm-up, untimed

    window = 4 * batch_size
    per_request: dict[int, int] = {}
    batches = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for w in range(0, len(requests), window):
        chunk = sorted(requests[w : w + window], key=lambda r: r.max_new_tokens)
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            for r, n in zip(batch, generate(batch), strict=True):
                per_request[r.idx] = n
            batches += 1
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(per_request.values())
    return {
        "batch_size": batch_size,
        "requests_done": len(per_request),
        "requests_given": len(requests),
        "batches": batches,
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(per_request) / wall if wall > 0 else None,
        "cpu_s": cpu,  # this process's CPU seconds (every thread) over the same span
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "per_request_tokens": per_request,
        "device": device,
        "dtype": dtype,
        "method": "generate",
    }


def run_offline_engine(
    model_dir: Path,
    adapter_dir: Path,
    requests: list[Request],
    *,
    batch_size: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    import torch

    from loracore.template import DEFAULT_TEMPLATE
    from service.engine import Engine, GenerationRequest, SamplingParams

    names = {r.adapter for r in requests if r.adapter is not None}
    engine = Engine(
        model_dir,
        adapter_dir,
        device=device,
        dtype=getattr(torch, dtype),
        max_batch_size=batch_size,
        max_loaded_adapters=max(16, len(names)),
    )

    def run(batch: list[Request]) -> dict[int, int]:
        for r in batch:
            ids = engine.tokenizer.encode(DEFAULT_TEMPLATE.render_prompt(r.prompt))
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0)
            engine.add(GenerationRequest(str(r.idx), ids, r.adapter, params))
        done: dict[int, int] = {}
        while engine.has_active():
            for ev in engine.step().events:
                if ev.finished:
                    if ev.finish_reason == "error":
                        raise RuntimeError(f"request {ev.id}: {ev.error}")
                    # as the generate ceiling counts: the tokens before EOS
                    done[int(ev.id)] = ev.completion_tokens - (ev.finish_reason == "eos")
        return done

    run(requests[:2])  # warm-up (loads two adapters), untimed
    t0, cpu0 = time.perf_counter(), time.process_time()
    per_request = run(requests)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(per_request.values())
    return {
        "method": "engine",
        "batch_size": batch_size,
        "requests_done": len(per_request),
        "requests_given": len(requests),
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(per_request) / wall if wall > 0 else None,
        "cpu_s": cpu,  # this process's CPU seconds (every thread) over the same span
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "per_request_tokens": per_request,
        "device": device,
        "dtype": dtype,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "spec",
        type=Path,
        help="JSON: model, adapter_dir, requests, batch_size, device, dtype, time_limit_s, method",
    )
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    spec = json.loads(a.spec.read_text())
    if spec.get("method") == "engine":
        result = run_offline_engine(
            Path(spec["model"]),
            Path(spec["adapter_dir"]),
            [Request(**r) for r in spec["requests"]],
            batch_size=spec["batch_size"],
            device=spec.get("device", "cpu"),
            dtype=spec.get("dtype", "float32"),
        )
        write_json(a.out, result)
        return
    result = run_offline(
        Path(spec["model"]),
        Path(spec["adapter_dir"]),
        [Request(**r) for r in spec["requests"]],
        batch_size=spec["batch_size"],
        device=spec.get("device", "cpu"),
        dtype=spec.get("dtype", "float32"),
        time_limit_s=spec.get("time_limit_s"),
    )
    write_json(a.out, result)


if __name__ == "__main__":
    main()

"""The prefix cache on vs off: clients that share a long system prompt, TTFT and tokens/s in one run.

Two servers of the same base and adapters, ``--prefix-cache on`` and ``off``, run side by side
(started once, idle while the other is measured) and are measured in alternating phases (on, off, then
off, on, ...), so drift of a shared machine hits both alike. Every request is ``system prompt +
question`` on one of ``adapters`` adapters (round-robin), streamed, greedy: the system prompt is
``system_tokens`` GPT-2 tokens, the same for every request, so each adapter's prefix is prefilled once
and then (cache on) reused; the questions and budgets are ``bench.workload``'s. A warm-up (untimed)
loads every adapter on both servers, and fills the cache of the one with it on: the steady state of a
server whose system prompt is in use.

Headline: TTFT p50 and tokens/s, on over off (median over rounds), and the cache's hit tokens over its
queried tokens in the on phases (``loraserve_prefix_cache_*``). Only same-run ratios mean anything.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import promstats, servers
from bench.common import REPO, ForeignLoad, log, machine_description, ratio
from bench.loadgen import run_load
from bench.workload import Request, make_requests
from testing.weights import ensure_base, make_adapters

MODES = ("on", "off")
WORDS = (  # what the system prompt is made of
    "you are a helpful careful assistant answer briefly and plainly cite facts when you can say so "
    "when you do not know never invent names numbers or sources keep the tone friendly and exact"
)


@dataclass
class PrefixCacheConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    base_shape: dict = field(default_factory=dict)  # {} = distilgpt2's shape
    rank: int = 16
    clients: int = 32
    adapters: int = 8
    system_tokens: int = 512
    duration_s: float = 25.0  # per phase
    max_new_tokens: int = 32  # upper end of the 8..N mix: short answers, where TTFT weighs most
    rounds: int = 2
    seed: int = 0


def system_prompt(base: Path, tokens: int, seed: int) -> str:
    """English-like text of exactly ``tokens`` GPT-2 tokens (checked by encoding it again)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    words = WORDS.split()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < tokens + 16:
        ids += tok.encode(" " + " ".join(rng.choice(words) for _ in range(20)) + ".")
    text = tok.decode(ids[:tokens])
    assert len(tok.encode(text)) == tokens, "the system prompt does not re-encode to its length"
    return text


def run(cfg: PrefixCacheConfig) -> dict:
    t_start = time.time()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    adapter_dir = cfg.workdir / f"adapters-prefix-cache-r{cfg.rank}"
    names = [f"sys-{i:02d}" for i in range(cfg.adapters)]
    make_adapters(base, adapter_dir, names, r=cfg.rank, seed=cfg.seed)
    system = system_prompt(base, cfg.system_tokens, cfg.seed)
    plain = make_requests(100_000, list(names), min_new=8, max_new=cfg.max_new_tokens, seed=cfg.seed)
    reqs = [replace(r, prompt=f"{system}\n\nQuestion: {r.prompt}") for r in plain]
    machine = machine_description()
    uptime = [_uptime()]
    rounds: list[dict] = []
    with ExitStack() as stack:
        srv = {}
        for mode in MODES:
            data_dir = cfg.workdir / f"prefix-cache-{mode}-data"
            shutil.rmtree(data_dir, ignore_errors=True)
            srv[mode] = stack.enter_context(
                servers.loraserve(
                    model=base,
                    adapter_dir=adapter_dir,
                    data_dir=data_dir,
                    device=cfg.device,
                    max_batch_size=cfg.clients,
                    max_loaded_adapters=max(16, cfg.adapters),
                    log_path=cfg.workdir / f"server-prefix-cache-{mode}.log",
                    extra_env={"LORASERVE_PREFIX_CACHE": mode},
                )
            )
            log("server_ready", mode=mode, seconds=round(srv[mode].ready_s, 1))
        for mode in MODES:  # warm-up (untimed): every adapter loaded; the on server's cache filled
            warm = [replace(r, max_new_tokens=4) for r in reqs[: cfg.adapters]]
            asyncio.run(
                run_load(srv[mode].base_url, warm, concurrency=cfg.adapters, duration_s=300, label="warm")
            )
        for rnd in range(cfg.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            rec: dict = {"round": rnd, "order": list(order)}
            for mode in order:
                offset = 1000 * (rnd + 1)  # each round its own questions
                rec[mode] = _phase(cfg, srv[mode].base_url, reqs[offset:], f"{mode}-r{rnd}")
            rec["ratios"] = _ratios(rec["on"], rec["off"])
            log("round", round=rnd, ratios=rec["ratios"])
            rounds.append(rec)
    ratios = {}
    for key in rounds[0]["ratios"]:
        values = [r["ratios"][key] for r in rounds if r["ratios"][key] is not None]
        ratios[key] = statistics.median(values) if values else None
    uptime.append(_uptime())
    return {
        "benchmark": "prefix-cache",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine,
        "uptime": uptime,  # the machine's load average before and after (it is shared)
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "rounds": rounds,
        "ratios": ratios,
    }


def _ratios(on: dict, off: dict) -> dict:
    ttft = {m: (s["ttft_s"] or {}).get("p50") for m, s in (("on", on), ("off", off))}
    return {
        "ttft_p50_on_over_off": ratio(ttft["on"], ttft["off"]),
        "tokens_per_s_on_over_off": ratio(on["tokens_per_s"], off["tokens_per_s"]),
    }


def _phase(cfg: PrefixCacheConfig, url: str, reqs: list[Request], label: str) -> dict:
    before = promstats.scrape(url)
    with ForeignLoad() as fl:
        res = asyncio.run(
            run_load(url, reqs, concurrency=cfg.clients, duration_s=cfg.duration_s, drain_s=300, label=label)
        )
    after = promstats.scrape(url)
    s = res.summary()
    s["foreign_cores"] = round(fl.cores, 2)
    for key in ("queries", "hits"):
        name = f"loraserve_prefix_cache_{key}_total"
        s[f"prefix_{key}_tokens"] = promstats.total(after, name) - promstats.total(before, name)
    log("load", label=label, ok=s["requests_ok"], failed=s["requests_failed"], tokens_per_s=s["tokens_per_s"],
        ttft_p50=(s["ttft_s"] or {}).get("p50"), hits=s["prefix_hits_tokens"],
        queries=s["prefix_queries_tokens"], foreign=s["foreign_cores"])  # fmt: skip
    return s


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def markdown(res: dict) -> str:
    from bench.report import _fmt

    cfg, r = res["config"], res["ratios"]
    lines = [
        f"## Prefix cache on vs off ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"Device {cfg['device']}, {cfg['clients']} clients, a {cfg['system_tokens']}-token system prompt "
        f"shared across {cfg['adapters']} adapters (r={cfg['rank']}), "
        f"max_new_tokens 8..{cfg['max_new_tokens']}, {cfg['duration_s']:.0f} s per phase, "
        f"{cfg['rounds']} rounds. Command: `python -m bench prefix-cache`.",
        "",
        f"TTFT p50 on / off: {_fmt(r['ttft_p50_on_over_off'])}; tokens/s on / off: "
        f"{_fmt(r['tokens_per_s_on_over_off'])} (medians over rounds).",
        "",
        "| round | cache | requests | TTFT p50 s | TTFT p99 s | tokens/s | hit / queried tokens "
        "| other CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in res["rounds"]:
        for mode in rec["order"]:
            s = rec[mode]
            ttft = s["ttft_s"] or {}
            hit = f"{s['prefix_hits_tokens']:.0f} / {s['prefix_queries_tokens']:.0f}"
            lines.append(f"| {rec['round']} | {mode} | {s['requests_ok']} | {_fmt(ttft.get('p50'))} | "
                         f"{_fmt(ttft.get('p99'))} | {_fmt(s['tokens_per_s'], 1)} | {hit} | "
                         f"{_fmt(s['foreign_cores'])} |")  # fmt: skip
    if res.get("uptime"):
        lines += ["", f"`uptime` before the run: `{res['uptime'][0]}`; after: `{res['uptime'][1]}`."]
    return "\n".join(lines) + "\n"

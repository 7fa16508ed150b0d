"""Serving composed, constrained and DoRA traffic: /generate tokens/s against plain adapters, in one run.

One server, one sitting, kinds of closed-loop traffic over the same prompts and token budgets,
interleaved over rounds (the order alternates, so drift hits all of them alike):
  - **adapters**: every request on one of the ``adapters`` plain adapters (round-robin);
  - **composed**: every request on one of 8 distinct weighted compositions of those adapters
    (composition k weighs adapters k and k+1 by 0.6 / 0.4), ``adapters`` [{name, weight}, ...];
  - **constrained**: the adapters traffic with every ``json_every``-th request carrying a JSON schema
    (``json_schema``), so constrained and free rows share the batch;
  - **dora**: the adapters traffic on as many DoRA adapters (``use_dora``) of the same rank and targets.
``python -m bench serve-mix`` runs the first three, ``python -m bench serve-dora`` adapters and dora.
The headline ratios are tokens/s of each kind over adapters traffic (median over rounds); the composed
and the DoRA targets are >= 0.9. Only same-run ratios mean anything.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import servers
from bench.common import REPO, ForeignLoad, log, machine_description, ratio, target_rows, wait_for_quiet_cpu
from bench.loadgen import LoadRun, run_load
from bench.workload import Request, make_requests
from testing.weights import ensure_base, make_adapters

TARGETS = {
    "composed_vs_adapters_tokens": (
        ">=",
        0.9,
        "{c}-client /generate on 8 distinct weighted compositions vs on 8 plain adapters, tokens/s",
    ),
    "dora_vs_adapters_tokens": (
        ">=",
        0.9,
        "{c}-client /generate on DoRA adapters vs on as many LoRA adapters of the same rank, tokens/s",
    ),
}
KINDS = ("adapters", "composed", "constrained")  # serve-mix
DORA_KINDS = ("adapters", "dora")  # serve-dora
COMPOSITIONS = 8
# A schema with room to write: the answer is a bounded string, so rows end with complete JSON or run
# their budget, as free rows do.
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 400},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


@dataclass
class ServeMixConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    base_shape: dict = field(default_factory=dict)  # {} = distilgpt2's shape
    rank: int = 32
    clients: int = 32
    adapters: int = 8
    duration_s: float = 30.0  # per phase
    max_new_tokens: int = 64  # upper end of the 16..N mix
    json_every: int = 4  # every n-th request of the constrained traffic carries the schema
    rounds: int = 2
    quiet_wait_s: float = 10.0
    threads: int | None = None
    seed: int = 0
    kinds: tuple[str, ...] = KINDS  # "adapters" first: every other kind's ratio is over it


def traffic(cfg: ServeMixConfig, names: list[str]) -> dict[str, list[Request]]:
    """The request lists: the same prompts and budgets, different adapters / extras."""
    plain = make_requests(100_000, list(names), max_new=cfg.max_new_tokens, seed=cfg.seed)
    n = len(names)
    dora = {name: dora_name(name) for name in names}
    compositions = [
        [{"name": names[k % n], "weight": 0.6}, {"name": names[(k + 1) % n], "weight": 0.4}]
        for k in range(COMPOSITIONS)
    ]
    composed = [
        replace(r, adapter=None, extra={"adapters": compositions[r.idx % COMPOSITIONS]}) for r in plain
    ]
    constrained = [
        replace(r, extra={"json_schema": SCHEMA}) if r.idx % cfg.json_every == 0 else r for r in plain
    ]
    on_dora = [replace(r, adapter=dora[r.adapter]) for r in plain]
    lists = {"adapters": plain, "composed": composed, "constrained": constrained, "dora": on_dora}
    return {kind: lists[kind] for kind in cfg.kinds}


def dora_name(name: str) -> str:
    return f"dora-{name}"


def run(cfg: ServeMixConfig) -> dict:
    t_start = time.time()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    adapter_dir = cfg.workdir / f"adapters-serve-mix-r{cfg.rank}"
    names = [f"mix-{i:02d}" for i in range(cfg.adapters)]
    make_adapters(base, adapter_dir, names, r=cfg.rank, seed=cfg.seed)
    if "dora" in cfg.kinds:
        make_adapters(base, adapter_dir, [dora_name(n) for n in names], r=cfg.rank, seed=cfg.seed, dora=True)
    data_dir = cfg.workdir / "serve-mix-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    machine = machine_description()
    uptime = [_uptime()]
    reqs = traffic(cfg, names)
    rounds: list[dict] = []
    with servers.loraserve(
        model=base,
        adapter_dir=adapter_dir,
        data_dir=data_dir,
        device=cfg.device,
        max_batch_size=cfg.clients,
        max_loaded_adapters=max(16, cfg.adapters * (2 if "dora" in cfg.kinds else 1)),
        log_path=cfg.workdir / "server-serve-mix.log",
    ) as srv:
        url = srv.base_url
        log("server_ready", seconds=round(srv.ready_s, 1))
        for kind in cfg.kinds:  # warm-up (untimed): loads every adapter, compiles the schema
            warm = reqs[kind][: cfg.clients]
            asyncio.run(run_load(url, [replace(r, max_new_tokens=8) for r in warm],
                                 concurrency=cfg.clients, duration_s=120, label="warm"))  # fmt: skip
        for rnd in range(cfg.rounds):
            order = cfg.kinds if rnd % 2 == 0 else cfg.kinds[::-1]
            rec = {"round": rnd, "order": list(order)}
            for kind in order:
                offset = 1000 * (rnd + 1)  # each round its own requests
                rec[kind] = _phase(cfg, url, reqs[kind][offset:], f"{kind}-r{rnd}")
            rec["ratios"] = {
                f"{kind}_vs_adapters_tokens": ratio(
                    rec[kind]["tokens_per_s"], rec["adapters"]["tokens_per_s"]
                )
                for kind in cfg.kinds
                if kind != "adapters"
            }
            log("round", round=rnd, ratios=rec["ratios"])
            rounds.append(rec)
    ratios = {}
    for key in rounds[0]["ratios"]:
        values = [r["ratios"][key] for r in rounds if r["ratios"][key] is not None]
        ratios[key] = statistics.median(values) if values else None
    targets = {k: v for k, v in TARGETS.items() if k in ratios}
    uptime.append(_uptime())
    return {
        "benchmark": "serve-dora" if "dora" in cfg.kinds else "serve-mix",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine,
        "uptime": uptime,  # the machine's load average before and after (it is shared)
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "rounds": rounds,
        "ratios": ratios,
        "targets": target_rows(targets, ratios, cfg.clients),
    }


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _phase(cfg: ServeMixConfig, url: str, reqs: list[Request], label: str) -> dict:
    foreign_before = wait_for_quiet_cpu(cfg.quiet_wait_s)
    with ForeignLoad() as fl:
        res: LoadRun = asyncio.run(
            run_load(url, reqs, concurrency=cfg.clients, duration_s=cfg.duration_s, drain_s=300, label=label)
        )
    s = res.summary()
    s["foreign_cores"] = round(fl.cores, 2)
    log("load", label=label, ok=s["requests_ok"], failed=s["requests_failed"], tokens_per_s=s["tokens_per_s"],
        foreign=s["foreign_cores"], foreign_before=round(foreign_before, 2))  # fmt: skip
    return s


def _rounds_md(rounds: list[dict]) -> list[str]:
    from bench.report import _fmt

    lines = [
        "| round | traffic | requests | failed | p50 s | p99 s | tokens/s | other CPU load (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in rounds:
        for kind in rec["order"]:
            s = rec[kind]
            lat = s["latency_s"]
            lines.append(f"| {rec['round']} | {kind} | {s['requests_ok']} | {s['requests_failed']} | "
                         f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {_fmt(s['tokens_per_s'], 1)} | "
                         f"{_fmt(s['foreign_cores'])} |")  # fmt: skip
    return lines


def markdown(res: dict) -> str:
    if res["benchmark"] == "serve-dora":
        return dora_markdown(res)
    from bench.report import _fmt, machine_md, targets_md

    cfg, r = res["config"], res["ratios"]
    lines = [
        f"## Composed and constrained traffic ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"Device {cfg['device']}, {cfg['clients']} clients, {cfg['adapters']} adapters (r={cfg['rank']}), "
        f"max_new_tokens 16..{cfg['max_new_tokens']}, {cfg['duration_s']:.0f} s per phase, "
        f"{cfg['rounds']} rounds; composed: {COMPOSITIONS} distinct 2-adapter compositions; constrained: "
        f"every {cfg['json_every']}th request with a JSON schema. Command: `python -m bench serve-mix`.",
        "",
        *targets_md(res["targets"]),
    ]
    lines += [
        "",
        f"Constrained traffic vs plain adapters, tokens/s: {_fmt(r['constrained_vs_adapters_tokens'])} "
        "(no target).",
        "",
        *_rounds_md(res["rounds"]),
    ]
    lines += ["", "<details><summary>machine</summary>", "", machine_md(res["machine"]), "", "</details>", ""]
    return "\n".join(lines)


def dora_markdown(res: dict) -> str:
    from bench.report import machine_md, targets_md

    cfg = res["config"]
    lines = [
        f"## DoRA adapters vs LoRA adapters ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"Device {cfg['device']}, {cfg['clients']} clients, {cfg['adapters']} DoRA adapters vs "
        f"{cfg['adapters']} LoRA adapters (r={cfg['rank']}, the same targets), "
        f"max_new_tokens 16..{cfg['max_new_tokens']}, "
        f"{cfg['duration_s']:.0f} s per phase, {cfg['rounds']} rounds, order alternating. "
        "Command: `python -m bench serve-dora`.",
        "",
        *targets_md(res["targets"]),
    ]
    lines += [
        "",
        *_rounds_md(res["rounds"]),
    ]
    if res.get("uptime"):
        lines += ["", f"`uptime` before the run: `{res['uptime'][0]}`; after: `{res['uptime'][1]}`."]
    lines += ["", "<details><summary>machine</summary>", "", machine_md(res["machine"]), "", "</details>", ""]
    return "\n".join(lines)

"""Serving first on a shared device: /generate latency with a training job running vs without, in one run.

One server (``python -m service``, role all: the job runner trains beside the generation worker), one
sitting, three phases on loopback:
  1. **serving alone**: N closed-loop clients for ``duration_s``; p50/p99 latency;
  2. **job alone**: one ``POST /train`` job with no traffic; its duration (``started_at`` → ``finished_at``);
  3. **serving with the job**: the same job again (another adapter name) and the same clients from the
     moment it is submitted until it ends (at least ``duration_s``); p99 latency and the job's duration.
The two targets, side by side from the same run: p99 (phase 3) / p99 (phase 1) ≤ 1.3, and the job's
duration in phase 3 / phase 2 ≤ 2.5. The yielding knobs (``LORASERVE_TRAIN_*``, docs/jobs.md) are the
server's defaults unless given.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from bench import servers
from bench.common import REPO, ForeignLoad, log, machine_description, ratio, target_rows, wait_for_quiet_cpu
from bench.loadgen import LoadRun, run_load
from bench.train_data import make_rows
from bench.workload import make_requests
from testing.weights import ensure_base, make_adapters

TARGETS = {
    "p99_with_job_vs_without": (
        "<=",
        1.3,
        "{c}-client /generate p99 latency with a training job running vs without",
    ),
    "job_seconds_with_traffic_vs_alone": (
        "<=",
        2.5,
        "the job's duration under that {c}-client load vs alone",
    ),
}


@dataclass
class ServeTrainConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    base_shape: dict = field(default_factory=dict)  # {} = distilgpt2's shape
    rank: int = 8
    clients: int = 32
    adapters: int = 4
    duration_s: float = 60.0  # phase 1, and the least of phase 3
    max_new_tokens: int = 64  # upper end of the 16..N mix
    job_steps: int = 8
    job_batch_size: int = 4
    job_rows: int = 64
    max_pause_s: float | None = None  # LORASERVE_TRAIN_MAX_PAUSE (None: the server's default)
    yield_rows: int | None = None  # LORASERVE_TRAIN_YIELD_ROWS (0: no yielding, for a contrast run)
    min_share: float | None = None  # LORASERVE_TRAIN_MIN_SHARE (0: pauses bounded by max_pause only)
    train_threads: int | None = None  # LORASERVE_TRAIN_THREADS
    job_timeout_s: float = 1800.0
    quiet_wait_s: float = 10.0
    threads: int | None = None
    seed: int = 0


def run(cfg: ServeTrainConfig) -> dict:
    t_start = time.time()
    load_start = os.getloadavg()  # the shared machine's load, beside the per-phase foreign CPU
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    adapter_dir = cfg.workdir / f"adapters-serve-train-r{cfg.rank}"
    names = [f"st-{i:02d}" for i in range(cfg.adapters)]
    make_adapters(base, adapter_dir, names, r=cfg.rank, seed=cfg.seed)
    data_dir = cfg.workdir / "serve-train-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    for leftover in ("job-alone", "job-with-traffic"):
        shutil.rmtree(adapter_dir / leftover, ignore_errors=True)
    machine = machine_description()
    reqs = make_requests(100_000, list(names) + [None], max_new=cfg.max_new_tokens, seed=cfg.seed)
    job_body = {
        "data": make_rows(cfg.job_rows, cfg.seed),
        "config": {
            "lora": {"r": cfg.rank, "lora_alpha": 2 * cfg.rank},
            "training": {
                "max_steps": cfg.job_steps,
                "per_device_train_batch_size": cfg.job_batch_size,
                "eval_fraction": 0,
                "save_steps": 0,
                "max_seq_length": 256,
                "seed": cfg.seed,
            },
        },
    }
    env = {}
    for var, value in (
        ("LORASERVE_TRAIN_MAX_PAUSE", cfg.max_pause_s),
        ("LORASERVE_TRAIN_YIELD_ROWS", cfg.yield_rows),
        ("LORASERVE_TRAIN_MIN_SHARE", cfg.min_share),
        ("LORASERVE_TRAIN_THREADS", cfg.train_threads),
    ):
        if value is not None:
            env[var] = value
    with servers.loraserve(
        model=base,
        adapter_dir=adapter_dir,
        data_dir=data_dir,
        device=cfg.device,
        max_batch_size=cfg.clients,
        max_loaded_adapters=max(16, cfg.adapters),
        log_path=cfg.workdir / "server-serve-train.log",
        extra_env=env,
    ) as srv:
        url = srv.base_url
        log("server_ready", seconds=round(srv.ready_s, 1))
        warm = make_requests(cfg.clients, list(names) + [None], max_new=16, seed=cfg.seed + 99)
        asyncio.run(run_load(url, warm, concurrency=cfg.clients, duration_s=120, label="warm"))

        alone = _phase(cfg, "serving-alone", lambda: _load(url, reqs, cfg, cfg.duration_s, None))
        job_alone = _job_alone(cfg, url, job_body)
        loaded, job_loaded = _with_job(cfg, url, reqs[50_000:], job_body)
        metrics = httpx.get(url + "/metrics", timeout=30).text

    s_alone, s_loaded = alone.summary(), loaded.summary()
    ratios = {
        "p99_with_job_vs_without": ratio(s_loaded["latency_s"]["p99"], s_alone["latency_s"]["p99"]),
        "p50_with_job_vs_without": ratio(s_loaded["latency_s"]["p50"], s_alone["latency_s"]["p50"]),
        "tokens_per_s_with_job_vs_without": ratio(s_loaded["tokens_per_s"], s_alone["tokens_per_s"]),
        "job_seconds_with_traffic_vs_alone": ratio(job_loaded["seconds"], job_alone["seconds"]),
    }
    return {
        "benchmark": "serve-train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine,
        "load_average": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "serving_alone": s_alone,
        "serving_with_job": s_loaded,
        "job_alone": job_alone,
        "job_with_traffic": job_loaded,
        "yield_seconds_total_metric": _metric(metrics, "loraserve_train_yield_seconds_total"),
        "ratios": ratios,
        "targets": target_rows(TARGETS, ratios, cfg.clients),
    }


def sweep_shares(cfg: ServeTrainConfig, shares: list[float]) -> dict:
    """The same run at each minimum training share (one fresh server each): where the two ratios land
    as the share trades the job's time against serving's tail."""
    t_start = time.time()
    runs = []
    for share in shares:
        log("share", min_share=share)
        runs.append(run(replace(cfg, min_share=share)))
    return {
        "benchmark": "serve-train-shares",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "shares": shares,
        "runs": runs,
    }


def _load(url: str, reqs, cfg: ServeTrainConfig, duration: float, stop: asyncio.Event | None):
    return run_load(
        url, reqs, concurrency=cfg.clients, duration_s=duration, drain_s=300, label="load", stop=stop
    )


def _phase(cfg: ServeTrainConfig, label: str, coro_fn) -> LoadRun:
    foreign_before = wait_for_quiet_cpu(cfg.quiet_wait_s)
    with ForeignLoad() as fl:
        res: LoadRun = asyncio.run(coro_fn())
    res.label, res.foreign_cores = label, round(fl.cores, 2)
    s = res.summary()
    log("load", label=label, ok=s["requests_ok"], p99=s["latency_s"]["p99"], foreign=res.foreign_cores,
        foreign_before=round(foreign_before, 2))  # fmt: skip
    return res


async def _submit(client: httpx.AsyncClient, adapter: str, body: dict) -> str:
    r = await client.post("/train", json={"adapter": adapter, **body})
    r.raise_for_status()
    return r.json()["job_id"]


async def _wait_done(client: httpx.AsyncClient, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = (await client.get(f"/train/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.5)


def _job_report(job: dict) -> dict:
    from datetime import datetime

    def ts(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None

    start, end = ts(job.get("started_at")), ts(job.get("finished_at"))
    prog = job.get("progress") or {}
    return {
        "job_id": job["job_id"],
        "status": job["status"],
        "error": job.get("error"),
        "steps": prog.get("step"),
        "seconds": None if start is None or end is None else round(end - start, 2),
        "yielded_seconds": prog.get("yielded_seconds"),
    }


def _job_alone(cfg: ServeTrainConfig, url: str, body: dict) -> dict:
    wait_for_quiet_cpu(cfg.quiet_wait_s)

    async def go() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            job_id = await _submit(client, "job-alone", body)
            return await _wait_done(client, job_id, cfg.job_timeout_s)

    with ForeignLoad() as fl:
        rep = _job_report(asyncio.run(go()))
    rep["foreign_cores"] = round(fl.cores, 2)
    log("job", label="job-alone", **rep)
    return rep


def _with_job(cfg: ServeTrainConfig, url: str, reqs, body: dict) -> tuple[LoadRun, dict]:
    """Clients run from the job's submission until it ends (and at least ``duration_s``)."""
    wait_for_quiet_cpu(cfg.quiet_wait_s)

    async def go() -> tuple[LoadRun, dict]:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(url, reqs, cfg, cfg.job_timeout_s, stop))
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            job_id = await _submit(client, "job-with-traffic", body)
            job = await _wait_done(client, job_id, cfg.job_timeout_s)
        await asyncio.sleep(max(0.0, cfg.duration_s - (time.monotonic() - t0)))
        stop.set()
        return await load, job

    with ForeignLoad() as fl:
        res, job = asyncio.run(go())
    res.label, res.foreign_cores = "serving-with-job", round(fl.cores, 2)
    rep = _job_report(job)
    rep["foreign_cores"] = res.foreign_cores
    s = res.summary()
    log("load", label=res.label, ok=s["requests_ok"], p99=s["latency_s"]["p99"], foreign=res.foreign_cores)
    log("job", label="job-with-traffic", **rep)
    return res, rep


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _loads(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def markdown(res: dict) -> str:
    from bench.report import _fmt, machine_md, targets_md

    cfg, r = res["config"], res["ratios"]
    a, w = res["serving_alone"], res["serving_with_job"]
    ja, jw = res["job_alone"], res["job_with_traffic"]
    lines = [
        f"## Serving with a training job ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"Device {cfg['device']}, {cfg['clients']} clients, {cfg['adapters']} adapters "
        f"(r={cfg['rank']}) and the base, max_new_tokens 16..{cfg['max_new_tokens']}; "
        f"job: {cfg['job_steps']} steps of batch "
        f"{cfg['job_batch_size']}; yielding knobs: max pause {cfg['max_pause_s'] or 'default'} s, "
        f"yield rows {cfg['yield_rows'] if cfg['yield_rows'] is not None else 'default'}, min training "
        f"share {cfg.get('min_share') if cfg.get('min_share') is not None else 'default'}, trainer threads "
        f"{cfg['train_threads'] or 'default'}. Command: `python -m bench serve-train`."
        + (
            f" Load average (1/5/15 min) {_loads(res['load_average']['start'])} at the start, "
            f"{_loads(res['load_average']['end'])} at the end."
            if res.get("load_average")
            else ""
        ),
        "",
        *targets_md(res["targets"]),
    ]
    lines += [
        "",
        "| phase | requests | p50 s | p99 s | tokens/s | other CPU load (cores) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in (("serving alone", a), ("serving with the job", w)):
        lat = s["latency_s"]
        lines.append(f"| {label} | {s['requests_ok']} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | "
                     f"{_fmt(s['tokens_per_s'], 1)} | {_fmt(s['foreign_cores'])} |")  # fmt: skip
    lines += [
        "",
        "| job | status | steps | seconds | yielded s | other CPU load (cores) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, j in (("alone", ja), ("with traffic", jw)):
        lines.append(f"| {label} | {j['status']} | {j['steps']} | {_fmt(j['seconds'], 1)} | "
                     f"{_fmt(j['yielded_seconds'], 1)} | {_fmt(j['foreign_cores'])} |")  # fmt: skip
    lines += [
        "",
        f"The job took {_fmt(r['job_seconds_with_traffic_vs_alone'])}× as long with traffic as alone; "
        f"p50 with the job {_fmt(r['p50_with_job_vs_without'])}× the p50 without, throughput "
        f"{_fmt(r['tokens_per_s_with_job_vs_without'])}×.",
        "",
        "<details><summary>machine</summary>",
        "",
        machine_md(res["machine"]),
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def shares_markdown(res: dict) -> str:
    from bench.report import _fmt

    cfg = res["runs"][0]["config"]
    lines = [
        f"## Serving with a training job, by minimum training share ({res['created']}, "
        f"{res['wall_s']:.0f} s)",
        "",
        f"{cfg['clients']} clients, {cfg['duration_s']:.0f} s of load per phase, job of {cfg['job_steps']} "
        f"steps of batch {cfg['job_batch_size']}; one fresh server per share. Command: `python -m bench "
        f"serve-train --min-share {' '.join(str(s) for s in res['shares'])}`.",
        "",
        "| min share | job with traffic / alone | p99 with job / without | p50 with / without | "
        "tokens/s with / without | yielded s | load average at start |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for share, run_ in zip(res["shares"], res["runs"], strict=True):
        r = run_["ratios"]
        lines.append(
            f"| {share} | {_fmt(r['job_seconds_with_traffic_vs_alone'])} | "
            f"{_fmt(r['p99_with_job_vs_without'])} | {_fmt(r['p50_with_job_vs_without'])} | "
            f"{_fmt(r['tokens_per_s_with_job_vs_without'])} | "
            f"{_fmt(run_['job_with_traffic']['yielded_seconds'], 1)} | "
            f"{_loads(run_['load_average']['start'])} |"
        )
    return "\n".join([*lines, "", "![serve-train by share](serve_train_shares.png)", ""])


def plot_shares(res: dict, path: Path) -> None:
    """Each share's (job ratio, p99 ratio), the target box, and the time-sharing model's curve."""
    from bench.report import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    job_max, p99_max = TARGETS["job_seconds_with_traffic_vs_alone"][1], TARGETS["p99_with_job_vs_without"][1]
    ax.fill_between([1, job_max], 1, p99_max, color="tab:green", alpha=0.15, label="both targets met")
    xs = [1.05 + i * 0.05 for i in range(120)]
    # the model: the job gets a share s = 1/x of the saturated CPU, serving keeps 1 - s: p99 x 1/(1 - s)
    ax.plot(xs, [x / (x - 1) for x in xs], ":", color="grey", label="model: job 1/s, serving 1/(1 − s)")
    pts = [
        (share, r["ratios"]["job_seconds_with_traffic_vs_alone"], r["ratios"]["p99_with_job_vs_without"])
        for share, r in zip(res["shares"], res["runs"], strict=True)
    ]
    pts = [(s, x, y) for s, x, y in pts if x is not None and y is not None]
    ax.plot([x for _, x, _ in pts], [y for _, _, y in pts], "o-", label="measured, by minimum share")
    for share, x, y in pts:
        ax.annotate(f"{share}", (x, y), textcoords="offset points", xytext=(6, 4))
    top = max([y for _, _, y in pts] + [2.0]) * 1.1
    right = max([x for _, x, _ in pts] + [job_max]) * 1.1
    ax.set_xlim(1, right)
    ax.set_ylim(0.9, top)
    ax.set_xlabel("job duration with traffic / alone")
    ax.set_ylabel("/generate p99 with the job / without")
    ax.set_title("Serving with a training job: the minimum training share's trade-off")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

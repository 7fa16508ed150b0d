"""The serving benchmark: this server, the naive FastAPI + PEFT baseline and the offline ceiling.

One command runs every scenario of the issue in one sitting on one machine, with the methods
interleaved over rounds (server → naive → offline, then offline → naive → server), so slow
drift of a shared machine hits all of them alike. Only same-run ratios mean anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import promstats, servers
from bench.common import (
    REPO,
    ForeignLoad,
    RssSampler,
    log,
    machine_description,
    ratio,
    summarize,
    tree_cpu_seconds,
    wait_for_quiet_cpu,
    write_json,
)
from bench.loadgen import LoadRun, probe_streaming, run_load, send_one
from bench.workload import Request, make_requests, short_and_long
from testing.weights import ensure_base, make_adapters
from trainer.hardware import default_dtype

TARGETS = {
    "server_vs_naive_tokens": (
        ">=",
        6.0,
        "serving at {c} clients / {k} adapters vs naive FastAPI + PEFT, tokens/s",
    ),
    "server_vs_offline_tokens": (
        ">=",
        0.80,
        "serving at {c} clients / {k} adapters vs offline ceiling (this engine in-process), tokens/s",
    ),
    "server_vs_offline_generate_tokens": (
        ">=",
        0.80,
        "serving at {c} clients / {k} adapters vs offline HF generate + PEFT, tokens/s",
    ),
    "short_under_load_vs_idle": ("<=", 2.0, "short request p50 latency under long-request load vs idle"),
    "short_under_load_worst_vs_idle": (
        "<=",
        2.0,
        "short request worst latency under long-request load vs idle p50",
    ),
    "adapter_load_p99_s": ("<=", 0.050, "adapter cold load (r=32) p99, seconds"),
    "churn_rss_growth_mb": ("<=", 50.0, "resident memory growth under adapter churn, MB (flat)"),
    "lora_vs_base_tokens": (">=", 0.85, "LoRA traffic vs base-only traffic, tokens/s"),
}


@dataclass
class ServeConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    dtype: str = "auto"  # as the server's auto: trainer.hardware.default_dtype
    base_shape: dict = field(default_factory=dict)  # {} = distilgpt2's shape
    rank: int = 32
    clients: int = 32
    adapters: int = 8
    sweep: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 40.0
    drain_s: float = 150.0
    max_requests: int = 512
    max_new_tokens: int = 256
    rounds: int = 2
    churn_adapters: int = 200
    cache_size: int = 16
    churn_requests: int = 200
    churn_concurrency: int = 4
    churn_new_tokens: int = 8
    churn_duration_s: float = 90.0
    long_clients: int = 8
    server_batch: str = "tuned"  # "tuned": max_batch_size = the clients; "default": the server derives it
    long_new_tokens: int = 256
    short_new_tokens: int = 16
    n_short: int = 8
    quiet_wait_s: float = 10.0
    threads: int | None = None
    profile: bool = False
    profile_s: float = 20.0
    tag: str = "serve"
    seed: int = 0

    @property
    def torch_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return default_dtype(self.device)


def run(cfg: ServeConfig) -> dict:
    t_start = time.time()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    log("setup", workdir=str(cfg.workdir))
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    # adapters fit one base: another architecture's get a folder of their own
    family = "" if "model_type" not in cfg.base_shape else f"{cfg.base_shape['model_type']}-"
    adapter_dir = cfg.workdir / f"adapters-{family}r{cfg.rank}"
    k_names = [f"bench-{i:02d}" for i in range(cfg.adapters)]
    churn_names = [f"churn-{i:03d}" for i in range(cfg.churn_adapters)]
    make_adapters(base, adapter_dir, k_names + churn_names, r=cfg.rank, seed=cfg.seed)
    machine = machine_description()

    lora_reqs = make_requests(cfg.max_requests, list(k_names), max_new=cfg.max_new_tokens, seed=cfg.seed)
    base_reqs = [Request(r.idx, r.prompt, None, r.max_new_tokens) for r in lora_reqs]
    rounds: list[dict] = []
    server_sweep: dict[int, dict] = {}
    naive_sweep: dict[int, dict] = {}
    offline_sweep: dict[int, dict] = {}
    extras: dict = {}
    n_offline: int | None = None
    stream = True

    for rnd in range(cfg.rounds):
        order = ["server", "naive", "offline"] if rnd % 2 == 0 else ["offline", "naive", "server"]
        rec: dict = {"round": rnd, "order": order}
        for method in order:
            if method == "server":
                out = _server_session(cfg, base, adapter_dir, k_names, churn_names, lora_reqs, base_reqs, rnd)
                stream = out.pop("stream")
                rec["server"] = out["headline"]
                rec["server_base_only"] = out["base_only"]
                server_sweep.update(out.get("sweep", {}))
                extras.update(out.get("extras", {}))
                if n_offline is None:
                    n_offline = out["headline"]["summary"]["requests_ok"]
            elif method == "naive":
                out = _naive_session(cfg, base, adapter_dir, k_names, lora_reqs, rnd)
                rec["naive"] = out["headline"]
                naive_sweep.update(out.get("sweep", {}))
            else:
                n = n_offline or min(len(lora_reqs), 4 * cfg.clients)
                res = _offline(cfg, base, adapter_dir, lora_reqs[:n], cfg.clients, None, f"offline-r{rnd}")
                rec["offline"] = res
                rec["offline_engine"] = _offline(
                    cfg,
                    base,
                    adapter_dir,
                    lora_reqs[:n],
                    cfg.clients,
                    None,
                    f"offline-engine-r{rnd}",
                    "engine",
                )
                if rnd == 0:
                    for b in cfg.sweep:
                        if b != cfg.clients:
                            offline_sweep[b] = _offline(
                                cfg, base, adapter_dir, lora_reqs, b, cfg.duration_s, f"offline-b{b}"
                            )
        rec["ratios"] = _round_ratios(rec)
        rounds.append(rec)
        log("round", round=rnd, ratios=rec["ratios"])

    for rec in rounds:  # the headline concurrency point of each method, for the sweep plot
        server_sweep.setdefault(cfg.clients, rec["server"]["summary"])
        naive_sweep.setdefault(cfg.clients, rec["naive"]["summary"])
        offline_sweep.setdefault(cfg.clients, _offline_summary(rec["offline"]))

    ratios = _combine(rounds, extras)
    results = {
        "benchmark": "serve",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "streaming_ttft": stream,
        "ratios": ratios,
        "targets": _targets(ratios, cfg),
        "rounds": rounds,
        "sweep": {
            "server": {str(k): v for k, v in sorted(server_sweep.items())},
            "naive": {str(k): v for k, v in sorted(naive_sweep.items())},
            "offline": {str(k): _offline_summary(v) for k, v in sorted(offline_sweep.items())},
        },
        "extras": extras,
    }
    return results


# --- sessions ---------------------------------------------------------------------------------


def _timed(label: str, cfg: ServeConfig, coro_fn, pid: int | None = None) -> LoadRun:
    """One load run; with ``pid`` (the server's) also the CPU seconds its process tree used."""
    foreign_before = wait_for_quiet_cpu(cfg.quiet_wait_s)
    cpu0 = tree_cpu_seconds(pid) if pid else None
    with ForeignLoad() as fl:
        result: LoadRun = asyncio.run(coro_fn())
    if cpu0 is not None:
        result.cpu_s = tree_cpu_seconds(pid) - cpu0
    result.foreign_cores = round(fl.cores, 2)
    s = result.summary()
    log(
        "load",
        label=label,
        concurrency=s["concurrency"],
        ok=s["requests_ok"],
        failed=s["requests_failed"],
        censored=s["censored"],
        tok_s=_r(s["tokens_per_s"]),
        p50=_r(s["latency_s"]["p50"]),
        foreign_before=round(foreign_before, 2),
        foreign=result.foreign_cores,
    )
    return result


def _server_session(cfg, base, adapter_dir, k_names, churn_names, lora_reqs, base_reqs, rnd) -> dict:
    data_dir = cfg.workdir / "server-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    out: dict = {}
    with servers.loraserve(
        model=base,
        adapter_dir=adapter_dir,
        data_dir=data_dir,
        device=cfg.device,
        max_batch_size=max(cfg.clients, cfg.long_clients + 1) if cfg.server_batch == "tuned" else None,
        max_loaded_adapters=cfg.cache_size,
        log_path=cfg.workdir / f"server-r{rnd}.log",
    ) as srv:
        log("server_ready", seconds=round(srv.ready_s, 1), pid=srv.pid)
        url = srv.base_url
        out["stream"] = stream = asyncio.run(probe_streaming(url, k_names[0]))
        if not stream:
            log("no_streaming", note="the server does not answer stream=true with SSE; TTFT unavailable")
        warm = make_requests(cfg.clients, list(k_names) + [None], seed=cfg.seed + 99, max_new=32)
        asyncio.run(run_load(url, warm, concurrency=cfg.clients, duration_s=120, stream=stream, label="warm"))
        cpu0 = tree_cpu_seconds(srv.pid)
        time.sleep(3.0)
        idle_cores = (tree_cpu_seconds(srv.pid) - cpu0) / 3.0

        def headline(reqs, label):
            return _timed(
                label,
                cfg,
                lambda: run_load(
                    url,
                    reqs,
                    concurrency=cfg.clients,
                    duration_s=cfg.duration_s,
                    drain_s=cfg.drain_s,
                    stream=stream,
                    label=label,
                ),
                pid=srv.pid,
            )

        pair = [("lora", lora_reqs), ("base", base_reqs)]
        for kind, reqs in pair if rnd % 2 == 0 else pair[::-1]:
            out["headline" if kind == "lora" else "base_only"] = headline(
                reqs, f"server-{kind}-r{rnd}"
            ).to_dict()

        if rnd == 0:
            out["sweep"] = {}
            for c in cfg.sweep:
                if c == cfg.clients:
                    continue
                lr = _timed(
                    f"server-c{c}",
                    cfg,
                    lambda c=c: run_load(
                        url,
                        lora_reqs,
                        concurrency=c,
                        duration_s=cfg.duration_s,
                        drain_s=cfg.drain_s,
                        stream=stream,
                        label=f"server-c{c}",
                    ),
                )
                out["sweep"][c] = lr.summary()
            extras = {"server_idle_cpu_cores": round(idle_cores, 3)}
            extras["short_vs_long"] = _short_vs_long(cfg, url, k_names, stream)
            extras["churn"] = _churn(cfg, srv, churn_names, stream)
            if cfg.profile:
                extras["profile"] = _profile(cfg, srv, lora_reqs, stream)
            out["extras"] = extras
    return out


def _naive_session(cfg, base, adapter_dir, k_names, lora_reqs, rnd) -> dict:
    out: dict = {"sweep": {}}
    with servers.naive(
        model=base,
        adapter_dir=adapter_dir,
        device=cfg.device,
        dtype=cfg.torch_dtype,
        preload=k_names,
        log_path=cfg.workdir / f"naive-r{rnd}.log",
    ) as srv:
        url = srv.base_url
        warm = make_requests(2, list(k_names), seed=cfg.seed + 99, max_new=16)
        asyncio.run(run_load(url, warm, concurrency=1, duration_s=120, stream=False, label="warm"))
        if rnd == 0:
            for c in cfg.sweep:
                if c == cfg.clients:
                    continue
                # A serial server's throughput does not depend on concurrency, and at c > 1 its
                # backlog would outlive the run and slow the next one: sweep it at c = 1 only.
                if c > 1:
                    continue
                lr = _timed(
                    f"naive-c{c}",
                    cfg,
                    lambda c=c: run_load(
                        url,
                        lora_reqs,
                        concurrency=c,
                        duration_s=cfg.duration_s / 2,
                        drain_s=cfg.drain_s,
                        stream=False,
                        label=f"naive-c{c}",
                    ),
                )
                out["sweep"][c] = lr.summary()
        # Headline last: requests still queued after the time bound (+ one more bound to let at
        # least one finish) are cancelled (censored) and the server is stopped right after, so
        # its leftover queue cannot slow anything else. A serial server's tokens/s is exact
        # from its finished requests alone.
        lr = _timed(
            f"naive-r{rnd}",
            cfg,
            lambda: run_load(
                url,
                lora_reqs,
                concurrency=cfg.clients,
                duration_s=cfg.duration_s,
                drain_s=cfg.duration_s,
                stream=False,
                label=f"naive-r{rnd}",
            ),
            pid=srv.pid,
        )
        out["headline"] = lr.to_dict()
    return out


def _offline(cfg, base, adapter_dir, reqs, batch_size, time_limit, label, method="generate") -> dict:
    spec = {
        "method": method,
        "model": str(base),
        "adapter_dir": str(adapter_dir),
        "requests": [r.to_dict() for r in reqs],
        "batch_size": batch_size,
        "device": cfg.device,
        "dtype": cfg.torch_dtype,
        "time_limit_s": time_limit,
    }
    spec_path = cfg.workdir / f"{label}.spec.json"
    out_path = cfg.workdir / f"{label}.out.json"
    write_json(spec_path, spec)
    foreign_before = wait_for_quiet_cpu(cfg.quiet_wait_s)
    with ForeignLoad() as fl, open(cfg.workdir / f"{label}.log", "w") as logf:
        subprocess.run(
            [sys.executable, "-m", "bench.offline", str(spec_path), str(out_path)],
            cwd=REPO,
            check=True,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    res = json.loads(out_path.read_text())
    res["foreign_cores"] = round(fl.cores, 2)
    res["label"] = label
    log(
        "offline",
        label=label,
        batch=batch_size,
        done=res["requests_done"],
        tok_s=_r(res["tokens_per_s"]),
        foreign_before=round(foreign_before, 2),
        foreign=res["foreign_cores"],
    )
    return res


def _offline_summary(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "per_request_tokens"}


# --- scenario 6: short requests while long ones run --------------------------------------------


def _short_vs_long(cfg: ServeConfig, url: str, k_names: list[str], stream: bool) -> dict:
    shorts, longs = short_and_long(cfg.seed)
    short_reqs = [
        Request(10_000 + i, shorts[i % len(shorts)], k_names[i % len(k_names)], cfg.short_new_tokens)
        for i in range(cfg.n_short)
    ]
    long_reqs = [
        Request(20_000 + i, longs[i % len(longs)], k_names[i % len(k_names)], cfg.long_new_tokens)
        for i in range(2 * cfg.long_clients)
    ]

    async def sequential(reqs, gap, t0=None):
        import httpx

        out = []
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            t0 = t0 or time.perf_counter()
            for r in reqs:
                out.append(await send_one(client, r, t0, stream))
                await asyncio.sleep(gap)
        return out

    async def loaded():
        t_long = time.perf_counter()  # run_load's own clock starts within a millisecond of this
        long_task = asyncio.create_task(
            run_load(
                url,
                long_reqs,
                concurrency=cfg.long_clients,
                duration_s=600,
                drain_s=cfg.drain_s,
                stream=stream,
                label="long",
            )
        )
        await asyncio.sleep(2.0)  # let the long requests get admitted and start decoding
        short = await sequential(short_reqs, 0.25, t0=t_long)  # one clock for short and long
        long_run = await long_task
        return short, long_run

    wait_for_quiet_cpu(cfg.quiet_wait_s)
    idle = asyncio.run(sequential(short_reqs, 0.25))
    wait_for_quiet_cpu(cfg.quiet_wait_s)
    with ForeignLoad() as fl:
        under, long_run = asyncio.run(loaded())
    # A short request counts as "under load" only if long requests were running through all of it.
    long_ok = long_run.ok()
    overlapped = [r for r in under if r.ok and any(lr.start <= r.start and lr.end >= r.end for lr in long_ok)]
    idle_lat = [r.latency for r in idle if r.ok]
    under_lat = [r.latency for r in under if r.ok]
    res = {
        "short_new_tokens": cfg.short_new_tokens,
        "long_clients": cfg.long_clients,
        "long_new_tokens": cfg.long_new_tokens,
        "idle_latency_s": summarize(idle_lat),
        "under_load_latency_s": summarize(under_lat),
        "idle_ttft_s": summarize([r.ttft for r in idle if r.ttft is not None]),
        "under_load_ttft_s": summarize([r.ttft for r in under if r.ttft is not None]),
        "short_overlapping_long": len(overlapped),
        "short_ok": len(under_lat),
        "long_summary": long_run.summary(),
        "foreign_cores": round(fl.cores, 2),
    }
    res["ratio_p50"] = ratio(res["under_load_latency_s"]["p50"], res["idle_latency_s"]["p50"])
    # every probe against the idle median, the first included: one stalled step shows here
    res["ratio_worst"] = ratio(res["under_load_latency_s"]["max"], res["idle_latency_s"]["p50"])
    res["under_load_latencies_s"] = [_r(r.latency, 4) if r.ok else None for r in under]
    log(
        "short_vs_long",
        idle_p50=_r(res["idle_latency_s"]["p50"]),
        loaded_p50=_r(res["under_load_latency_s"]["p50"]),
        loaded_max=_r(res["under_load_latency_s"]["max"]),
        ratio=_r(res["ratio_p50"]),
        ratio_worst=_r(res["ratio_worst"]),
        overlapping=len(overlapped),
    )
    return res


# --- scenario 5: adapter churn ------------------------------------------------------------------


def _churn(cfg: ServeConfig, srv, churn_names: list[str], stream: bool) -> dict:
    url = srv.base_url
    shorts, _ = short_and_long(cfg.seed)
    hot_names = churn_names[: cfg.cache_size]

    def reqs(names, n, start):
        return [
            Request(30_000 + start + i, shorts[i % len(shorts)], names[i % len(names)], cfg.churn_new_tokens)
            for i in range(n)
        ]

    def go(rs, label, duration):
        return _timed(
            label,
            cfg,
            lambda: run_load(
                url,
                rs,
                concurrency=cfg.churn_concurrency,
                duration_s=duration,
                drain_s=60,
                stream=stream,
                label=label,
            ),
        )

    # Fill the cache with 16 adapters, then time requests that only hit them (no loads).
    asyncio.run(
        run_load(
            url,
            reqs(hot_names, cfg.cache_size, 0),
            concurrency=cfg.churn_concurrency,
            duration_s=120,
            stream=stream,
            label="fill",
        )
    )
    hot = go(reqs(hot_names, 3 * cfg.cache_size, 1000), "churn-hot", cfg.churn_duration_s)
    snap0 = promstats.scrape(url)
    # Round-robin over all adapters: with more adapters than cache slots, every request loads one.
    cold_reqs = reqs(churn_names[cfg.cache_size :] + hot_names, cfg.churn_requests, 2000)
    with RssSampler(srv.pid, interval=0.25) as rss:
        cold = go(cold_reqs, "churn-cold", cfg.churn_duration_s)
    snap1 = promstats.scrape(url)

    buckets = promstats.histogram_delta(snap0, snap1, "loraserve_lora_adapter_load_seconds")
    loads = buckets[-1][1] if buckets else 0
    hot_s, cold_s = hot.summary(), cold.summary()
    samples = rss.samples
    mb = [v / 2**20 for _, v in samples]
    res = {
        "adapters": len(churn_names),
        "cache_size": cfg.cache_size,
        "concurrency": cfg.churn_concurrency,
        "new_tokens": cfg.churn_new_tokens,
        "hot": hot_s,
        "cold": cold_s,
        "cold_minus_hot_latency_p50_s": _sub(cold_s["latency_s"]["p50"], hot_s["latency_s"]["p50"]),
        "metrics_available": bool(snap1),
        "loads_in_metrics": loads,
        "cache_misses": promstats.total(snap1, "loraserve_adapter_cache_misses_total")
        - promstats.total(snap0, "loraserve_adapter_cache_misses_total"),
        "cache_evictions": promstats.total(snap1, "loraserve_adapter_cache_evictions_total")
        - promstats.total(snap0, "loraserve_adapter_cache_evictions_total"),
        "load_s_p50": promstats.bucket_quantile(buckets, 0.5),
        "load_s_p99": promstats.bucket_quantile(buckets, 0.99),
        "load_s_p99_bucket_bound": promstats.bucket_upper_bound(buckets, 0.99),
        "load_buckets": buckets,
        "rss_mb": [[round(t, 2), round(v, 1)] for t, v in zip([t for t, _ in samples], mb, strict=True)],
        "rss_start_mb": mb[0] if mb else None,
        "rss_end_mb": mb[-1] if mb else None,
        "rss_max_mb": max(mb) if mb else None,
    }
    res["rss_growth_mb"] = _sub(res["rss_end_mb"], res["rss_start_mb"])
    res["rss_slope_mb_per_100_requests"] = _slope_per_100(samples, cold_s["requests_ok"])
    log(
        "churn",
        loads=loads,
        p50=_r(res["load_s_p50"]),
        p99=_r(res["load_s_p99"]),
        rss_growth_mb=_r(res["rss_growth_mb"]),
        cold_minus_hot=_r(res["cold_minus_hot_latency_p50_s"]),
    )
    return res


def _slope_per_100(samples: list[tuple[float, int]], n_requests: int) -> float | None:
    """Least-squares RSS slope over the churn, in MB per 100 requests (requests spread evenly)."""
    if len(samples) < 3 or n_requests <= 0:
        return None
    ts = [t for t, _ in samples]
    ys = [v / 2**20 for _, v in samples]
    tm, ym = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - tm) ** 2 for t in ts)
    if den == 0:
        return None
    per_s = sum((t - tm) * (y - ym) for t, y in zip(ts, ys, strict=True)) / den
    return per_s * (ts[-1] - ts[0]) / n_requests * 100


# --- profile --------------------------------------------------------------------------------------


def _profile(cfg: ServeConfig, srv, lora_reqs, stream: bool) -> dict:
    """py-spy on the server's process tree during a headline-shaped load (a separate, unmeasured run)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = cfg.workdir / "profile-serve.txt"
    cmd = [
        py_spy,
        "record",
        "--pid",
        str(srv.pid),
        "--subprocesses",
        "--format",
        "raw",
        "--rate",
        "50",
        "--duration",
        str(int(cfg.profile_s)),
        "--output",
        str(raw),
        "--nonblocking",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        asyncio.run(
            run_load(
                srv.base_url,
                lora_reqs,
                concurrency=cfg.clients,
                duration_s=cfg.profile_s,
                drain_s=0.0,  # the server is stopped right after; its leftovers cost nothing
                stream=stream,
                label="profile",
            )
        )
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(cfg.profile_s + 30)
    if not raw.exists():
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return {"error": f"py-spy wrote no profile: {out[-300:]}"}
    from bench.profile_summary import summarize_collapsed

    summary = summarize_collapsed(raw.read_text())
    write_json(cfg.outdir / "profile-serve.json", summary)
    return {"file": "profile-serve.json", "top_self": summary["top_self"][:15]}


# --- ratios -----------------------------------------------------------------------------------------


def _round_ratios(rec: dict) -> dict:
    out = {}
    for unit, suffix in (("tokens_per_s", ""), ("tokens_per_cpu_s", "_per_cpu_s")):
        s = rec["server"]["summary"].get(unit)
        out |= {
            f"server_vs_naive_tokens{suffix}": ratio(s, rec["naive"]["summary"].get(unit)),
            f"server_vs_offline_tokens{suffix}": ratio(s, rec["offline_engine"].get(unit)),
            f"server_vs_offline_generate_tokens{suffix}": ratio(s, rec["offline"].get(unit)),
            f"lora_vs_base_tokens{suffix}": ratio(s, rec["server_base_only"]["summary"].get(unit)),
        }
    return out


def _combine(rounds: list[dict], extras: dict) -> dict:
    out: dict = {}
    for key in rounds[0]["ratios"]:
        vals = [r["ratios"][key] for r in rounds if r["ratios"].get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
        out[key + "_rounds"] = vals
    svl = extras.get("short_vs_long", {})
    out["short_under_load_vs_idle"] = svl.get("ratio_p50")
    out["short_under_load_worst_vs_idle"] = svl.get("ratio_worst")
    churn = extras.get("churn", {})
    out["adapter_load_p50_s"] = churn.get("load_s_p50")
    out["adapter_load_p99_s"] = churn.get("load_s_p99")
    out["churn_rss_growth_mb"] = churn.get("rss_growth_mb")
    return out


def _targets(ratios: dict, cfg: ServeConfig) -> list[dict]:
    rows = []
    for key, (op, target, text) in TARGETS.items():
        value = ratios.get(key)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append(
            {
                "key": key,
                "what": text.format(c=cfg.clients, k=cfg.adapters),
                "op": op,
                "target": target,
                "measured": value,
                "met": met,
            }
        )
    return rows


def _sub(a, b):
    return None if a is None or b is None else a - b


def _r(x, nd: int = 3):
    return None if x is None else round(x, nd)

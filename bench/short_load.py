"""Short requests while long ones grow, on a freshly started server at its default batch capacity.

    python -m bench short-load [--baseline-src DIR] [--n-short 15] [--short-new-tokens 4]
                               [--long-new-tokens 480] [--long-clients 8] [--clients 32]

Per server (started fresh, the batch capacity derived from its KV budget, as a user gets it):

- short-under-load: ``--n-short`` requests sent one after another, idle and then while
  ``--long-clients`` clients run ``--long-new-tokens``-token requests (``serve._short_vs_long``); the
  worst under-load latency (the first probe included) and the median, each over the idle median;
- memory: the server's resident memory (its whole process tree) when ready, and its peak while the
  long rows run, beside what the batch plan budgets (rows x context x bytes per position) and the
  KV blocks ``/health/ready`` reports in use;
- base-only tokens/s at ``--clients`` closed-loop clients (the headline workload without adapters).

``--baseline-src DIR`` runs the same on the server of another source tree (a checkout of an
earlier commit), alternating which goes first each round: before/after ratios from one run.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench import servers
from bench.common import REPO, RssSampler, log, machine_description, ratio, tree_rss
from bench.loadgen import run_load
from bench.serve import ServeConfig, _short_vs_long, _timed
from bench.workload import Request, make_requests
from testing.weights import ensure_base, make_adapters


@dataclass
class ShortLoadConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    base_shape: dict = field(default_factory=dict)
    rank: int = 32
    adapters: int = 8
    clients: int = 32
    duration_s: float = 30.0
    max_new_tokens: int = 256
    long_clients: int = 8
    long_new_tokens: int = 480
    short_new_tokens: int = 4
    n_short: int = 15
    rounds: int = 1
    baseline_src: Path | None = None
    quiet_wait_s: float = 10.0
    seed: int = 0


class _ReadyPoller:
    """Polls ``/health/ready`` in a thread; keeps the largest ``kv_cache.blocks_used`` seen."""

    def __init__(self, url: str, interval: float = 0.25):
        self.url, self.interval = url, interval
        self.peak: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kv = httpx.get(self.url + "/health/ready", timeout=5).json().get("kv_cache")
            except (httpx.HTTPError, ValueError):
                kv = None
            if kv and (self.peak is None or kv["blocks_used"] > self.peak["blocks_used"]):
                self.peak = kv
            self._stop.wait(self.interval)

    def __enter__(self) -> _ReadyPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _session(cfg: ShortLoadConfig, label: str, source: Path, base: Path, adapter_dir: Path, k_names) -> dict:
    serve_cfg = ServeConfig(
        workdir=cfg.workdir,
        seed=cfg.seed,
        long_clients=cfg.long_clients,
        long_new_tokens=cfg.long_new_tokens,
        short_new_tokens=cfg.short_new_tokens,
        n_short=cfg.n_short,
        quiet_wait_s=cfg.quiet_wait_s,
    )
    data_dir = cfg.workdir / f"short-load-data-{label}"
    out: dict = {"label": label, "source": str(source)}
    with servers.loraserve(
        model=base,
        adapter_dir=adapter_dir,
        data_dir=data_dir,
        device=cfg.device,
        max_batch_size=None,
        max_loaded_adapters=max(16, cfg.adapters),
        log_path=cfg.workdir / f"short-load-{label}.log",
        # the deadline admission would refuse closed-loop load on a slow (shared) machine: measure the rate
        extra_env={"LORASERVE_REQUEST_TIMEOUT": 3600},
        source=source,
    ) as srv:
        ready = httpx.get(srv.base_url + "/health/ready", timeout=10).json()
        out["batch"] = ready.get("batch")
        out["rss_ready_mb"] = tree_rss(srv.pid) >> 20
        with RssSampler(srv.pid) as rss, _ReadyPoller(srv.base_url) as kv:
            out["short_vs_long"] = _short_vs_long(serve_cfg, srv.base_url, k_names, True)
        out["rss_peak_under_load_mb"] = max((b for _, b in rss.samples), default=0) >> 20
        out["kv_cache_peak"] = kv.peak
        plan = out["batch"] or {}
        if plan:
            out["kv_plan_mb"] = plan["rows"] * plan["row_tokens"] * plan["kv_bytes_per_token"] >> 20
        base_reqs = [
            Request(r.idx, r.prompt, None, r.max_new_tokens)
            for r in make_requests(512, list(k_names), max_new=cfg.max_new_tokens, seed=cfg.seed)
        ]
        lr = _timed(
            f"base-{label}",
            serve_cfg,
            lambda: run_load(
                srv.base_url,
                base_reqs,
                concurrency=cfg.clients,
                duration_s=cfg.duration_s,
                drain_s=150.0,
                stream=True,
                label=f"base-{label}",
            ),
        )
        out["base_only"] = lr.summary()
    log(
        "short_load",
        label=label,
        worst=out["short_vs_long"]["ratio_worst"],
        p50=out["short_vs_long"]["ratio_p50"],
        rss_ready_mb=out["rss_ready_mb"],
        rss_peak_mb=out["rss_peak_under_load_mb"],
        base_tok_s=out["base_only"]["tokens_per_s"],
    )
    return out


def run(cfg: ShortLoadConfig) -> dict:
    t0 = time.time()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    family = "" if "model_type" not in cfg.base_shape else f"{cfg.base_shape['model_type']}-"
    adapter_dir = cfg.workdir / f"adapters-{family}r{cfg.rank}"
    k_names = [f"bench-{i:02d}" for i in range(cfg.adapters)]
    make_adapters(base, adapter_dir, k_names, r=cfg.rank, seed=cfg.seed)
    sources = [("this", REPO)] + ([("baseline", cfg.baseline_src)] if cfg.baseline_src else [])
    rounds = []
    for rnd in range(cfg.rounds):
        order = sources if rnd % 2 == 0 else sources[::-1]
        rounds.append({label: _session(cfg, label, src, base, adapter_dir, k_names) for label, src in order})
    res: dict = {
        "benchmark": "short_load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t0, 1),
        "machine": machine_description(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "rounds": rounds,
    }
    if cfg.baseline_src:
        per = [
            ratio(r["this"]["base_only"]["tokens_per_s"], r["baseline"]["base_only"]["tokens_per_s"])
            for r in rounds
        ]
        per = [p for p in per if p is not None]
        res["base_tokens_this_vs_baseline"] = statistics.median(per) if per else None
    mine = [r["this"]["short_vs_long"] for r in rounds]
    measured = {
        "short_under_load_worst_vs_idle": max((m["ratio_worst"] or 0 for m in mine), default=None),
        "short_under_load_vs_idle": statistics.median([m["ratio_p50"] or 0 for m in mine]) if mine else None,
        "base_tokens_this_vs_baseline": res.get("base_tokens_this_vs_baseline"),
    }
    res["targets"] = [
        {
            "key": key,
            "what": what,
            "op": op,
            "target": target,
            "measured": measured[key],
            "met": _met(measured[key], op, target),
        }
        for key, (op, target, what) in TARGETS.items()
    ]
    return res


TARGETS = {
    "short_under_load_worst_vs_idle": ("<=", 2.0, "worst short request under long-request load vs idle p50"),
    "short_under_load_vs_idle": ("<=", 2.0, "median short request under long-request load vs idle p50"),
    # no regression: same-run ratio, within the shared machine's noise
    "base_tokens_this_vs_baseline": (">=", 0.95, "base-only tokens/s at --clients, this vs --baseline-src"),
}


def _met(value: float | None, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        "## Short requests while long ones grow (fresh server, default batch capacity)",
        "",
        f"`python -m bench short-load`: {c['n_short']} requests of {c['short_new_tokens']} new tokens "
        f"sent one after another, idle and while {c['long_clients']} clients run "
        f"{c['long_new_tokens']}-token requests; then base-only traffic at {c['clients']} clients. "
        "Worst and median: under-load latency over the idle median. RSS: the server's process tree.",
        "",
        "| round | server | rows | long ok / failed | idle p50 s | worst × | median × | RSS ready MB "
        "| RSS peak MB | plan KV MB | KV blocks used (MB) | base tok/s (ok / failed) | foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, rnd in enumerate(res["rounds"]):
        for label, s in rnd.items():
            svl, kv = s["short_vs_long"], s.get("kv_cache_peak")
            used = "-" if not kv else f"{kv['blocks_used']} ({kv['blocks_used'] * kv['block_bytes'] >> 20})"
            long, base = svl["long_summary"], s["base_only"]
            lines.append(
                f"| {i} | {label} | {(s.get('batch') or {}).get('rows', '-')} | "
                f"{long['requests_ok']} / {long['requests_failed']} | "
                f"{svl['idle_latency_s']['p50']:.3f} | {svl['ratio_worst']:.2f} | {svl['ratio_p50']:.2f} | "
                f"{s['rss_ready_mb']} | {s['rss_peak_under_load_mb']} | {s.get('kv_plan_mb', '-')} | "
                f"{used} | "
                f"{base['tokens_per_s']:.1f} ({base['requests_ok']} / {base['requests_failed']}) | "
                f"{svl['foreign_cores']} |"
            )
    if res.get("base_tokens_this_vs_baseline") is not None:
        lines += ["", f"Base-only tokens/s, this / baseline: ×{res['base_tokens_this_vs_baseline']:.3f}."]
    return "\n".join(lines) + "\n"

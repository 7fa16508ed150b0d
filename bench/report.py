"""Render benchmark results: a Markdown table of ratios next to the targets, and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _fmt(x, nd=2, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def _met(row) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[row["met"]]


def machine_md(m: dict) -> str:
    keys = [
        "cpu_model",
        "logical_cpus",
        "physical_cpus",
        "cpu_features",
        "memory_gb",
        "os",
        "python",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "litserve",
        "torch_threads",
        "cuda",
        "gpu",
    ]
    return "\n".join(f"- {k}: {m[k]}" for k in keys if k in m)


def _dtype(res: dict) -> str:
    """The dtype asked for, and what ``auto`` resolved to on this machine."""
    asked = res["config"].get("dtype")
    used = next((r["offline"].get("dtype") for r in res.get("rounds", []) if "offline" in r), None)
    return f"{asked} = {used}" if asked == "auto" and used else str(asked)


def targets_md(targets: list[dict]) -> list[str]:
    """The one-run benchmarks' targets as markdown table lines."""
    lines = ["| target | measured | target | status |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {t['what']} | {_fmt(t['measured'])} | {t['op']} {t['target']} | {_met(t)} |" for t in targets
    ]
    return lines


def serve_markdown(res: dict) -> str:
    cfg, r = res["config"], res["ratios"]
    lines = [
        f"## Serving ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"Device {cfg['device']} (dtype {_dtype(res)}, threads {cfg.get('threads') or 'default'}), "
        f"{cfg['clients']} clients, {cfg['adapters']} adapters "
        f"of rank {cfg['rank']}, {cfg['rounds']} interleaved rounds, each load run bounded to "
        f"{cfg['duration_s']:.0f} s "
        f"and {cfg['max_requests']} requests; max_new_tokens 16-{cfg.get('max_new_tokens', 256)} "
        "(log-uniform), greedy. TTFT "
        + (
            "from streaming (SSE)."
            if res["streaming_ttft"]
            else "**unavailable**: the server did not stream."
        ),
        "",
        "| target | measured | target | status | per round |",
        "|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        rounds = r.get(t["key"] + "_rounds")
        per = ", ".join(_fmt(v) for v in rounds) if rounds else ""
        lines.append(
            f"| {t['what']} | {_fmt(t['measured'], 3)} | {t['op']} {t['target']} | {_met(t)} | {per} |"
        )
    per_cpu = [
        (what, r.get(key + "_per_cpu_s"))
        for key, what in (
            ("server_vs_naive_tokens", "server vs naive FastAPI + PEFT"),
            ("server_vs_offline_tokens", "server vs offline engine ceiling"),
            ("server_vs_offline_generate_tokens", "server vs offline HF generate + PEFT"),
            ("lora_vs_base_tokens", "LoRA vs base-only traffic"),
        )
    ]
    if any(v is not None for _, v in per_cpu):  # results from before CPU seconds were recorded have none
        lines += [
            "",
            "The same ratios per CPU-second (tokens / CPU seconds of the method's own processes; on a "
            "shared machine the CPU each phase got varies): "
            + "; ".join(f"{what} {_fmt(v, 2)}" for what, v in per_cpu)
            + ".",
        ]
    lines += [
        "",
        "| run | clients | ok | censored | tokens/s | req/s | p50 s | p95 s | p99 s | TTFT p50 s | "
        "other CPU load (cores) | tokens/CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in res["rounds"]:
        for key in ("server", "server_base_only", "naive"):
            s = rec[key]["summary"]
            lat, ttft = s["latency_s"], s["ttft_s"] or {}
            lines.append(
                f"| {s['label']} | {s['concurrency']} | {s['requests_ok']} | {s['censored']} | "
                f"{_fmt(s['tokens_per_s'], 1)} | {_fmt(s['requests_per_s'], 2)} | {_fmt(lat['p50'])} | "
                f"{_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {_fmt(ttft.get('p50'))} | "
                f"{_fmt(s['foreign_cores'])} | {_fmt(s.get('tokens_per_cpu_s'), 1)} |"
            )
        for key, what in (("offline_engine", "engine"), ("offline", "HF generate")):
            o = rec.get(key)
            if o is None:  # results from before the engine ceiling was measured
                continue
            lines.append(
                f"| {o['label']} ({what}, batch {o['batch_size']}) | - | {o['requests_done']} | - | "
                f"{_fmt(o['tokens_per_s'], 1)} | "
                f"{_fmt(o['requests_per_s'], 2)} | - | - | - | - | {_fmt(o['foreign_cores'])} | "
                f"{_fmt(o.get('tokens_per_cpu_s'), 1)} |"
            )
    ex = res.get("extras", {})
    if "short_vs_long" in ex:
        s = ex["short_vs_long"]
        lines += [
            "",
            f"Short requests ({s['short_new_tokens']} new tokens) idle vs while {s['long_clients']} clients "
            "run "
            f"{s['long_new_tokens']}-token requests: p50 {_fmt(s['idle_latency_s']['p50'])} s idle vs "
            f"{_fmt(s['under_load_latency_s']['p50'])} s under load (×{_fmt(s['ratio_p50'])})"
            + (
                f", worst {_fmt(s['under_load_latency_s']['max'])} s (×{_fmt(s['ratio_worst'])})"
                if s.get("ratio_worst") is not None
                else ""
            )
            + f"; TTFT p50 "
            f"{_fmt(s['idle_ttft_s']['p50'])} s vs {_fmt(s['under_load_ttft_s']['p50'])} s; "
            f"{s['short_overlapping_long']}/{s['short_ok']} short requests ran entirely while long ones "
            "were running.",
        ]
    if "churn" in ex:
        c = ex["churn"]
        lines += [
            "",
            f"Adapter churn: {c['adapters']} adapters round-robin through a {c['cache_size']}-adapter cache, "
            f"{c['concurrency']} clients, {c['new_tokens']} new tokens each. Loads seen in /metrics: "
            f"{_fmt(c['loads_in_metrics'], 0)}; load p50 {_fmt(c['load_s_p50'], 4)} s, "
            f"p99 {_fmt(c['load_s_p99'], 4)} s "
            f"(bucket bound {_fmt(c['load_s_p99_bucket_bound'])} s); request p50 with a cold adapter "
            f"{_fmt(c['cold']['latency_s']['p50'])} s vs hot {_fmt(c['hot']['latency_s']['p50'])} s; "
            f"server RSS {_fmt(c['rss_start_mb'], 0)} → {_fmt(c['rss_end_mb'], 0)} MB "
            f"(max {_fmt(c['rss_max_mb'], 0)}, slope "
            f"{_fmt(c['rss_slope_mb_per_100_requests'])} MB per 100 requests).",
        ]
    if "server_idle_cpu_cores" in ex:
        lines += ["", f"Idle server CPU use: {ex['server_idle_cpu_cores']:.2f} cores."]
    if "profile" in ex and "top_self" in ex["profile"]:
        lines += [
            "",
            "Profile of the server under the headline load (py-spy, share of samples, self time):",
            "",
        ]
        lines += [f"- {f['share'] * 100:.1f}% {f['frame']}" for f in ex["profile"]["top_self"][:10]]
    lines += ["", "Machine:", "", machine_md(res["machine"]), ""]
    return "\n".join(lines)


def train_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"## Training ({res['created']}, {res['wall_s']:.0f} s)",
        "",
        f"{cfg['steps']} optimizer steps (batch {cfg['batch_size']} × accumulation {cfg['grad_accum']}), "
        f"{cfg['train_rows']} training rows, {cfg['eval_rows']} eval rows, seed {cfg['seed']}, "
        f"LoRA r={cfg['rank']}, "
        f"device {cfg['device']} (threads {cfg.get('threads') or 'default'}), {cfg['rounds']} interleaved "
        "rounds; prototype padding to max_length "
        f"{cfg['max_length']}. Tokens/s counts real (non-padding) tokens; eval loss is computed the same way "
        "for every adapter (mean cross-entropy over response tokens and EOS). Every method but "
        "`hf-dynamic-bf16` gets the prototype's `fp16: true`; the precision column says what each really "
        "trained in (Accelerate runs fp16 as fp32 on a CPU; this trainer uses bf16 where the CPU has it).",
        "",
        "| target | measured | target | status | per round |",
        "|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        rounds = res["ratios"].get(t["key"] + "_rounds")
        per = ", ".join(_fmt(v) for v in rounds) if rounds else ""
        lines.append(
            f"| {t['what']} | {_fmt(t['measured'], 3)} | {t['op']} {t['target']} | {_met(t)} | {per} |"
        )
    lines += [
        "",
        "| run | precision | tokens/s (real) | wall s | peak memory MB | final train loss | eval loss | "
        "other CPU load (cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in res["runs"]:
        lines.append(
            f"| {rec['label']} | {rec.get('precision', '?')} | {_fmt(rec.get('tokens_per_s'), 1)} | "
            f"{_fmt(rec.get('train_s'), 1)} | "
            f"{_fmt(rec.get('peak_mem_mb'), 0)} | {_fmt(rec.get('final_train_loss'), 3)} | "
            f"{_fmt(rec.get('eval_loss'), 3)} | {_fmt(rec.get('foreign_cores'))} |"
        )
    lines += ["", "Machine:", "", machine_md(res["machine"]), ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------


def plot_throughput(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (
        ("server", "loraserve", "o-"),
        ("naive", "naive FastAPI + PEFT", "s--"),
        ("offline", "offline batched generate (batch = clients)", "^:"),
    ):
        pts = sorted((int(c), s.get("tokens_per_s")) for c, s in res["sweep"][key].items())
        pts = [(c, v) for c, v in pts if v is not None]
        if pts:
            ax.plot([c for c, _ in pts], [v for _, v in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        f"Throughput vs concurrency ({res['config']['adapters']} adapters, {res['config']['device']})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdf(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    rec = res["rounds"][0]
    for key, label in (
        ("server", "loraserve (LoRA)"),
        ("server_base_only", "loraserve (base only)"),
        ("naive", "naive FastAPI + PEFT"),
    ):
        reqs = [r for r in rec[key]["requests"] if r["latency"] is not None and r["error"] is None]
        for ax, field in ((axes[0], "latency"), (axes[1], "ttft")):
            xs = sorted(r[field] for r in reqs if r[field] is not None)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    axes[0].set_xlabel("request latency, s")
    axes[1].set_xlabel("time to first token, s" + ("" if res["streaming_ttft"] else " (unavailable)"))
    for ax in axes:
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency CDF at {res['config']['clients']} clients (round 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_churn(res: dict, path: Path) -> None:
    c = res.get("extras", {}).get("churn")
    if not c or not c["rss_mb"]:
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([t for t, _ in c["rss_mb"]], [v for _, v in c["rss_mb"]])
    ax.set_xlabel("seconds into the churn run")
    ax.set_ylabel("server RSS (process tree), MB")
    ax.set_title(f"Memory under churn: {c['adapters']} adapters through a {c['cache_size']}-slot cache")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seen = set()
    for rec in res["runs"]:
        if rec["method"] in seen or not rec.get("loss_curve"):
            continue
        seen.add(rec["method"])
        ax.plot([s for s, _ in rec["loss_curve"]], [v for _, v in rec["loss_curve"]], label=rec["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Training loss, same data, steps and seed (round 0)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Smoke tests of the benchmarks: each command runs end to end at a tiny size, so the code cannot rot.

They check that every scenario produced real measurements (requests answered, tokens counted,
ratios computed, plots written), never what the numbers are: targets are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(args: list[str], tmp_path: Path, timeout: float) -> Path:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        *args,
        "--tiny",
        "--threads",
        "1",
        "--quiet-wait",
        "0",
        "--workdir",
        str(tmp_path / "work"),
        "--outdir",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "targets (printed, never asserted)" in proc.stdout
    return out


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path


@pytest.mark.slow
def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    args = [
        "serve",
        "--rounds",
        "1",
        "--clients",
        "4",
        "--adapters",
        "2",
        "--sweep",
        "4",
        "--duration",
        "2",
        "--max-requests",
        "8",
        "--max-new-tokens",
        "32",
        "--churn-adapters",
        "10",
        "--churn-requests",
        "10",
        "--cache-size",
        "4",
        "--churn-duration",
        "20",
        "--long-clients",
        "2",
        "--long-new-tokens",
        "32",
        "--n-short",
        "2",
    ]
    out = run_bench(args, tmp_path, timeout=240)
    res = json.loads((out / "serve.json").read_text())
    rnd = res["rounds"][0]
    for key in ("server", "server_base_only", "naive"):
        s = rnd[key]["summary"]
        assert s["requests_ok"] >= 1 and s["requests_failed"] == 0, (key, s)
        assert s["generated_tokens"] > 0 and s["tokens_per_s"] > 0, (key, s)
    assert rnd["offline"]["requests_done"] == rnd["server"]["summary"]["requests_ok"]
    assert rnd["offline"]["generated_tokens"] > 0
    eng = rnd["offline_engine"]
    assert eng["method"] == "engine" and eng["requests_done"] == rnd["offline"]["requests_done"]
    assert eng["generated_tokens"] > 0
    # The server streams (SSE), so every answered request has a time to first token within its latency.
    assert res["streaming_ttft"] is True
    for r in rnd["server"]["requests"]:
        if r["error"] is None:
            assert 0 < r["ttft"] <= r["latency"]
    ratios = ("server_vs_naive_tokens", "server_vs_offline_tokens", "server_vs_offline_generate_tokens")
    for key in (*ratios, "lora_vs_base_tokens"):
        assert res["ratios"][key] > 0 and res["ratios"][key + "_per_cpu_s"] > 0, key
    # CPU seconds of each method's own processes over its timed span: some, and at most every core's (+ slack)
    for s, wall in [(rnd[k]["summary"], rnd[k]["summary"]["wall_s"]) for k in ("server", "naive")] + [
        (rnd[k], rnd[k]["wall_s"]) for k in ("offline", "offline_engine")
    ]:
        assert 0 < s["cpu_s"] <= 2.5 * wall * (os.cpu_count() or 1) and s["tokens_per_cpu_s"] > 0, s
    churn = res["extras"]["churn"]
    assert churn["cold"]["requests_ok"] == 10 and churn["hot"]["requests_ok"] >= 1
    assert churn["loads_in_metrics"] >= 6  # 10 adapters through a 4-slot cache: most requests load one
    assert churn["load_s_p99"] is not None and churn["rss_mb"]
    svl = res["extras"]["short_vs_long"]
    assert svl["short_ok"] == 2 and svl["idle_latency_s"]["n"] == 2 and svl["ratio_p50"] > 0
    md = (out / "results.md").read_text()
    assert "| serving at 4 clients / 2 adapters vs naive FastAPI + PEFT, tokens/s |" in md
    assert "| offline-engine-r0 (engine, batch 4) |" in md
    for name in ("throughput.png", "latency_cdf.png", "churn_memory.png"):
        assert_png(out / name)


@pytest.mark.slow
def test_train_benchmark_smoke(tmp_path: Path) -> None:
    args = [
        "train",
        "--rounds",
        "1",
        "--steps",
        "2",
        "--train-rows",
        "16",
        "--eval-rows",
        "4",
        "--max-length",
        "256",
    ]
    out = run_bench(args, tmp_path, timeout=240)
    res = json.loads((out / "train.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"loraserve", "hf-maxlen", "hf-dynamic", "hf-dynamic-bf16"}
    # Accelerate runs the prototype's fp16 as fp32 on a CPU; this trainer takes bf16 where the CPU has it.
    from trainer.hardware import cpu_has_native_bf16

    assert runs["hf-maxlen"]["precision"] == runs["hf-dynamic"]["precision"] == "fp32"
    assert runs["hf-dynamic-bf16"]["precision"] == "bf16"
    assert runs["loraserve"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    tokens = {r["real_tokens"] for r in runs.values()}
    assert len(tokens) == 1, "every method must see exactly the same rows"
    for r in runs.values():
        assert r["steps"] == 2 and len(r["loss_curve"]) == 2, r["method"]
        assert r["tokens_per_s"] > 0 and r["eval_loss"] > 0 and r["peak_mem_mb"] > 0
    # Padding to max_length wastes compute on padding; dynamic padding pads far less.
    assert runs["hf-maxlen"]["padding_fraction"] > runs["hf-dynamic"]["padding_fraction"]
    assert res["ratios"]["ours_vs_prototype_tokens"] > 0
    assert "trainer vs HF Trainer with dynamic padding" in (out / "results.md").read_text()
    assert_png(out / "loss_curves.png")


@pytest.mark.slow
def test_serve_train_benchmark_smoke(tmp_path: Path) -> None:
    """Serving with a training job vs without: both phases answer, both jobs finish, the report has its
    keys (the timing itself is not asserted)."""
    args = ["serve-train", "--clients", "4", "--adapters", "2", "--rank", "4", "--duration", "3",
            "--max-new-tokens", "16", "--job-steps", "2", "--job-batch-size", "2", "--job-rows", "8",
            "--max-pause", "0.5"]  # fmt: skip
    out = run_bench(args, tmp_path, timeout=480)  # two trainer start-ups: slow on a busy 2-core machine
    res = json.loads((out / "serve_train.json").read_text())
    assert res["benchmark"] == "serve-train"
    for key in ("serving_alone", "serving_with_job"):
        s = res[key]
        assert s["requests_ok"] >= 1 and s["requests_failed"] == 0 and s["latency_s"]["p99"] > 0, (key, s)
    for key in ("job_alone", "job_with_traffic"):
        job = res[key]
        assert job["status"] == "succeeded" and job["steps"] == 2 and job["seconds"] > 0, (key, job)
        assert job["yielded_seconds"] is not None
    ratios = res["ratios"]
    for key in ("p99_with_job_vs_without", "p50_with_job_vs_without", "job_seconds_with_traffic_vs_alone"):
        assert ratios[key] > 0, key
    both = ["p99_with_job_vs_without", "job_seconds_with_traffic_vs_alone"]  # side by side, one run
    assert [t["key"] for t in res["targets"]] == both
    assert "## Serving with a training job" in (out / "results.md").read_text()
    # several shares: this run's result stands for each share, to check the table and the trade-off plot
    shares = {"benchmark": "serve-train-shares", "created": res["created"], "wall_s": 1.0,
              "shares": [0.5, 1.0], "runs": [res, res]}  # fmt: skip
    (out / "serve_train_shares.json").write_text(json.dumps(shares))
    proc = subprocess.run([sys.executable, "-m", "bench", "report", "--outdir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "results.md").read_text()
    assert "by minimum training share" in text and "| 1.0 |" in text
    assert_png(out / "serve_train_shares.png")


def test_percentiles_and_histogram_quantiles() -> None:
    sys.path.insert(0, str(REPO))
    from bench.common import percentile
    from bench.promstats import bucket_quantile, bucket_upper_bound

    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None
    # 10 observations: 5 under 10 ms, 4 in (10, 25] ms, 1 in (25, 50] ms.
    buckets = [(0.01, 5.0), (0.025, 9.0), (0.05, 10.0), (float("inf"), 10.0)]
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert bucket_quantile(buckets, 0.7) == pytest.approx(0.01 + 0.015 * 2 / 4)
    assert bucket_upper_bound(buckets, 0.99) == 0.05
    assert bucket_quantile([(0.01, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_engine_benchmark_is_a_bench_command() -> None:
    """The engine micro-benchmark lives in bench/ (not in the product) and keeps its own options."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "engine", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m bench engine" in proc.stdout and "--stream-requests" in proc.stdout
    assert "--json-rows" in proc.stdout


def test_serve_mix_benchmark_smoke(tmp_path: Path) -> None:
    """Composed and constrained traffic through a real server: every phase answers with no failures,
    the constrained rows' JSON is produced by the server, and the report has its ratios (not asserted)."""
    args = ["serve-mix", "--clients", "4", "--adapters", "2", "--rank", "4", "--duration", "3",
            "--max-new-tokens", "16", "--rounds", "1", "--json-every", "2"]  # fmt: skip
    out = run_bench(args, tmp_path, timeout=300)
    res = json.loads((out / "serve_mix.json").read_text())
    assert res["benchmark"] == "serve-mix"
    (rnd,) = res["rounds"]
    for kind in ("adapters", "composed", "constrained"):
        s = rnd[kind]
        assert s["requests_ok"] >= 1 and s["requests_failed"] == 0 and s["tokens_per_s"] > 0, (kind, s)
    for key in ("composed_vs_adapters_tokens", "constrained_vs_adapters_tokens"):
        assert res["ratios"][key] > 0, key
    assert "Composed and constrained traffic" in (out / "results.md").read_text()


def test_fits_table_is_computed_from_the_configs() -> None:
    from bench import fits

    rows = {r["base"]: r for r in map(fits.row, fits.BASES)}
    # public parameter counts, recomputed from the configs (norms and biases left out)
    assert round(rows["gpt2"]["params_m"]) == 124 and round(rows["SmolLM2-135M"]["params_m"]) == 134
    assert round(rows["Llama-3.2-1B"]["params_m"]) == 1236 and round(rows["Qwen2.5-0.5B"]["params_m"]) == 494
    # KV bytes per token: 2 x layers x KV heads x head dim x 2 bytes (grouped-query attention caches fewer)
    assert rows["Qwen2.5-0.5B"]["kv_kib_per_token"] == 2 * 24 * 2 * 64 * 2 / 1024
    assert "| SmolLM2-135M |" in fits.markdown()


def test_interop_benchmark_is_a_bench_command() -> None:
    """The llama.cpp check (not run here: it builds llama.cpp) keeps its command and options."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "interop", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m bench interop" in proc.stdout and "--max-new-tokens" in proc.stdout

"""One-run check of a CUDA machine: torch sees the GPU, the server serves in fp16, a short fp16
training job finishes, and how much GPU memory all that took; then the same for a Llama-family
base (SmolLM2-135M, or its random-weight stand-in with ``--random-weights``), so one lent GPU
checks both families (``--llama-model ''`` skips it).

    python scripts/gpu_check.py                          # distilgpt2 from the Hugging Face cache/hub
    python scripts/gpu_check.py --random-weights         # no weights reachable: distilgpt2-shaped random base
    python scripts/gpu_check.py --model /path/to/base    # a local base folder
    docker run --rm --gpus all loraserve:0.1.0 python /opt/loraserve/gpu_check.py --random-weights

Each step prints one JSON line ({"step", "ok", ...}); the last line is the summary. Exit status 0
only when every step passed. ``--allow-cpu`` rehearses the same steps on a machine without a GPU
(fp32, says so, and is never a pass of the GPU check).

Last, ``decode:<family>`` times the engine's decode step in-process on random-weight bases of both
families (distilgpt2's and SmolLM2-135M's shapes, 64 steps after a prompt of 32 tokens) at 1, 8, 32
and 128 rows: tokens/s eager and replayed from CUDA graphs (``service/engine/graphs.py``), and the
largest logit difference between the two. ``--decode-only`` runs just that (on CPU with
``--allow-cpu``: eager only, graphs are CUDA's).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

TRAIN_ROWS = [
    {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    for a in range(1, 9)
    for b in (1, 2, 3)
]


def emit(step: str, ok: bool, **info: Any) -> dict[str, Any]:
    line = {"step": step, "ok": ok, **info}
    print(json.dumps(line), flush=True)
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvidia_smi() -> dict[str, Any]:
    """Driver version and whole-GPU memory as the driver sees it (all processes), if nvidia-smi exists."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    query = "driver_version,name,memory.used,memory.total"
    proc = subprocess.run(
        [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"nvidia_smi_error": proc.stderr.strip()[:200]}
    driver, name, used, total = (x.strip() for x in proc.stdout.splitlines()[0].split(","))
    return {
        "driver": driver,
        "gpu": name,
        "gpu_memory_used_mib": int(used),
        "gpu_memory_total_mib": int(total),
    }


def check_torch(allow_cpu: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return emit(
            "torch_sees_gpu", allow_cpu, cuda=False, **info, note="torch.cuda.is_available() is False"
        )
    props = torch.cuda.get_device_properties(0)
    info.update(
        cuda=True,
        device=props.name,
        capability=f"{props.major}.{props.minor}",
        total_memory_mib=props.total_memory // 2**20,
        arch_list=torch.cuda.get_arch_list(),
    )
    # A real kernel in fp16, not just the driver answering.
    x = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    info["fp16_matmul_finite"] = bool(torch.isfinite(x @ x).all().item())
    return emit("torch_sees_gpu", info["fp16_matmul_finite"], **info, **nvidia_smi())


class Server:
    """``python -m service`` in its own process group on a free loopback port."""

    def __init__(self, args: argparse.Namespace, work: Path, device: str, model: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_hex(16)
        self.log_path = work / "server.log"
        cmd = [
            sys.executable, "-m", "service", "--model", model,
            "--adapter-dir", str(work / "adapters"), "--data-dir", str(work / "data"),
            "--host", "127.0.0.1", "--port", str(self.port), "--device", device,
        ]  # fmt: skip
        if args.random_weights:
            cmd.append("--allow-random-weights")
        env = {**os.environ, "LORASERVE_API_KEY": self.key, "PYTHONUNBUFFERED": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    def log_tail(self, n: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with suppress(httpx.HTTPError):
                r = self.http.get("/health/ready", timeout=3)
                if r.status_code == 200:
                    return r.json()
            time.sleep(0.5)
        raise TimeoutError(f"not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 60.0) -> float | None:
        """SIGTERM as a container runtime would; seconds until every process of the group was gone."""
        self.http.close()
        start = time.monotonic()
        with suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        while time.monotonic() - start < grace:
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.2)
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return time.monotonic() - start
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return None


def gpu_memory_metrics(server: Server) -> dict[str, float]:
    """loraserve_gpu_memory_bytes{kind} from /metrics, in MiB."""
    out: dict[str, float] = {}
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith("loraserve_gpu_memory_bytes{"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = round(float(value) / 2**20, 1)
    return out


def generate(server: Server, n: int, adapter: str | None = None) -> dict[str, Any]:
    """n greedy requests at once (so they share batches); tokens/s over the whole burst."""
    import concurrent.futures

    body = {"prompt": "What is 3 plus 2?", "max_new_tokens": 32, "temperature": 0.0, "adapter": adapter}
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda _: server.http.post("/generate", json=body), range(n)))
    seconds = time.perf_counter() - start
    bad = [f"{r.status_code} {r.text[:200]}" for r in responses if r.status_code != 200]
    if bad:
        return {"ok": False, "errors": bad[:3]}
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    return {
        "ok": tokens > 0,
        "requests": n,
        "completion_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "sample": responses[0].json()["text"][:80],
    }


def train(server: Server, work: Path, fp16: bool, steps: int, timeout: float) -> dict[str, Any]:
    config = {
        "training": {
            "fp16": fp16,
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-4,
            "eval_fraction": 0.0,
            "save_steps": 0,
            "max_seq_length": 64,
        },
        "lora": {"r": 8, "lora_alpha": 16},
    }
    body = {"adapter": "gpu-check", "data": TRAIN_ROWS, "config": config, "overwrite": True}
    r = server.http.post("/train", json=body)
    if r.status_code != 202:
        return {"ok": False, "error": f"POST /train: {r.status_code} {r.text[:300]}"}
    job_id = r.json()["job_id"]
    deadline, job = time.monotonic() + timeout, r.json()
    start = time.perf_counter()
    while time.monotonic() < deadline:
        job = server.http.get(f"/train/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1.0)
    seconds = round(time.perf_counter() - start, 1)
    if job.get("status") != "succeeded":
        logs = server.http.get(f"/train/{job_id}/logs").text[-1500:]
        return {
            "ok": False,
            "job": job_id,
            "status": job.get("status"),
            "error": job.get("error"),
            "log": logs,
        }
    summary_path = work / "adapters" / "gpu-check" / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    precision = summary.get("precision")
    return {
        "ok": precision == ("fp16" if fp16 else "fp32"),
        "job": job_id,
        "seconds": seconds,
        "steps": summary.get("steps"),
        "precision": precision,
        "final_loss": summary.get("final_loss"),
        "skipped_steps": summary.get("skipped_steps"),
    }


def decode_rates(family: str, device: str, work: Path, rows: list[int], steps: int) -> dict[str, Any]:
    """Decode tokens/s of a random-weight base at each row count, eager and from CUDA graphs."""
    import torch

    from service.engine.lora import LoraPlan
    from service.engine.runners import make_runner
    from trainer.model import (
        DISTILGPT2_SHAPE,
        load_base_model,
        make_random_base,
        make_random_llama_base,
    )

    base = work / f"decode-{family}"
    if not (base / "config.json").exists():
        if family == "llama":
            make_random_llama_base(base, seed=0)  # SmolLM2-135M's shape
        else:
            make_random_base(base, **DISTILGPT2_SHAPE, seed=0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    runner = make_runner(
        load_base_model(base, dtype=dtype, device=device), max_rows=max(rows), max_context=1024
    )
    plan, prompt = LoraPlan([]), 32
    result: dict[str, Any] = {"ok": True, "family": family, "dtype": str(dtype), "steps": steps}

    def run(n: int) -> tuple[float, torch.Tensor]:
        logits = None
        start = time.perf_counter()
        for s in range(steps):
            logits = runner.decode([(11 * i + s) % 50000 for i in range(n)], [prompt + s] * n, plan)
        if device == "cuda":
            torch.cuda.synchronize()
        return n * steps / (time.perf_counter() - start), logits

    for n in rows:
        prompts = [[(7 * i + j) % 50000 for j in range(prompt)] for i in range(n)]
        runner.prefill(prompts, list(range(n)), plan)
        row: dict[str, Any] = {}
        runner.graphs = None
        run(n)  # warm-up
        rate, eager = run(n)
        row["eager_tokens_per_s"] = round(rate, 1)
        if runner.enable_graphs(rows):
            run(n)  # captures every (rows, span) graph the timed run uses
            rate, graphed = run(n)
            row["graphs_tokens_per_s"] = round(rate, 1)
            row["graphs_over_eager"] = round(rate / row["eager_tokens_per_s"], 2)
            row["max_logit_diff"] = float((graphed - eager).abs().max())
            row["ok"] = bool(torch.isfinite(graphed).all()) and row["max_logit_diff"] < 0.05
            result["ok"] = result["ok"] and row["ok"]
        else:
            row["graphs_tokens_per_s"] = None  # CUDA only
        result[f"rows_{n}"] = row
        runner.graphs = None
    return result


def check_base(args: argparse.Namespace, work: Path, device: str, model: str, prefix: str) -> list[dict]:
    """Serve, train, serve the trained adapter on one base; step names start with ``prefix``."""
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = device == "cuda"
    steps: list[dict[str, Any]] = []
    server = Server(args, work, device, model)
    stop_seconds = None
    try:

        def step(name: str, fn: Callable[[], dict[str, Any]]) -> bool:
            try:
                result = fn()
            except Exception as exc:  # one failed step is reported, the rest still run
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            steps.append(emit(prefix + name, **result, model=model))
            return bool(result["ok"])

        def ready() -> dict[str, Any]:
            body = server.wait_ready(args.timeout)
            want = ("cuda", "float16") if on_gpu else ("cpu", "float32")
            return {"ok": (body.get("device"), body.get("dtype")) == want, **body}

        if step("server_ready", ready):
            step("serve", lambda: generate(server, args.requests))
            step("train", lambda: train(server, work, on_gpu, args.train_steps, args.timeout))
            step("serve_trained_adapter", lambda: generate(server, 2, adapter="gpu-check"))
            step("memory", lambda: {"ok": True, "worker_mib": gpu_memory_metrics(server), **nvidia_smi()})
    finally:
        stop_seconds = server.stop()
    steps.append(
        emit(
            prefix + "sigterm_stop", stop_seconds is not None, seconds=stop_seconds and round(stop_seconds, 2)
        )
    )
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("LORASERVE_MODEL", "distilgpt2"))
    parser.add_argument(
        "--llama-model",
        default="HuggingFaceTB/SmolLM2-135M",
        help="the Llama-family base checked second ('' to skip)",
    )
    parser.add_argument("--random-weights", action="store_true", help="allow a random-weights base (no hub)")
    parser.add_argument("--workdir", type=Path, help="keep adapters, job data and the server log here")
    parser.add_argument("--requests", type=int, default=8, help="concurrent /generate requests")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for start-up and for training")
    parser.add_argument("--allow-cpu", action="store_true", help="rehearse on CPU (fp32); never a GPU pass")
    parser.add_argument("--decode-only", action="store_true", help="only the decode tokens/s step")
    parser.add_argument("--decode-rows", default="1,8,32,128", help="row counts of the decode step")
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args(argv)

    steps: list[dict[str, Any]] = []
    torch_step = check_torch(args.allow_cpu)
    steps.append(torch_step)
    if not torch_step["ok"]:
        emit("summary", False, failed=["torch_sees_gpu"])
        return 1
    on_gpu = bool(torch_step.get("cuda"))
    device = "cuda" if on_gpu else "cpu"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loraserve-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)

    for n, model in enumerate(m for m in (args.model, args.llama_model) if m and not args.decode_only):
        prefix = "" if n == 0 else "llama:"
        steps += check_base(args, work / f"base-{n}", device, model, prefix)
    rows = [int(r) for r in args.decode_rows.split(",") if r]
    for family in ("gpt2", "llama"):
        try:
            result = decode_rates(family, device, work, rows, args.decode_steps)
        except Exception as exc:  # reported, the rest still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        steps.append(emit(f"decode:{family}", **result))
    failed = [s["step"] for s in steps if not s["ok"]]
    emit(
        "summary",
        not failed and on_gpu,
        failed=failed,
        device=device,
        rehearsal=not on_gpu,
        workdir=str(work),
        server_logs=[str(p) for p in sorted(work.glob("base-*/server.log"))],
    )
    if not args.workdir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failed and (on_gpu or args.allow_cpu) else 1


if __name__ == "__main__":
    sys.exit(main())

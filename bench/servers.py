"""The servers the benchmarks measure, and their settings; ``testing.server`` starts and stops them."""

from __future__ import annotations

import sys
from pathlib import Path

from testing.server import child_env, free_port, launch


def loraserve(
    *,
    model: Path,
    adapter_dir: Path,
    data_dir: Path,
    device: str,
    max_batch_size: int | None,
    max_loaded_adapters: int,
    log_path: Path,
    extra_env: dict | None = None,
    ready_timeout: float = 300.0,
    source: Path | None = None,
):
    """This project's server: ``python -m service``, configured through LORASERVE_* settings.

    ``max_batch_size`` None: the server's default (the batch's rows derived from its KV budget).
    ``source``: the source tree to run (another commit's checkout, for before/after rows)."""
    port = free_port()
    env = child_env(
        {
            "LORASERVE_MODEL": model,
            "LORASERVE_ADAPTER_DIR": adapter_dir,
            "LORASERVE_DATA_DIR": data_dir,
            "LORASERVE_HOST": "127.0.0.1",
            "LORASERVE_PORT": port,
            "LORASERVE_DEVICE": device,
            **({"LORASERVE_MAX_BATCH_SIZE": max_batch_size} if max_batch_size is not None else {}),
            "LORASERVE_MAX_LOADED_ADAPTERS": max_loaded_adapters,
            "LORASERVE_MAX_NEW_TOKENS_CAP": 1024,
            "LORASERVE_MAX_QUEUE": 1024,
            "LORASERVE_REQUEST_TIMEOUT": 600,
            "LORASERVE_LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
    )
    cmd = [sys.executable, "-m", "service"]
    where = {"cwd": source} if source is not None else {}
    return launch(
        cmd, env, port, log_path, name="loraserve", ready_timeout=ready_timeout, stop_grace=15.0, **where
    )


def naive(*, model: Path, adapter_dir: Path, device: str, dtype: str, preload: list[str], log_path: Path):
    """The FastAPI + PEFT baseline in bench/naive_server.py."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model",
        str(model),
        "--adapter-dir",
        str(adapter_dir),
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--preload",
        ",".join(preload),
    ]
    return launch(cmd, child_env(), port, log_path, name="naive", ready_timeout=300.0, stop_grace=15.0)

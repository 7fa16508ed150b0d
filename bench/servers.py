"""Start and stop the servers under test as child processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    ready_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_ready(server: Server, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def _stop(server: Server, grace: float = 15.0) -> None:
    """SIGTERM the server (it stops its own children), then SIGKILL whatever is left of its group."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)  # children that outlived their parent
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(5)


@contextlib.contextmanager
def launch(
    name: str,
    cmd: list[str],
    env: dict,
    port: int,
    log_path: Path,
    ready_timeout: float,
    *,
    stop_grace: float = 15.0,
    cwd: Path = REPO,
) -> Iterator[Server]:
    """Start ``cmd`` in its own process group on loopback ``port`` (in ``cwd``: the source tree
    ``python -m`` imports from); yield it once ``/health/ready`` answers 200; stop it (and its
    group) afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, proc, f"http://127.0.0.1:{port}", log_path)
    try:
        server.ready_s = _wait_ready(server, ready_timeout)
        yield server
    finally:
        _stop(server, stop_grace)


def child_env(extra: dict) -> dict:
    """Our environment for a server under test: offline hub, quiet tokenizers, plus ``extra``."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


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
    source: Path = REPO,
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
    return launch(
        "loraserve", [sys.executable, "-m", "service"], env, port, log_path, ready_timeout, cwd=source
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
    return launch("naive", cmd, child_env({}), port, log_path, 300.0)

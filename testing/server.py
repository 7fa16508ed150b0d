"""Start a server under test as a subprocess on loopback, wait until it is ready, stop its whole group.

    with running_server(tiny_base, tmp_path / "adapters", tmp_path / "data") as srv:
        httpx.get(f"{srv.url}/health/ready")

``running_server`` runs ``python -m service``; ``launch`` runs any command that serves
``GET /health/ready`` on a given port (the benchmarks' baselines). Each server runs in its own process
group. Entering waits for ``/health/ready`` (failing with the server's log tail); leaving sends SIGTERM
to the main process, as a container runtime would, waits for every process of the group to go and
SIGKILLs whatever is left after the grace period, so nothing outlives the caller. With
``check_stop`` (the tests), a survivor is an error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testing.procs import group_members

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    name: str = "loraserve"
    api_key: str | None = None
    ready_s: float = 0.0  # seconds from start until /health/ready answered 200
    stop_seconds: float | None = field(default=None)  # set on exit: SIGTERM until the group was gone

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        """An httpx client for this server, sending the API key if there is one."""
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, headers=self.headers, **kwargs)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """Our environment for a server under test: offline hub, quiet tokenizers, unbuffered output, no
    inherited metrics folder (the server sets its own), plus ``extra``."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _wait_ready(server: Server, timeout: float) -> float:
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() < start + timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with code {server.proc.returncode} before it was ready; log tail:\n"
                f"{server.log_tail()}"
            )
        try:
            r = httpx.get(f"{server.url}/health/ready", timeout=2.0)
            if r.status_code == 200:
                return time.monotonic() - start
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.25)
    raise TimeoutError(
        f"{server.name} was not ready within {timeout:.0f} s (last: {last}); log tail:\n{server.log_tail()}"
    )


def _stop(server: Server, grace: float) -> list[tuple[int, str]]:
    """SIGTERM the main process; wait for the whole group to go; SIGKILL survivors. Returns survivors."""
    pgid = server.proc.pid  # start_new_session: the main process leads its own group
    start = time.monotonic()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    deadline = start + grace
    survivors = group_members(pgid)
    while time.monotonic() < deadline:
        with suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=0.1)  # reap the leader, else it lingers as a zombie
        survivors = group_members(pgid)
        if not survivors and server.proc.poll() is not None:
            server.stop_seconds = time.monotonic() - start
            return []
    if survivors:
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=10)
    return survivors


@contextmanager
def launch(
    cmd: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    *,
    name: str = "loraserve",
    api_key: str | None = None,
    ready_timeout: float = 120.0,
    stop_grace: float = 20.0,
    check_stop: bool = False,
    cwd: Path = REPO,
) -> Iterator[Server]:
    """Start ``cmd`` in its own process group, serving on loopback ``port``, in ``cwd`` (the source tree
    ``python -m`` imports from); yield it once ``/health/ready`` answers 200; stop it and its group
    afterwards (see the module's docstring)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, name=name, api_key=api_key)
    failed = True
    try:
        server.ready_s = _wait_ready(server, ready_timeout)
        yield server
        failed = False
    finally:
        survivors = _stop(server, stop_grace)
        if check_stop and survivors and not failed:
            raise AssertionError(
                f"processes still alive {stop_grace:.0f} s after SIGTERM (killed now): {survivors};"
                f" log tail:\n{server.log_tail()}"
            )


@contextmanager
def running_server(
    base: Path | str,
    adapter_dir: Path,
    data_dir: Path,
    *,
    api_key: str | None = None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout: float = 120.0,
    stop_grace: float = 20.0,
    prefix: Sequence[str] = (),
    log_path: Path | None = None,
    check_stop: bool = True,
) -> Iterator[Server]:
    """Start ``python -m service`` on a free loopback port and yield a ready ``Server``.

    ``prefix`` goes before the command (e.g. ``unshare ... sh -c '...; exec "$@"'``); it must exec
    the server in place, so that the process started is the server's main process. The log goes to
    ``log_path`` (default: ``server-<port>.log`` in ``data_dir``).
    """
    adapter_dir, data_dir = Path(adapter_dir), Path(data_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "service",
        "--model",
        str(base),
        "--adapter-dir",
        str(adapter_dir),
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    extra: dict[str, str] = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if api_key is not None:
        extra["LORASERVE_API_KEY"] = api_key  # not on argv, where other users could read it
    extra.update(env or {})
    with launch(
        cmd,
        child_env(extra),
        port,
        log_path or data_dir / f"server-{port}.log",
        api_key=api_key,
        ready_timeout=ready_timeout,
        stop_grace=stop_grace,
        check_stop=check_stop,
    ) as server:
        yield server

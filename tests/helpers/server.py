"""Run the real service as a subprocess on loopback, for end-to-end tests.

    with running_server(tiny_base, tmp_path / "adapters", tmp_path / "data") as srv:
        httpx.get(f"{srv.url}/health/ready")

The server runs ``python -m service`` in its own process group on a free port. Entering waits for
``GET /health/ready`` (failing with the server's log tail); leaving sends SIGTERM to the main
process, as a container runtime would, and asserts that every process of the group is gone
within the grace period (anything left is SIGKILLed first, so nothing outlives the test).
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

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    stop_seconds: float | None = field(default=None)  # set on exit: SIGTERM until the group was gone

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


def group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes in process group ``pgid``, as (pid, command name)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.append((int(entry), comm))
    return found


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {server.proc.returncode} before it was ready; log tail:\n"
                f"{server.log_tail()}"
            )
        try:
            r = httpx.get(f"{server.url}/health/ready", timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.25)
    raise TimeoutError(
        f"the server was not ready within {timeout:.0f} s (last: {last}); log tail:\n{server.log_tail()}"
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
) -> Iterator[Server]:
    """Start ``python -m service`` on a free loopback port and yield a ready ``Server``.

    ``prefix`` goes before the command (e.g. ``unshare ... sh -c '...; exec "$@"'``); it must exec
    the server in place, so that the process started is the server's main process.
    """
    adapter_dir, data_dir = Path(adapter_dir), Path(data_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
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
    proc_env = dict(os.environ)
    proc_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    proc_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server sets its own
    if api_key is not None:
        proc_env["LORASERVE_API_KEY"] = api_key  # not on argv, where other users could read it
    proc_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=proc_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, api_key=api_key)
    failed = True
    try:
        _wait_ready(server, ready_timeout)
        yield server
        failed = False
    finally:
        survivors = _stop(server, stop_grace)
        if survivors and not failed:
            raise AssertionError(
                f"processes still alive {stop_grace:.0f} s after SIGTERM (killed now): {survivors};"
                f" log tail:\n{server.log_tail()}"
            )

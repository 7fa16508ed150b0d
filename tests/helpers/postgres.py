"""A real PostgreSQL server for tests: Debian's ``postgresql`` package, in a temporary folder.

    with running_postgres() as pg:
        url = pg.new_database()      # postgresql://loraserve:...@127.0.0.1:PORT/test_1

``initdb`` and ``pg_ctl`` come from ``/usr/lib/postgresql/<version>/bin`` (or PATH). PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres`` user the package creates
and the commands run through ``runuser``. The server listens on a free loopback port only, with
password authentication over TCP, and is stopped (``pg_ctl stop``) when the block ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testing.server import free_port

USER = "loraserve"
INSTALL_HINT = "Debian's 'postgresql' package is needed: apt-get install postgresql (make test installs it)"


def bin_dir() -> Path | None:
    """The newest installed server's bin folder, or the folder of ``initdb`` on PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Postgres:
    port: int
    password: str
    data: Path
    bin: Path
    as_user: list[str]  # prefix that runs a command as the cluster's owner
    log_path: Path
    _databases: int = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.data}"
        done = self.pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_path), "-o", options, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``immediate`` is a crash: no checkpoint, clients cut off at once."""
        self.pg_ctl("stop", "-w", "-m", mode, check=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    found = bin_dir()
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="loraserve-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    root.chmod(0o700)
    password = secrets.token_hex(12)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")
    pg = Postgres(free_port(), password, root / "data", found, as_user, root / "server.log")
    subprocess.run(
        [
            *as_user,
            str(found / "initdb"),
            "-D",
            str(pg.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "--encoding=UTF8",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    if as_user:
        shutil.chown(root, "postgres", "postgres")  # the log file goes here too
    pg.start()
    try:
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

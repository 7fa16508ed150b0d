"""The shared harness itself (``testing/``): its /proc reads on real processes, and one import path."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

from testing import procs

TESTS = Path(__file__).resolve().parent


def test_process_reads_follow_a_real_process_group() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, sys; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert procs.alive(child.pid)
        assert procs.group_members(child.pid) == [(child.pid, procs.comm(child.pid))]
        assert "time.sleep(60)" in procs.cmdline(child.pid)
        assert procs.group_rss(child.pid) > 1 << 20  # a Python interpreter holds megabytes
        assert procs.trainer_pid("no-such-job") is None
    finally:
        child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procs.group_members(child.pid) and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.05)
    assert procs.group_members(child.pid) == []
    assert child.wait(10) == -signal.SIGKILL
    assert not procs.alive(child.pid) and procs.cmdline(child.pid) == "" and procs.group_rss(child.pid) == 0


def test_tests_import_the_harness_one_way() -> None:
    """``testing.*`` and ``tests.helpers.*`` only: a bare ``helpers.x`` would be a second module object,
    and the benchmarks are no fixture store."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] == "helpers" or name in ("bench.adapters", "bench.servers"):
                    wrong.append(f"{path.relative_to(TESTS)}:{node.lineno}: {name}")
    assert wrong == []

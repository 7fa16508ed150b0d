"""Helpers shared by the benchmarks: statistics, machine description, CPU and memory sampling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values: list[float]) -> dict:
    """n, mean, p50, p95, p99, max of a list of numbers."""
    return {
        "n": len(values),
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def log(event: str, **fields) -> None:
    """One JSON line of progress on stderr (machines read it; people can too)."""
    print(json.dumps({"t": round(time.time(), 3), "event": event, **fields}), file=sys.stderr, flush=True)


def machine_description() -> dict:
    """CPU model, cores, memory and library versions: what a reader needs to weigh the numbers."""
    cpu_model = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "x86_64", ""):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    desc = {
        "cpu_model": cpu_model,
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "cpu_features": sorted(
            f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}
        ),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", _VERSIONS_SNIPPET], capture_output=True, text=True, timeout=120, check=True
        )
        desc.update(json.loads(out.stdout))
    except (subprocess.SubprocessError, json.JSONDecodeError) as exc:
        desc["versions_error"] = str(exc)[:200]
    return desc


# Run in a child so the bench process itself never imports torch (it only drives load).
_VERSIONS_SNIPPET = """
import json, torch, transformers, peft, accelerate
d = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
     "accelerate": accelerate.__version__, "torch_threads": torch.get_num_threads(),
     "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    d["gpu"] = torch.cuda.get_device_name(0)
try:
    import litserve
    d["litserve"] = litserve.__version__
except Exception:
    pass
print(json.dumps(d))
"""


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants; 0 if it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user+system) used so far by a process and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class RssSampler:
    """Samples the RSS of a process tree every ``interval`` seconds in a thread."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        t0 = time.perf_counter()

        def run() -> None:
            while not self._stop.is_set():
                self.samples.append((time.perf_counter() - t0, tree_rss(self.pid)))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


class ForeignLoad:
    """How many CPU cores processes *outside* this benchmark used during a phase.

    The machine is shared, so every phase records this next to its numbers: a phase that
    ran while someone else used a core is worth less, and the report says so. Our own
    descendants are sampled every ``EVERY_S``, so one that is born and exits within the
    phase (a trainer child, say) still counts as ours up to its last sample.
    """

    EVERY_S = 0.2

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.first: dict[int, float] = {}  # pid -> CPU seconds when first seen (0 for one born in the phase)
        self.last: dict[int, float] = {}  # pid -> CPU seconds when last seen
        self.stop = threading.Event()

    def _sample(self, born_now: bool) -> None:
        for p in self.me.children(recursive=True):
            try:
                c = p.cpu_times()
            except psutil.Error:
                continue
            self.first.setdefault(p.pid, 0.0 if born_now else c.user + c.system)
            self.last[p.pid] = c.user + c.system

    def _run(self) -> None:
        while not self.stop.wait(self.EVERY_S):
            self._sample(born_now=True)

    def _mine(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    def __enter__(self) -> ForeignLoad:
        self.t0 = time.perf_counter()
        self.sys0 = _busy_seconds()
        self.mine0 = self._mine()
        self._sample(born_now=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample(born_now=True)
        wall = time.perf_counter() - self.t0
        sys_busy = _busy_seconds() - self.sys0
        ours = self._mine() - self.mine0 + sum(self.last[pid] - self.first[pid] for pid in self.last)
        self.cores = max(0.0, (sys_busy - ours) / wall) if wall > 0 else 0.0
        self.ours_cores = ours / wall if wall > 0 else 0.0


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return (
        t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    )


def wait_for_quiet_cpu(max_wait: float = 20.0, threshold: float = 0.5) -> float:
    """Wait (at most ``max_wait`` s) until the machine's other processes use under ``threshold`` cores.

    Returns the last measured foreign load in cores. Never fails: a busy shared machine only
    makes numbers noisier, which each phase records.
    """
    deadline = time.monotonic() + max_wait
    while True:
        with ForeignLoad() as fl:
            time.sleep(1.0)
        if fl.cores < threshold or time.monotonic() >= deadline:
            return fl.cores


def target_rows(targets: dict, ratios: dict, clients: int) -> list[dict]:
    """One row per target ``key: (op, target, text)``: the measured ratio and whether it is met
    (None when not measured). ``text`` may name ``{c}``, the client count."""
    rows = []
    for key, (op, target, text) in targets.items():
        value = ratios.get(key)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append({"key": key, "what": text.format(c=clients), "op": op, "target": target,
                     "measured": value, "met": met})  # fmt: skip
    return rows

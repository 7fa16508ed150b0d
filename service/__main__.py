"""Run the service: ``python -m service --model M --adapter-dir D --data-dir D --host H --port P``.

Every flag is also an environment variable (``--max-batch-size`` = ``LORASERVE_MAX_BATCH_SIZE``);
flags win. Prefer ``LORASERVE_API_KEY`` over ``--api-key`` (argv is visible to other users).

    python -m service --model distilgpt2 --adapter-dir adapters --data-dir data --port 8000
    python -m service --allow-random-weights ...   # demo without downloadable weights (loud warning)

Process tree: this main process -> LitServe's manager, one spawned generation worker, forked
API servers; plus the job runner and the adapter watcher (spawned here). SIGTERM and SIGINT stop
all of them. A generation worker that dies is restarted in place (``--worker-max-restarts``,
docs/reliability.md).

``--role`` picks the parts: ``all`` (the tree above), ``serve`` (no job runner: jobs are queued in
the shared ``--jobs-db`` for a runner elsewhere) or ``runner`` (the job runner and the job, adapter,
health and metrics routes served by uvicorn in this process; no LitServe, no model loaded).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.jobs.sql import redact
from service.settings import Settings

if TYPE_CHECKING:
    from service.served_model import ServedModel

log = logging.getLogger("service")


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags over LORASERVE_* variables over defaults; exits 2 with a message when invalid."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LORASERVE_{name.upper()}"
        help_text = f"{field.description or ''} [env {env}]".strip()
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=help_text)
    args = vars(parser.parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        parser.exit(2, f"python -m service: invalid settings: {problems}\n")


def metrics_dir(settings: Settings, environ: Mapping[str, str]) -> Path:
    """The multiprocess metrics folder: a preset PROMETHEUS_MULTIPROC_DIR, else ``settings.prometheus_dir``.

    The preset variable wins because prometheus_client reads it in every process that imports it:
    a container can point it at local scratch and the server must write where it says.
    """
    preset = environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    return Path(preset) if preset else settings.prometheus_dir


def prepare_metrics_dir(settings: Settings) -> Path:
    """Multiprocess metrics need their folder set and emptied before prometheus_client is imported.

    Only this (main) process empties it, before any child exists; children inherit the variable:
    spawned ones (generation worker, job runner) and forked ones (API servers). Only the ``*.db``
    files prometheus_client writes are removed, so a folder pointed at by mistake (``/tmp``) keeps
    everything else.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    prom = metrics_dir(settings, os.environ).expanduser().resolve()
    if settings.metrics_dir is not None and settings.metrics_dir.expanduser().resolve() != prom:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR=%s is set; it wins over --metrics-dir %s", prom, settings.metrics_dir
        )
    prom.mkdir(parents=True, exist_ok=True)
    for stale in prom.glob("*.db"):  # a previous run's values would be summed into this run's
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    return prom


def resolve_device(settings: Settings) -> tuple[str, str]:
    """(device, dtype): CUDA when asked or available under auto; dtype auto is float16 on CUDA,
    bfloat16 on a CPU with native bf16 (1.6x the fp32 decode rate measured here), else float32."""
    import torch

    from trainer.hardware import default_dtype

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m service: --device cuda was asked for but torch sees no CUDA device")
    dtype = settings.dtype
    if dtype == "auto":
        dtype = default_dtype(device)
    return device, dtype


def _host_for_litserve(host: str) -> str:
    host = {"localhost": "127.0.0.1"}.get(host, host)
    if host not in ("0.0.0.0", "127.0.0.1", "::"):
        raise SystemExit(
            f"python -m service: --host must be 0.0.0.0, 127.0.0.1 or :: (what LitServe binds), not {host}"
        )
    return host


class _Stop:
    """SIGTERM handler: LitServe itself shuts down only on Ctrl-C (KeyboardInterrupt).

    Once the server is serving, the main thread waits on LitServe's shutdown event, so a helper
    thread sets that event and LitServe runs its normal shutdown (stop API servers, worker,
    manager). Before that (resolving the model, worker setup) a KeyboardInterrupt unwinds start-up
    and ``main`` stops whatever was started. Forked children (uvicorn re-raises the signal after
    its own graceful exit) inherit this handler and just die of the signal, as without it.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.requested = False
        self.server = None

    def __call__(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.requested:
            return
        self.requested = True
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        if self.server is not None and self.server.serving:
            threading.Thread(target=self.server.request_shutdown, name="sigterm", daemon=True).start()
            return
        raise KeyboardInterrupt


def _stop_children(runner: mp.process.BaseProcess | None, stop_event) -> None:
    """Stop the job runner gently, then anything LitServe left behind."""
    # Only a live runner is told: a multiprocessing Event's set() waits for every process asleep in
    # wait() to wake, so a runner killed while waiting would block set() forever.
    if runner is not None and runner.is_alive():
        stop_event.set()
        runner.join(10)
    for child in mp.active_children():
        child.terminate()
    for child in mp.active_children():
        child.join(3)
        if child.is_alive():
            log.warning("%s (pid %s) did not stop; killing it", child.name, child.pid)
            child.kill()
            child.join(1)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings.adapter_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_root.mkdir(parents=True, exist_ok=True)
    host = _host_for_litserve(settings.host)
    if not 1024 <= settings.port <= 65535:
        raise SystemExit("python -m service: --port must be between 1024 and 65535")
    prepare_metrics_dir(settings)
    settings.worker_status_path.unlink(missing_ok=True)  # readiness must not see a previous run's worker

    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    runner = stop_event = None
    try:
        from trainer.model import ModelSourceError, resolve_base

        try:
            base = resolve_base(
                settings.model,
                allow_random=settings.allow_random_weights,
                random_cache=settings.model_cache_dir,
            )
        except ModelSourceError as exc:
            print(f"python -m service: {exc}", file=sys.stderr)
            return 2
        from loracore.families import UnsupportedBase, family_of_folder

        try:
            family_of_folder(base.path)  # refused here, in one line, before any process loads it
        except UnsupportedBase as exc:
            print(f"python -m service: {exc}", file=sys.stderr)
            return 2
        device, dtype = resolve_device(settings)
        # every process from here on (runner, trainers, worker) sees the device chosen, never "auto":
        # the CPU thread split between a trainer and generation depends on it (jobs.trainer_process)
        settings = settings.model_copy(update={"device": device})

        from service.adapters.watcher import run_watcher
        from service.app import build_server
        from service.jobs.runner import run_runner
        from service.served_model import ServedModel

        model = ServedModel(settings.model, base.path, base.origin, base.random_weights, device, dtype)
        server = None
        if settings.serves_generation:
            server, _ = build_server(settings, model)
            stop.server = server
        log.info(
            "role %s: %s %s (%s weights from %s) on %s/%s at http://%s:%s; job store %s",
            settings.role,
            "serving" if settings.serves_generation else "training jobs for",
            settings.model,
            base.origin,
            base.path,
            device,
            dtype,
            host,
            settings.port,
            redact(settings.jobs_db or ""),
        )
        spawn = mp.get_context("spawn")
        # stores folders placed in the adapter directory by hand as versions (the request path only reads)
        watcher_args = (str(settings.adapter_dir), settings.keep_adapter_versions, settings.log_level)
        spawn.Process(target=run_watcher, args=watcher_args, name="adapter-watcher", daemon=True).start()
        if settings.runs_jobs:
            stop_event = spawn.Event()
            runner = spawn.Process(target=run_runner, args=(settings, stop_event), name="job-runner")
            runner.start()
        if server is None:
            assert runner is not None
            return _serve_runner_role(settings, model, runner, host, stop)
        server.run(
            host=host,
            port=settings.port,
            num_api_servers=settings.num_api_servers,
            log_level=settings.log_level,
            generate_client_file=False,
        )
        if server.gave_up:
            log.error("the generation worker kept dying (see the log above); exit code 1")
            return 1
    except KeyboardInterrupt:
        pass
    except (EOFError, ConnectionError):  # LitServe's manager process died: nothing to heal in place
        log.error("a server process died (see the log above); exit code 1, so a supervisor restarts us")
        return 1
    except Exception:
        log.exception("the server failed")
        return 1
    finally:
        signal.signal(
            signal.SIGTERM, signal.SIG_IGN
        )  # already stopping; a second TERM must not interrupt that
        _stop_children(runner, stop_event)
        if runner is not None or stop.server is not None:
            log.info("stopped")
    return 0


def _serve_runner_role(
    settings: Settings, model: ServedModel, runner: mp.process.BaseProcess, host: str, stop: _Stop
) -> int:
    """Role ``runner``: uvicorn serves the job routes in this process while the spawned runner trains.

    A runner that dies stops the server with exit code 1 (a dead generation worker is restarted in
    place, a dead runner is not), so a supervisor restarts it; SIGTERM stops uvicorn, then ``main``
    stops the runner.
    """
    import uvicorn

    from service.app import build_runner_app

    runner_gone = threading.Event()
    app = build_runner_app(settings, model, runner_alive=lambda: not runner_gone.is_set())
    if settings.num_api_servers > 1:
        log.info("role runner: one API process (--num-api-servers is for the generation roles)")
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=5
        )
    )

    def watch_runner() -> None:
        mp.connection.wait([runner.sentinel])
        runner_gone.set()
        if not stop.requested and not server.should_exit:
            log.error("the job runner died (exit code %s); stopping, exit code 1", runner.exitcode)
            server.should_exit = True

    threading.Thread(target=watch_runner, name="runner-watch", daemon=True).start()
    server.run()
    return 1 if runner_gone.is_set() and not stop.requested else 0


def _exit(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers (seconds, for nothing).

    Every child is stopped by now; flush what is buffered and release named semaphores first.
    """
    from multiprocessing import util

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    util._run_finalizers()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())

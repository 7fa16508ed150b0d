"""``loraserve``: the command line over ``Client``.

    loraserve train data.jsonl --adapter pirate --wait --set training.num_train_epochs=5 [--val val.jsonl]
    loraserve generate "What is LoRA?" --adapter pirate --stream
    loraserve adapters [list|get NAME|upload NAME FOLDER|delete NAME]
    loraserve jobs [list [--status S]|get ID|wait ID|cancel ID|logs ID]
    loraserve export pirate[@version] --format gguf|merged|peft --out PATH
    loraserve export pirate:0.6 poet:0.4 --format merged --out PATH

Results go to stdout (``--json``: as JSON), progress to stderr. On an error: one line on stderr, exit status 1
(2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from ._client import Client
from ._core import __version__
from ._exceptions import LoraserveError
from ._progress import describe_job
from .types import Job


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        timeout = httpx.Timeout(args.timeout, connect=min(5.0, args.timeout))
        with Client(args.url, api_key=args.api_key, timeout=timeout) as client:
            args.func(client, args)
    except LoraserveError as exc:
        return _fail(str(exc))
    except (OSError, ValueError, TypeError) as exc:  # a local file or argument the client refused
        return _fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        return 130
    return 0


def _fail(message: str) -> int:
    print(f"loraserve: error: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- command line


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before or after the subcommand (the subcommand's copy does not reset them)."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--url", default=default(None), help="server URL (default: $LORASERVE_URL or http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", default=default(None), help="API key (default: $LORASERVE_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print results as JSON")
    parser.add_argument(
        "--timeout", type=float, default=default(60.0), help="seconds per request (default 60)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Train and use LoRA adapters on a loraserve server."
    )
    parser.add_argument("--version", action="version", version=f"loraserve-client {__version__}")
    _add_common(parser, top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        group: Any, name: str, func: Callable[[Client, argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        _add_common(sub, top=False)
        sub.set_defaults(func=func)
        return sub

    p = command(commands, "generate", cmd_generate, "generate text with an adapter or the base model")
    p.add_argument("prompt", help='the prompt ("-" reads it from stdin)')
    p.add_argument("--adapter", "-a", help="adapter name (default: the base model)")
    p.add_argument("--max-new-tokens", "-n", type=int)
    p.add_argument("--temperature", "-t", type=float, help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, help="0 disables top-k")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the adapter's template")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")

    p = command(commands, "train", cmd_train, "train an adapter on a JSONL file (or an uploaded dataset)")
    p.add_argument("data", nargs="?", help="training rows, .jsonl (or a .json list)")
    p.add_argument("--adapter", "-a", required=True, help="name to publish the adapter under")
    p.add_argument("--dataset", help="an uploaded dataset id instead of DATA")
    p.add_argument(
        "--val",
        metavar="FILE",
        help="validation rows, .jsonl (uploaded first): evaluated on instead of a held-out part of DATA, "
        "and the adapter published is the best evaluation's",
    )
    p.add_argument("--val-dataset", metavar="ID", help="an uploaded dataset id instead of --val FILE")
    p.add_argument(
        "--config", type=Path, help="partial trainer config, .json (or .yaml with PyYAML installed)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. training.num_train_epochs=5 (repeatable; VALUE is JSON or text)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    p.add_argument("--wait", "-w", action="store_true", help="follow the job until it ends")
    p.add_argument("--no-progress", action="store_true", help="with --wait: no progress display")

    p = command(commands, "adapters", cmd_adapters_list, "list, show, upload or delete adapters")
    sub = p.add_subparsers(title="actions", metavar="ACTION")
    command(sub, "list", cmd_adapters_list, "list adapters")
    command(sub, "get", cmd_adapters_get, "show one adapter").add_argument("name")
    q = command(sub, "upload", cmd_adapters_upload, "publish a PEFT adapter folder")
    q.add_argument("name")
    q.add_argument("folder", type=Path, help="folder with adapter_config.json and adapter_model.safetensors")
    command(sub, "delete", cmd_adapters_delete, "delete an adapter").add_argument("name")

    p = command(
        commands,
        "export",
        cmd_export,
        "download an adapter (or a weighted composition) for llama.cpp, Ollama or any runtime",
    )
    p.add_argument(
        "adapters",
        nargs="+",
        metavar="NAME[@VERSION][:WEIGHT]",
        help="one adapter, or several with weights for a composition (gguf, merged)",
    )
    p.add_argument(
        "--format",
        "-f",
        required=True,
        choices=["gguf", "merged", "peft"],
        help="gguf: a LoRA for llama.cpp --lora / Ollama ADAPTER; merged: a Hugging Face model folder "
        "with the adapter merged in; peft: the adapter folder as a zip",
    )
    p.add_argument("--out", "-o", required=True, type=Path, help="a .gguf file, a folder (merged) or a .zip")

    p = command(
        commands,
        "jobs",
        cmd_jobs_list,
        "list, show, follow, cancel, pause or resume training jobs, or print their logs",
    )
    p.add_argument(
        "--status", help="only jobs in this status (queued, running, paused, succeeded, failed, cancelled)"
    )
    sub = p.add_subparsers(title="actions", metavar="ACTION")
    q = command(sub, "list", cmd_jobs_list, "list jobs")
    q.add_argument("--status", default=argparse.SUPPRESS, help="only jobs in this status")
    command(sub, "get", cmd_jobs_get, "show one job").add_argument("job_id")
    q = command(sub, "wait", cmd_jobs_wait, "follow a job until it ends")
    q.add_argument("job_id")
    q.add_argument("--no-progress", action="store_true")
    command(sub, "cancel", cmd_jobs_cancel, "cancel a queued or running job").add_argument("job_id")
    command(
        sub, "pause", cmd_jobs_pause, "pause a job: a running one checkpoints and frees its slot"
    ).add_argument("job_id")
    command(
        sub, "resume", cmd_jobs_resume, "queue a paused job again; it goes on from its checkpoint"
    ).add_argument("job_id")
    command(sub, "logs", cmd_jobs_logs, "print a job's training log").add_argument("job_id")

    p = command(commands, "datasets", cmd_datasets, "upload training rows for later jobs")
    sub = p.add_subparsers(title="actions", metavar="ACTION")
    command(sub, "upload", cmd_datasets_upload, "upload a .jsonl file").add_argument("path", type=Path)

    command(commands, "health", cmd_health, "check that the server answers")
    return parser


# ---------------------------------------------------------------- commands


def cmd_generate(client: Client, args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "raw": args.raw,
    }
    if not args.stream:
        result = client.generate(prompt, args.adapter, **params)
        _out(args, result, result.text)
        return
    with client.stream(prompt, args.adapter, **params) as stream:
        for delta in stream:
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
        if args.json:
            _print_json(
                {
                    "text": stream.text,
                    "finish_reason": stream.finish_reason,
                    "usage": stream.usage.model_dump() if stream.usage else None,
                }
            )
        else:
            sys.stdout.write("\n")


def cmd_train(client: Client, args: argparse.Namespace) -> None:
    if (args.data is None) == (args.dataset is None):
        raise ValueError("give a DATA file or --dataset ID (one of them)")
    config = load_config(args.config, args.overrides)
    job = client.train(
        args.adapter,
        args.data,
        dataset=args.dataset,
        config=config or None,
        overwrite=args.overwrite,
        validation=args.val,
        validation_dataset=args.val_dataset,
    )
    if not args.wait:
        _out(args, job.job, f"queued job {job.id} for adapter {job.adapter}")
        return
    if not args.json:
        print(f"queued job {job.id} for adapter {job.adapter}", file=sys.stderr)
    try:
        final = job.wait(progress=_progress(args))
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; job {job.id} keeps running (loraserve jobs wait|cancel {job.id})",
            file=sys.stderr,
        )
        raise
    prog = final.progress
    picked = (
        f", weights of step {prog.best_step}: eval loss {prog.best_eval_loss:.4f}"
        f" (the last evaluation {prog.last_eval_loss:.4f})"
        if prog
        and prog.selected == "best"
        and prog.best_eval_loss is not None
        and prog.last_eval_loss is not None
        else ""
    )
    _out(args, final, f"{final.status}: adapter {final.adapter} is ready (job {final.job_id}{picked})")


def cmd_adapters_list(client: Client, args: argparse.Namespace) -> None:
    adapters = client.adapters.list()
    rows = [
        [a.name, a.rank, a.alpha, _size(a.size_bytes), "yes" if a.loaded else "no", _when(a.created)]
        for a in adapters
    ]
    _out(args, adapters, _table(["NAME", "RANK", "ALPHA", "SIZE", "LOADED", "CREATED"], rows))


def cmd_adapters_get(client: Client, args: argparse.Namespace) -> None:
    info = client.adapters.get(args.name)
    _out(args, info, _fields(info))


def cmd_adapters_upload(client: Client, args: argparse.Namespace) -> None:
    info = client.adapters.upload(args.name, args.folder)
    _out(args, info, f"published adapter {info.name} (rank {info.rank}, {_size(info.size_bytes)})")


def cmd_adapters_delete(client: Client, args: argparse.Namespace) -> None:
    name = client.adapters.delete(args.name)
    _out(args, {"deleted": name}, f"deleted adapter {name}")


def cmd_export(client: Client, args: argparse.Namespace) -> None:
    adapters = args.adapters[0] if len(args.adapters) == 1 else args.adapters
    out = client.adapters.export(adapters, args.format, args.out)
    _out(args, {"format": args.format, "path": str(out)}, f"wrote {args.format} export to {out}")


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> None:
    jobs = client.jobs.list(status=args.status)
    rows = []
    for j in jobs:
        p = j.progress
        step = f"{p.step}/{p.total_steps}" if p is not None and p.step is not None else ""
        loss = f"{p.loss:.4f}" if p is not None and p.loss is not None else ""
        rows.append([j.job_id, j.adapter, j.status, step, loss, _when(j.created_at), j.error or ""])
    _out(args, jobs, _table(["JOB", "ADAPTER", "STATUS", "STEP", "LOSS", "CREATED", "ERROR"], rows))


def cmd_jobs_get(client: Client, args: argparse.Namespace) -> None:
    job = client.jobs.get(args.job_id)
    _out(args, job, _fields(job))


def cmd_jobs_wait(client: Client, args: argparse.Namespace) -> None:
    job = client.jobs.wait(args.job_id, progress=_progress(args))
    _out(args, job, describe_job(job))


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> None:
    job = client.jobs.cancel(args.job_id)
    note = (
        "cancelled"
        if job.status == "cancelled"
        else f"cancel requested ({job.status}, stops at the next step)"
    )
    _out(args, job, f"job {job.job_id}: {note}")


def cmd_jobs_pause(client: Client, args: argparse.Namespace) -> None:
    job = client.jobs.pause(args.job_id)
    note = (
        "paused"
        if job.status == "paused"
        else f"pause requested ({job.status}, checkpoints and stops at the next step)"
    )
    _out(args, job, f"job {job.job_id}: {note}")


def cmd_jobs_resume(client: Client, args: argparse.Namespace) -> None:
    job = client.jobs.resume(args.job_id)
    _out(args, job, f"job {job.job_id}: resumed ({job.status})")


def cmd_jobs_logs(client: Client, args: argparse.Namespace) -> None:
    text = client.jobs.logs(args.job_id)
    if args.json:
        _print_json({"job_id": args.job_id, "logs": text})
    else:
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def cmd_datasets(client: Client, args: argparse.Namespace) -> None:
    raise ValueError("datasets: choose an action: upload PATH")


def cmd_datasets_upload(client: Client, args: argparse.Namespace) -> None:
    ds = client.datasets.upload(args.path)
    _out(args, ds, f"uploaded dataset {ds.dataset} ({ds.rows} rows)")


def cmd_health(client: Client, args: argparse.Namespace) -> None:
    body = client.health()
    _out(args, body, f"{client.base_url}: {body.get('status', body)}")


# ---------------------------------------------------------------- helpers


def load_config(path: Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """A partial trainer config from ``--config FILE`` with ``--set a.b=VALUE`` applied on top."""
    config: dict[str, Any] = {}
    if path is not None:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ValueError(
                    f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON"
                ) from exc
            config = yaml.safe_load(text) or {}
        else:
            config = json.loads(text)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a config is a mapping of sections, e.g. {{'training': {{...}}}}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. training.num_train_epochs=5")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # plain text, e.g. a path or a module name
        node = config
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return config


def _progress(args: argparse.Namespace) -> bool | Callable[[Job], None]:
    if args.no_progress:
        return False
    if not args.json:
        return True
    last: list[str] = []

    def json_lines(job: Job) -> None:  # machines get one JSON line per change, on stderr
        line = job.model_dump_json()
        if not last or last[0] != line:
            print(line, file=sys.stderr, flush=True)
            last[:] = [line]

    return json_lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def _out(args: argparse.Namespace, value: Any, text: str) -> None:
    if args.json:
        _print_json(value)
    elif text:
        print(text)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "(none)"
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _fields(model: BaseModel) -> str:
    data = model.model_dump(mode="json")
    return "\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in data.items())


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


if __name__ == "__main__":
    sys.exit(main())

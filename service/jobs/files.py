"""Where a job's files live, and reading them while a trainer writes them.

Job files live in ``settings.jobs_root`` (``--jobs-dir``; by default the SQLite store's folder, or the
data dir with PostgreSQL), so every server and runner mounting it sees every job's files: on many hosts
it is a shared volume, and a runner taking a job over resumes from the checkpoints found here.

<jobs-root>/jobs/<job-id>/config.yaml     the full trainer config (defaults + the request's keys)
                          data.jsonl      the rows, one JSON object a line
                          val.jsonl       validation rows, if any (the trainer's --val, then a served eval)
                          fine_tuning.json  what POST /v1/fine_tuning/jobs asked for (that API's jobs only)
                          init_adapter/   a warm start's adapter (config + weights), copied at submit time
                          checkpoint_versions.json  checkpoints kept servable as adapter versions
                          checkpoints/    the trainer's resumable checkpoints
                          progress.jsonl  the trainer's JSON-lines progress (appended across resumes)
                          train.log       the trainer's stdout and stderr (appended across resumes)
                          yield           present while the runner asks the trainer to yield to serving
<jobs-root>/datasets/<dataset-id>.jsonl   uploaded datasets
                    <dataset-id>.json    the upload's filename and purpose (POST /v1/files)
<adapter-dir>/.staging/<job-id>/          the trainer's output, renamed to <adapter-dir>/<name> on success
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings

JOB_ID = re.compile(r"^job-[0-9a-f]{20}$")
DATASET_ID = re.compile(r"^ds-[0-9a-f]{20}$")


@dataclass(frozen=True)
class JobPaths:
    root: Path
    config: Path
    data: Path
    # validation rows; absent when the job has none (the trainer then holds out eval_fraction);
    # with them the job ends with a served evaluation
    val: Path
    fine_tuning: Path
    checkpoints: Path
    progress: Path
    log: Path
    output: Path  # the trainer's --output: a staging folder, published under the adapter's name
    yield_flag: Path  # the trainer's --yield-file: it pauses between steps while this exists
    init_adapter: Path  # a warm start's adapter, pinned at submit time: the trainer's --init-adapter
    checkpoint_versions: Path  # the checkpoints kept servable as versions (service.jobs.checkpoints)


def job_paths(settings: Settings, job_id: str) -> JobPaths:
    if not JOB_ID.match(job_id):  # ids become paths: never let one escape the jobs folder
        raise ValueError(f"bad job id {job_id!r}")
    root = settings.jobs_root / "jobs" / job_id
    return JobPaths(
        root=root,
        config=root / "config.yaml",
        data=root / "data.jsonl",
        val=root / "val.jsonl",
        fine_tuning=root / "fine_tuning.json",
        checkpoints=root / "checkpoints",
        progress=root / "progress.jsonl",
        log=root / "train.log",
        output=settings.staging_dir / job_id,
        yield_flag=root / "yield",
        init_adapter=root / "init_adapter",
        checkpoint_versions=root / "checkpoint_versions.json",
    )


def dataset_path(settings: Settings, dataset_id: str) -> Path:
    if not DATASET_ID.match(dataset_id):
        raise ValueError(f"bad dataset id {dataset_id!r}")
    return settings.jobs_root / "datasets" / f"{dataset_id}.jsonl"


def dataset_meta_path(settings: Settings, dataset_id: str) -> Path:
    """The upload's filename and purpose, beside the rows (only uploads through POST /v1/files have it)."""
    return dataset_path(settings, dataset_id).with_suffix(".json")


def read_progress(path: Path, offset: int) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Complete JSON lines after byte ``offset``: ([(end offset, event)], new offset).

    A line still being written (no newline yet) is left for the next call; a line that is not
    JSON (never expected) is skipped rather than stopping the reader.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    out: list[tuple[int, dict[str, Any]]] = []
    pos = offset
    for raw in chunk.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        pos += len(raw)
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append((pos, event))
    return out, pos


def tail_text(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a text file (whole lines where possible); '' if it does not exist."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    if size > max_bytes and b"\n" in data:
        data = data[data.index(b"\n") + 1 :]
    return data.decode("utf-8", errors="replace")

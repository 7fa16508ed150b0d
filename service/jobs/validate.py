"""Checks run before a job is queued, with the trainer's own models, so a bad row or key is a 422 now
rather than a failed job minutes later. Imports stay light: no torch in the API process."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from loracore.artifact import name_problem
from service.jobs.model import JobError
from service.settings import Settings
from trainer.text import find_lone_surrogate


def check_adapter_name(name: Any, param: str = "adapter") -> str:
    problem = name_problem(name)
    if problem:
        raise JobError("invalid_adapter_name", problem, param)
    return name


def check_config(raw: Any, settings: Settings):
    """The request's partial config merged onto the trainer's defaults (a ``trainer.config.TrainConfig``)."""
    from trainer.config import TrainConfig, parse_config
    from trainer.errors import TrainerError

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobError(
            "invalid_config", "config must be an object with 'lora' and 'training' sections", "config"
        )
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(["config", *(str(p) for p in first["loc"])])
        code = "unknown_config_key" if first["type"] == "extra_forbidden" else "invalid_config"
        try:  # the trainer's wording: unknown keys come with the list of known ones
            parse_config(raw, source="config")
            message = str(exc)
        except TrainerError as terr:
            message = str(terr)
        raise JobError(code, message, param) from None
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    wanted = training.get("model_name_or_path")
    if wanted is not None and wanted != settings.model:
        raise JobError(
            "invalid_config",
            f"config.training.model_name_or_path is {wanted!r}, but this server serves {settings.model!r}: "
            "adapters are trained on the served base; leave the key out",
            "config.training.model_name_or_path",
        )
    cfg.training.model_name_or_path = settings.model
    return cfg


def check_rows(
    rows: Any, param: str = "data", *, line_numbers: list[int] | None = None, method: str | None = None
) -> int:
    """Every row parses in one of the trainer's formats for ``method`` (``sft``: prompt/answer rows,
    ``dpo``: preference rows; None, an upload whose job is not known yet: either kind); returns how many
    there are.

    The 422 names the row as ``param[i]``; with ``line_numbers`` (uploads) the message also says
    which line of the file it was.
    """
    from trainer.data import parse_any_row, parse_for_method
    from trainer.errors import TrainerError

    def parse_row(row: Any, where: str) -> None:
        if method is None:
            parse_any_row(row, where)
        else:
            parse_for_method(row, where, method)

    if not isinstance(rows, list) or not rows:
        raise JobError("invalid_data", f"{param} must be a non-empty list of rows", param)
    for i, row in enumerate(rows):
        where = f"{param}[{i}]" + (f" (line {line_numbers[i]})" if line_numbers else "")
        hit = find_lone_surrogate(row, f"{param}[{i}]")
        if hit:
            line = f"line {line_numbers[i]}: " if line_numbers else ""
            raise JobError("invalid_text", line + hit.describe(), hit.param)
        try:
            parse_row(row, where)
        except TrainerError as exc:
            raise JobError("invalid_row", str(exc), f"{param}[{i}]") from None
    return len(rows)


def parse_jsonl(raw: bytes, param: str = "data") -> tuple[list[Any], list[int]]:
    """JSON lines (or one JSON array) -> (rows, 1-based line number of each row)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError("invalid_data", f"the upload is not UTF-8 text (byte {exc.start})", param) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError("invalid_json", f"line {exc.lineno}: invalid JSON ({exc.msg})", param) from None
        return rows, []
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise JobError(
                "invalid_json",
                f"line {lineno} ({param}[{len(rows)}]): invalid JSON ({exc.msg} at column {exc.colno})",
                f"{param}[{len(rows)}]",
            ) from None
        lines.append(lineno)
    return rows, lines


def to_jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")

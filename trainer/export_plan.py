"""What an export is, without torch: its formats, the adapters it takes, and the PEFT archive.

    gguf    a GGUF LoRA adapter for llama.cpp (``--lora``) and Ollama (``ADAPTER``), on the same base in GGUF
    merged  the base with the adapter (or a weighted composition) merged in: a Hugging Face model folder
    peft    the adapter folder as stored (PEFT's files and our record), zipped

An export takes one adapter (``name`` or ``name@<version>``) or a weighted composition of several, written
``name[@version][:weight]`` (the weight defaults to 1). A composition means what serving it means: the
LoRA term ``sum_i w_i * (alpha_i / r_i) * B_i A_i``. GGUF expresses it exactly by stacking the adapters'
ranks; a PEFT folder holds one adapter, so ``peft`` takes exactly one with weight 1.

Light on purpose (standard library only): the API process validates a request with it before it starts
``python -m trainer export`` (``trainer.export``, which needs torch) in a subprocess.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loracore import artifact
from trainer.errors import TrainerError

MAX_PARTS = 8  # as many adapters as a served composition may have
MAX_WEIGHT = 2.0  # |weight|, as in a served composition


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str  # the download's file name; {name} is the adapter (or the composition's first)
    media_type: str
    composes: bool  # can express a weighted composition of several adapters


FORMATS = {
    "gguf": ExportFormat("gguf", "{name}.gguf", "application/octet-stream", True),
    "merged": ExportFormat("merged", "{name}-merged.zip", "application/zip", True),
    "peft": ExportFormat("peft", "{name}-peft.zip", "application/zip", False),
}

# Hugging Face ``model_type`` -> (llama.cpp's architecture name, whether its converter permutes the rows of
# q_proj/k_proj for its RoPE layout: convert_hf_to_gguf.py, LlamaModel.permute).
GGUF_ARCHS = {
    "gpt2": ("gpt2", False),
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}


class ExportError(TrainerError):
    """An export that cannot be made; ``code`` and ``param`` let the API answer it as a 4xx."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int = 422):
        super().__init__(message)
        self.code, self.param, self.status = code, param, status


@dataclass(frozen=True)
class Part:
    """One adapter of an export and its weight in the composition."""

    ref: str  # name or name@<version id prefix>
    weight: float = 1.0

    def __str__(self) -> str:
        return self.ref if self.weight == 1.0 else f"{self.ref}:{self.weight:g}"


_PART_RE = re.compile(r"^(?P<ref>[^:\s]+)(?::(?P<weight>[^:\s]+))?$")


def get_format(name: str | None) -> ExportFormat:
    fmt = FORMATS.get(name or "")
    if fmt is None:
        raise ExportError(
            "invalid_export_format",
            f"unknown export format {name!r}: use one of {', '.join(FORMATS)}",
            "format",
        )
    return fmt


def parse_parts(texts: list[str], param: str = "adapters") -> list[Part]:
    """``["alpha:0.6", "beta@3f2a9c1e:0.4"]`` (or one comma-separated string) -> parts, checked."""
    items = [t.strip() for text in texts for t in text.split(",") if t.strip()]
    if not items:
        raise ExportError("invalid_adapters", "name at least one adapter to export", param)
    if len(items) > MAX_PARTS:
        raise ExportError("invalid_adapters", f"at most {MAX_PARTS} adapters in one export", param)
    parts: list[Part] = []
    for i, item in enumerate(items):
        where = f"{param}.{i}"
        m = _PART_RE.fullmatch(item)
        if m is None:
            raise ExportError("invalid_adapters", f"{item!r} is not name[@version][:weight]", where)
        problem = artifact.ref_problem(m["ref"])
        if problem:
            raise ExportError("invalid_adapter_name", problem, where)
        weight = 1.0
        if m["weight"] is not None:
            try:
                weight = float(m["weight"])
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise ExportError(
                    "invalid_adapters", f"the weight in {item!r} must be a number in [-2, 2]", where
                )
        if any(artifact.split_ref(p.ref)[0] == artifact.split_ref(m["ref"])[0] for p in parts):
            raise ExportError(
                "invalid_adapters", f"adapter {m['ref']!r} is listed twice: give it one weight", where
            )
        parts.append(Part(m["ref"], weight))
    return parts


def check_expressible(fmt: ExportFormat, parts: list[Part], base_model_type: str | None) -> None:
    """The format can hold these parts on this base, or ExportError says why not."""
    if not fmt.composes and (len(parts) != 1 or parts[0].weight != 1.0):
        raise ExportError(
            "export_unsupported",
            f"the {fmt.name} format holds one adapter as stored: export a composition (or a weight "
            f"other than 1) as gguf or merged",
            "adapters",
        )
    if fmt.name == "gguf" and base_model_type not in GGUF_ARCHS:
        raise ExportError(
            "export_unsupported",
            f"GGUF export knows the bases {', '.join(sorted(GGUF_ARCHS))}; this base is {base_model_type!r}",
            "format",
        )


def base_model_type(base: Path) -> str | None:
    try:
        return json.loads((Path(base) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_parts(adapter_dir: Path, parts: list[Part]) -> list[tuple[artifact.Version, float]]:
    """Each part's version folder, or ExportError (404) naming the one that is not there."""
    out = []
    for i, part in enumerate(parts):
        version = artifact.resolve(Path(adapter_dir), part.ref)
        if version is None:
            raise ExportError(
                "adapter_not_found", f"adapter {part.ref!r} does not exist", f"adapters.{i}", status=404
            )
        out.append((version, part.weight))
    return out


def download_name(fmt: ExportFormat, parts: list[Part]) -> str:
    name = artifact.split_ref(parts[0].ref)[0]
    return fmt.filename.format(name=name if len(parts) == 1 else f"{name}-mix")


def peft_zip(folder: Path) -> bytes:
    """The adapter folder's files (PEFT's two plus our record and summary), zipped in memory: an adapter
    is a few MB, and the request path writes nothing to disk."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in sorted(Path(folder).iterdir()):
            if entry.is_file():
                zf.write(entry, entry.name)
    return buf.getvalue()

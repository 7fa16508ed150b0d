"""The base model as the main process resolved it: shared by the assembly and the routes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServedModel:
    """The base as the main process resolved it (trainer.model.BaseSource) plus device and dtype."""

    name: str
    path: Path
    origin: str
    random_weights: bool
    device: str
    dtype: str

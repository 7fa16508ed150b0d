"""One runner per family: which runner serves a base's config, and its cache shape before loading."""

from __future__ import annotations

import os

from loracore.families import Family
from loracore.families import check_config as check_family

from .gpt2 import GPT2Runner
from .llama import LlamaRunner
from .model import DEFAULT_MAX_CONTEXT, CacheShape, SlotRunner


def runner_class(family: Family) -> type[SlotRunner]:
    return {"gpt2": GPT2Runner, "llama": LlamaRunner}[family.name]


def check_config(config) -> type[SlotRunner]:
    """The runner class for an HF config, or UnsupportedModel (one line) naming what is not served."""
    return runner_class(check_family(config.to_dict()))


def cache_shape(config, max_context: int | None = None) -> CacheShape:
    return check_config(config).cache_shape(config, max_context or DEFAULT_MAX_CONTEXT)


def make_runner(model, *, max_rows: int, max_context: int | None = None) -> SlotRunner:
    cls = check_config(model.config)
    runner = cls(model, max_rows=max_rows, max_context=max_context or DEFAULT_MAX_CONTEXT)
    if os.environ.get("LORASERVE_CUDA_GRAPHS") == "1":  # unmeasured, so off by default (graphs.py)
        runner.enable_graphs()
    return runner

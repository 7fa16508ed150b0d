"""Generation engine: continuous batching of many LoRA adapters on one base, any supported family
(see docs/engine.md).

    engine = Engine(model_path, adapter_dir)
    engine.add(GenerationRequest("r1", prompt_ids, "my-adapter", SamplingParams(temperature=0)))
    while engine.has_active():
        for event in engine.step().events: ...

One thread only: the worker loop owns the engine. ``step`` returns a StepReport (events + timings).
"""

from .engine import Engine
from .types import (
    AdapterCacheFull,
    AdapterNotFound,
    AdapterWeight,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
    StepReport,
    TokenEvent,
)

__all__ = [
    "AdapterCacheFull",
    "AdapterNotFound",
    "AdapterWeight",
    "Engine",
    "GenerationRequest",
    "PromptTooLong",
    "SamplingParams",
    "StepReport",
    "TokenEvent",
]

"""LoRA SFT trainer: PEFT adapters from a Hugging Face Accelerate loop.

Importing this package is cheap (the service imports ``loracore.template``); torch, transformers
and accelerate load only when training starts.

    from trainer import train_adapter
    summary = train_adapter("examples/prototype.yaml", "data.jsonl", "adapters/my-adapter")
"""

from __future__ import annotations

from typing import Any


def train_adapter(config: Any, data_path: Any, output: Any, **kwargs: Any) -> dict[str, Any]:
    """Train and publish an adapter; see ``trainer.loop.train_adapter`` for the arguments."""
    from trainer.loop import train_adapter as _train

    return _train(config, data_path, output, **kwargs)


__all__ = ["train_adapter"]

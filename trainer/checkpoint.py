"""Resumable checkpoints: adapter + optimizer + scheduler + grad scaler + RNG + data position.

Layout of one checkpoint (the base model is never copied; resuming needs the same base):
    <checkpoint-dir>/checkpoint-0000120/
        adapter_config.json, adapter_model.safetensors   the LoRA weights (PEFT format)
        optimizer.pt, scheduler.pt, scaler.pt            scaler only under fp16
        rng_state_<rank>.pt                              python, numpy, torch (and CUDA) RNG per process
        trainer_state.json                               RunState: step, totals, eval history, fingerprints
        best_adapter_model.safetensors                   the LoRA weights of the best evaluation so far
A checkpoint is written to ``.tmp-checkpoint-…`` and renamed in, so a crash while saving never
leaves a half checkpoint that ``--resume`` would pick up. Only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from loracore.artifact import WEIGHTS_FILE
from trainer.errors import TrainerError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS_FILE = "best_adapter_model.safetensors"  # same keys as WEIGHTS_FILE


@dataclass
class RunState:
    """Everything a run carries from step to step besides weights and optimizer: what a checkpoint
    stores in ``trainer_state.json`` (one JSON key per field, unchanged since the format began as a
    plain dict, so older checkpoints resume), and what the summary is made from."""

    # the plan and what it must match on resume
    total_steps: int
    steps_per_epoch: int
    world_size: int
    config_fingerprint: str
    data_sha256: str
    # progress; the data position is the step (epoch and window follow from it)
    step: int = 0
    loss_sum: float = 0.0  # of per-step mean token losses, for the summary's train_loss
    loss_count: int = 0
    last_loss: float | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval_loss"}
    best_eval_loss: float | None = None
    best_step: int | None = None  # the step of best_eval_loss
    evals_without_improvement: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0  # fp16 overflow: the scaler lowered its scale instead of stepping
    tokens: int = 0  # non-pad tokens trained on
    padded_tokens: int = 0  # tokens including padding
    target_tokens: int = 0  # tokens the loss was computed on
    train_seconds: float = 0.0  # time in the loop, summed over resumed runs
    # The trainable weights (CPU copies, PEFT state-dict keys) at best_step; a checkpoint stores them in
    # BEST_WEIGHTS_FILE, not in trainer_state.json.
    best_weights: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, best_weights=None))
        del data["best_weights"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(1, self.loss_count)

    @property
    def eval_loss(self) -> float | None:
        """The last evaluation's loss."""
        return self.eval_history[-1]["eval_loss"] if self.eval_history else None

    def metrics_of(self, step: int | None) -> dict[str, Any] | None:
        """The metrics of the evaluation at ``step`` (None: the last one), without step and loss."""
        found = [e for e in self.eval_history if step is None or e["step"] == step]
        if not found:
            return None
        return {k: v for k, v in found[-1].items() if k not in ("step", "eval_loss")}

    def add_step(
        self, loss: float, *, tokens: int, padded_tokens: int, target_tokens: int, skipped: bool
    ) -> None:
        self.step += 1
        self.loss_sum += loss
        self.loss_count += 1
        self.last_loss = loss
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        self.target_tokens += target_tokens
        self.skipped_steps += int(skipped)

    def add_eval(self, loss: float, metrics: dict[str, float] | None = None) -> bool:
        """Record an evaluation (with the method's metrics, DPO's preference ones); True when it is the
        best so far (the caller then keeps the weights)."""
        self.eval_history.append({"step": self.step, "eval_loss": loss, **(metrics or {})})
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step, self.evals_without_improvement = loss, self.step, 0
            return True
        self.evals_without_improvement += 1
        return False


def _rng_state() -> dict[str, Any]:
    """Every RNG as tensors, ints and tuples only, so ``torch.load(weights_only=True)`` reads it back
    (no pickle of arbitrary objects, not even for our own files)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    root: Path,
    *,
    accelerator,
    model,
    optimizer,
    scheduler,
    state: RunState,
    keep: int,
) -> Path:
    """Write a checkpoint for ``state.step`` (every process calls this; each writes its RNG)."""
    import torch

    step = state.step
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if state.best_weights is not None:
            from safetensors.torch import save_file

            save_file(state.best_weights, str(tmp / BEST_WEIGHTS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from loracore.atomic import publish_dir

        publish_dir(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(ckpt: Path) -> RunState:
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise TrainerError(f"{ckpt} is not a trainer checkpoint (no {STATE_FILE})")
    return RunState.from_dict(json.loads(path.read_text()))


def load_checkpoint(ckpt: Path, *, accelerator, model, optimizer, scheduler) -> RunState:
    """Restore everything ``save_checkpoint`` wrote into live objects; returns the trainer state."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_state(ckpt)
    if (ckpt / BEST_WEIGHTS_FILE).is_file():
        state.best_weights = load_file(str(ckpt / BEST_WEIGHTS_FILE))
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise TrainerError(f"{ckpt}: adapter weights do not fit this model ({missing[0]} ...)")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (ckpt / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
    rng_file = ckpt / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        try:
            rng = torch.load(rng_file, weights_only=True)
        except Exception as exc:  # written by an older trainer as a general pickle: never unpickled
            print(f"warning: {rng_file} needs unpickling ({exc}); RNG state not restored", file=sys.stderr)
        else:
            _set_rng_state(rng)
    return state

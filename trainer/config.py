"""Training configuration: a YAML file with ``lora:`` and ``training:`` sections, validated by pydantic.

The prototype's file works unchanged; every other knob has a default. Unknown keys are errors
(a typo must not silently fall back to a default). Dotted overrides (``--set training.seed=3``)
are merged into the raw mapping and validated together with the file.

    from trainer.config import load_config
    cfg = load_config("examples/prototype.yaml", overrides=["training.learning_rate=1e-4"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import TrainerError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """What PEFT's ``LoraConfig`` receives. Defaults are the prototype's."""

    r: int = Field(32, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float = Field(64, gt=0, description="scale is lora_alpha / r (or / sqrt(r) with use_rslora)")
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    # Suffix match: on GPT-2 "c_proj" hits both attn.c_proj and mlp.c_proj. "all-linear" adds mlp.c_fc.
    # None: the base family's default (loracore.families): GPT-2 c_attn + c_proj (the prototype's),
    # Llama family every linear layer (q/k/v/o_proj, gate/up/down_proj).
    target_modules: list[str] | Literal["all-linear"] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = Field(
        False,
        description="DoRA (PEFT's): a learned magnitude per output beside the LoRA direction; served per row",
    )
    # None = decide from the model: True for GPT-2's Conv1D layers (weights stored fan_in x fan_out).
    fan_in_fan_out: bool | None = None


class TrainingSettings(_Section):
    """The loop's settings. Names follow Hugging Face ``TrainingArguments`` where one exists."""

    model_name_or_path: str = "distilgpt2"
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: learn the answers; dpo: learn to prefer 'chosen' over 'rejected' (preference rows)",
    )
    dpo_beta: float = Field(
        0.1, gt=0, description="DPO's beta: how far the policy may move from the reference (TRL's default)"
    )
    num_train_epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (overrides epochs)"
    )
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="fraction of steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio when set")
    max_seq_length: int = Field(512, ge=8, description="longer rows are cut at the end (capped by the model)")
    group_by_length: bool = True
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="held out when no validation rows are given (none is held out then)"
    )
    eval_steps: int | None = Field(
        None, ge=1, description="evaluate every N steps as well as after each epoch"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a better eval loss"
    )
    select: Literal["best", "last"] = Field(
        "best",
        description="publish the weights of the evaluation with the lowest eval loss, or the last step's "
        "(without eval rows the last step's either way)",
    )
    save_steps: int = Field(200, ge=0, description="checkpoint every N optimizer steps; 0 = only on signals")
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(1, ge=1, description="progress events every N optimizer steps")

    @model_validator(mode="after")
    def _one_precision(self) -> TrainingSettings:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are both true; choose one")
        return self


class TrainConfig(_Section):
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """A hash of every setting that changes the trained weights (checked on resume)."""
        data = self.to_dict()
        if (
            data["training"]["method"] == "sft"
        ):  # keys added with DPO: SFT checkpoints made before still resume
            del data["training"]["method"], data["training"]["dpo_beta"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _describe(err: ValidationError) -> str:
    """One line per problem, naming the key: unknown keys get the list of known ones."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            section = _section_model(e["loc"][:-1])
            known = ", ".join(section.model_fields) if section else ""
            problems.append(f"unknown key '{key}'" + (f" (known: {known})" if known else ""))
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(problems)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``training.learning_rate=1e-4`` -> raw["training"]["learning_rate"] = 1e-4 (value parsed as YAML)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise TrainerError(f"bad --set {assignment!r}: expected key=value, e.g. training.learning_rate=1e-4")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainerError(f"bad --set {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def parse_config(raw: Any, *, source: str = "config", overrides: list[str] | None = None) -> TrainConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainerError(f"{source}: expected a mapping with 'lora:' and 'training:' sections")
    raw = json.loads(json.dumps(raw))  # deep copy; overrides must not change the caller's dict
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise TrainerError(f"{source}: {_describe(exc)}") from None


def load_config(path: str | Path | None, *, overrides: list[str] | None = None) -> TrainConfig:
    """Read and validate a YAML config file (``None``: defaults only) plus dotted overrides."""
    if path is None:
        return parse_config({}, overrides=overrides)
    p = Path(path)
    if not p.is_file():
        raise TrainerError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise TrainerError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_config(raw, source=str(p), overrides=overrides)

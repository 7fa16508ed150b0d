"""Everything before the first optimizer step: inputs, precision, model, data, optimizer, Accelerate.

    inputs = resolve_inputs(config, data_path, output, ...)   # cheap: a typo fails before any model loads
    run = setup(inputs)                                        # base + LoRA, tokenized rows, the plan
    state = start_state(run)                                   # step 0, or the checkpoint's state

Precision has two names for its two meanings: ``requested_precision`` is what the config asks for
(``fp16``/``bf16``/``fp32``), ``autocast_dtype`` what this machine trains in (the same three words;
it is also the summary's and the progress stream's ``precision``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracore import artifact
from loracore.template import DEFAULT_TEMPLATE, PromptTemplate, base_chat_template
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig, load_config, parse_config
from trainer.data import (
    Example,
    PairRow,
    PreferenceExample,
    Row,
    read_examples,
    split_holdout,
    tokenize_all,
    tokenize_pairs,
)
from trainer.errors import TrainerError
from trainer.hardware import cpu_has_native_bf16

log = logging.getLogger("trainer")


@dataclass
class Inputs:
    """The run's inputs, checked: config, data, output, checkpoints. No model has been touched."""

    cfg: TrainConfig
    output: Path  # absolute
    data_path: Path
    val_path: Path | None
    train_examples: list[Example] | list[PreferenceExample]
    val_examples: list[Example] | list[PreferenceExample] | None
    data_sha256: str  # of the training file, then the validation file
    ckpt_root: Path
    ckpt_root_is_default: bool  # a default checkpoint folder is removed after a successful run
    resume_from: Path | None
    allow_random_weights: bool
    job: str | None  # recorded in loraserve.json
    template: PromptTemplate  # the rows were rendered with it; recorded in loraserve.json for serving
    init_adapter: Path | None = None  # a warm start: the adapter folder whose weights the run starts from


@dataclass
class Setup:
    """What ``fit`` needs: the prepared model and optimizer, the rows, and the plan of steps."""

    inputs: Inputs
    base: Any  # trainer.model.BaseSource
    accelerator: Any
    net: Any  # the PEFT model, prepared by Accelerate
    optimizer: Any
    scheduler: Any  # stepped by us, once per optimizer step (not prepared)
    params: list  # trainable parameters, for clipping
    train_rows: list[Row] | list[PairRow]  # PairRow under method dpo
    eval_rows: list[Row] | list[PairRow]
    pad_id: int
    trainable_params: int
    total_params: int
    window_size: int  # micro-batches per optimizer step: accumulation x processes
    steps_per_epoch: int
    total_steps: int
    autocast_dtype: str  # "fp32" | "fp16" | "bf16": what training computes in
    started: float  # time.time() when the model work began (the summary's wall time)
    # DPO: the reference's (chosen, rejected) log-probabilities per train / eval pair (trainer.dpo)
    ref_train: list[tuple[float, float]] = field(default_factory=list)
    ref_eval: list[tuple[float, float]] = field(default_factory=list)
    base_record: dict | None = None  # the base's shape and name, for the adapter's record
    template: Any = DEFAULT_TEMPLATE  # what rendered the rows: the base's chat template, else the default

    @property
    def cfg(self) -> TrainConfig:
        return self.inputs.cfg

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def resolve_config(config: Any, overrides: list[str] | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return parse_config(config.to_dict(), overrides=overrides)
    if isinstance(config, dict):
        return parse_config(config, overrides=overrides)
    return load_config(config, overrides=overrides)


def resolve_inputs(
    config: Any,
    data_path: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    val_path: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: str | Path | bool | None = None,
    checkpoint_dir: str | Path | None = None,
    allow_random_weights: bool = False,
    job: str | None = None,
    init_adapter: str | Path | None = None,
    template: PromptTemplate | None = None,
) -> Inputs:
    """Config, data rows, output and checkpoint paths, checked before anything heavy is loaded."""
    overrides = list(overrides or [])
    if model:
        overrides.append(f"training.model_name_or_path={model}")
    cfg = resolve_config(config, overrides)
    data_path = Path(data_path)
    val = Path(val_path) if val_path else None
    method = cfg.training.method
    template = template or DEFAULT_TEMPLATE
    train_examples = read_examples(data_path, template, method)
    val_examples = read_examples(val, template, method) if val else None
    init = Path(init_adapter) if init_adapter else None
    if init is not None:
        check_init_adapter(init, cfg)
    data_sha256 = artifact.file_sha256(data_path, val)
    output = Path(output).absolute()
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else output.parent / ".checkpoints" / output.name
    resume_from: Path | None = None
    if resume:
        resume_from = ckpt.latest_checkpoint(ckpt_root) if resume is True else Path(resume)
        if resume_from is None:
            raise TrainerError(f"--resume: no checkpoint found in {ckpt_root}")
        saved = ckpt.read_state(resume_from)  # fails early on a folder that is not a checkpoint
        if saved.data_sha256 != data_sha256:
            raise TrainerError(f"--resume: {resume_from} was trained on different data")
    return Inputs(
        cfg=cfg,
        output=output,
        data_path=data_path,
        val_path=val,
        train_examples=train_examples,
        val_examples=val_examples,
        data_sha256=data_sha256,
        ckpt_root=ckpt_root,
        ckpt_root_is_default=checkpoint_dir is None,
        resume_from=resume_from,
        allow_random_weights=allow_random_weights,
        job=job,
        template=template,
        init_adapter=init,
    )


def check_init_adapter(folder: Path, cfg: TrainConfig) -> None:
    """A warm start's adapter must be a LoRA of the same shape as the one this config trains: same rank,
    scale and target modules (the base is checked when its weights load)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file() or not (folder / artifact.WEIGHTS_FILE).is_file():
        raise TrainerError(
            f"--init-adapter: {folder} is not an adapter folder (adapter_config.json + weights)"
        )
    import json

    theirs = json.loads(config_file.read_text())
    lora = cfg.lora
    want = {
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
    }
    for key, value in want.items():
        if theirs.get(key, False if key.startswith("use_") else None) != value:
            raise TrainerError(
                f"--init-adapter: {folder.name} has lora {key} {theirs.get(key)!r}, this config {value!r}"
            )
    targets = theirs.get("target_modules")
    if lora.target_modules != "all-linear" and sorted(targets or []) != sorted(lora.target_modules):
        raise TrainerError(
            f"--init-adapter: {folder.name} targets {targets!r}, this config {lora.target_modules!r}"
        )


# ----------------------------------------------------------------------------- precision


def requested_precision(cfg: TrainConfig) -> str:
    return "fp16" if cfg.training.fp16 else "bf16" if cfg.training.bf16 else "fp32"


def choose_autocast(cfg: TrainConfig) -> str:
    """The dtype this config trains in on this machine: "fp32", "fp16" or "bf16".

    CUDA: fp16 (autocast + loss scaling), or bf16 where the GPU has it. CPU: bf16 autocast where the
    CPU computes bf16 natively, for ``bf16`` and also for ``fp16``: CPUs have no fast fp16 matmul
    (fp16 autocast measured 37x slower than fp32 here, and Accelerate quietly trains fp16 configs in
    fp32 on CPU), while native bf16 made a distilgpt2 LoRA step 1.5x faster. fp32 otherwise.
    """
    import torch

    asked = requested_precision(cfg)
    if asked == "fp32":
        return "fp32"
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    if torch.cuda.is_available() and not use_cpu:
        if asked == "fp16":
            return "fp16"
        if torch.cuda.is_bf16_supported():
            return "bf16"
        log.warning("bf16 requested but this GPU lacks bf16: training in fp32")
        return "fp32"
    if cpu_has_native_bf16():
        if asked == "fp16":
            log.info("fp16 requested on a CPU: this CPU has native bf16, so training uses bf16 autocast")
        return "bf16"
    log.warning("%s requested but this CPU has no native half precision: training in fp32", asked)
    return "fp32"


def _mixed_precision(autocast_dtype: str) -> str:
    """Accelerate's name for it."""
    return "no" if autocast_dtype == "fp32" else autocast_dtype


def _allow_precision_change(mixed_precision: str) -> None:
    """Let one process train again with another precision (e.g. an fp32 run after a bf16 one).

    Accelerate keeps the first Accelerator's mixed precision process-wide and refuses a different
    one later. In a single process nothing else depends on that state, so it is dropped; distributed
    state (PartialState) is left alone, and a distributed run still gets Accelerate's own error.
    """
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


# ----------------------------------------------------------------------------- setup


def setup(inputs: Inputs, started: float) -> Setup:
    """Base model, Accelerate, tokenized rows, LoRA, the step plan, optimizer and scheduler."""
    from loracore.families import UnsupportedBase, base_shape, family_of_folder
    from trainer.model import add_lora, count_parameters, load_base_model, load_tokenizer, resolve_base

    cfg, t = inputs.cfg, inputs.cfg.training
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, only the main process talks
        logging.getLogger().setLevel(logging.WARNING)
    # --- the base model's folder (a wrong path is a one-line error, like any other bad input)
    name = t.model_name_or_path
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise TrainerError(f"base model folder not found: {name}")
    try:
        base = resolve_base(name, allow_random=inputs.allow_random_weights)
    except Exception as exc:  # ModelSourceError and friends: one line for the user
        raise TrainerError(str(exc)) from None
    try:
        family_of_folder(base.path)
    except UnsupportedBase as exc:
        raise TrainerError(str(exc)) from None
    # rows are rendered with the base's own chat template when it has one (what serving uses too)
    template = base_chat_template(base.path) or inputs.template
    train_examples, val_examples = inputs.train_examples, inputs.val_examples
    if template is not inputs.template:
        try:
            train_examples = read_examples(inputs.data_path, template, t.method)
            val_examples = read_examples(inputs.val_path, template, t.method) if inputs.val_path else None
        except ValueError as exc:
            raise TrainerError(f"the base's chat template cannot render the rows: {exc}") from None

    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from transformers import get_scheduler

    _quiet_libraries()
    if os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        log.warning(
            "accelerate launch started a single process (--cpu needs mpirun for more); "
            "for N CPU processes: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
    # --- precision and Accelerate. Sync points are set per window by the loop (windows at an epoch's
    # end can be short), never by the dataloader.
    mixed_precision = _mixed_precision(choose_autocast(cfg))
    _allow_precision_change(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    autocast_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[accelerator.mixed_precision]
    world = accelerator.num_processes
    set_seed(t.seed)

    # --- tokenizer, base weights, data
    tokenizer = load_tokenizer(base.path)
    base_model = load_base_model(base.path)
    context = getattr(base_model.config, "n_positions", None) or getattr(
        base_model.config, "max_position_embeddings", t.max_seq_length
    )
    max_len = min(t.max_seq_length, context)
    tokenize_rows = tokenize_pairs if t.method == "dpo" else tokenize_all
    train_rows = tokenize_rows(train_examples, tokenizer, max_len, name=str(inputs.data_path))
    if val_examples is not None:
        eval_rows = tokenize_rows(val_examples, tokenizer, max_len, name=str(inputs.val_path))
    else:
        train_rows, eval_rows = split_holdout(train_rows, t.eval_fraction, t.seed)

    # --- LoRA: fresh, or a warm start's weights
    peft_model = add_lora(base_model, cfg.lora, gradient_checkpointing=t.gradient_checkpointing)
    if inputs.init_adapter is not None:
        load_init_adapter(peft_model, inputs.init_adapter)
    if t.method == "dpo":  # TRL's disable_dropout: the policy and its reference see one network
        from trainer.dpo import disable_dropout

        disable_dropout(peft_model)
    trainable, total = count_parameters(peft_model)
    log.info("trainable params: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # --- plan: windows per epoch are the same every epoch (only their order changes)
    micro_per_epoch = math.ceil(len(train_rows) / t.per_device_train_batch_size)
    window_size = t.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(micro_per_epoch / window_size)
    total_steps = t.max_steps or steps_per_epoch * t.num_train_epochs
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    log.info(
        "%d train rows, %d eval rows; %d steps (%d per epoch), batch %d x accumulation %d x %d process(es); "
        "%s on %s",
        len(train_rows),
        len(eval_rows),
        total_steps,
        steps_per_epoch,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        world,
        autocast_dtype,
        accelerator.device,
    )

    # --- optimizer (no weight decay on biases) and scheduler
    decay = [p for n, p in peft_model.named_parameters() if p.requires_grad and "bias" not in n]
    no_decay = [p for n, p in peft_model.named_parameters() if p.requires_grad and "bias" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )
    # Not prepared: we step it once per optimizer step ourselves (a prepared one steps once per process).
    scheduler = get_scheduler(
        t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    net, optimizer = accelerator.prepare(peft_model, optimizer)
    ref_train: list[tuple[float, float]] = []
    ref_eval: list[tuple[float, float]] = []
    if t.method == "dpo":  # the reference: the weights the run starts from, before any step
        from trainer.dpo import reference_logps

        adapter_on = inputs.init_adapter is not None
        ref_train, ref_eval = (
            reference_logps(
                accelerator,
                net,
                rows,
                t.per_device_eval_batch_size,
                tokenizer.pad_token_id,
                adapter_on=adapter_on,
            )
            for rows in (train_rows, eval_rows)
        )
    return Setup(
        inputs=inputs,
        base=base,
        accelerator=accelerator,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for p in net.parameters() if p.requires_grad],
        train_rows=train_rows,
        eval_rows=eval_rows,
        pad_id=tokenizer.pad_token_id,
        trainable_params=trainable,
        total_params=total,
        window_size=window_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        autocast_dtype=autocast_dtype,
        started=started,
        ref_train=ref_train,
        ref_eval=ref_eval,
        base_record={**base_shape(base_model.config.to_dict()), "name": name},
        template=template,
    )


def load_init_adapter(peft_model, folder: Path) -> None:
    """Put a warm start's LoRA weights into the freshly wrapped model (same shape: ``check_init_adapter``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        result = set_peft_model_state_dict(peft_model, load_file(str(folder / artifact.WEIGHTS_FILE)))
    except RuntimeError as exc:  # tensor shapes of another base
        raise TrainerError(
            f"--init-adapter: {folder.name} does not fit this base ({exc})".splitlines()[0]
        ) from None
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise TrainerError(f"--init-adapter: {folder.name} does not fit this base ({unexpected[0]} ...)")
    log.info("starting from the weights of %s", folder)


def start_state(run: Setup) -> ckpt.RunState:
    """A fresh run state, or the one a ``--resume`` checkpoint holds (weights and optimizer restored too)."""
    fresh = ckpt.RunState(
        total_steps=run.total_steps,
        steps_per_epoch=run.steps_per_epoch,
        world_size=run.world,
        config_fingerprint=run.cfg.fingerprint(),
        data_sha256=run.inputs.data_sha256,
    )
    resume_from = run.inputs.resume_from
    if resume_from is None:
        return fresh
    saved = ckpt.load_checkpoint(
        resume_from,
        accelerator=run.accelerator,
        model=run.net,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
    )
    if saved.config_fingerprint != fresh.config_fingerprint or saved.world_size != fresh.world_size:
        raise TrainerError(f"--resume: {resume_from} was made with another config or number of processes")
    log.info("resumed from %s at step %d", resume_from, saved.step)
    return saved

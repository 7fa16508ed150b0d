"""The training loop: one function, read top to bottom, from config to published adapter.

    python -m trainer train --config examples/prototype.yaml --data examples/sample_instructions.jsonl \\
        --output runs/adapters/demo
    accelerate launch --num_processes 2 --cpu -m trainer train ...      # DDP, one adapter written

Order of work: validate inputs (config, data files) before touching a model -> pick precision ->
load base + tokenizer, tokenize -> add LoRA -> plan steps -> (resume) -> train with token-normalised
gradient accumulation -> evaluate -> stage the adapter folder -> verify -> rename into place
(``trainer.artifact``).

Gradient accumulation, precisely: an optimizer step consumes one *window* of micro-batches
(``gradient_accumulation_steps`` per process x processes). The window's micro-batches are known in
advance (the epoch's batch order is a pure function of seed and epoch), so the loss of every
micro-batch is its summed token cross-entropy divided by the target tokens of the whole window.
The gradient is then exactly that of the mean token loss over the window, however long or short
each answer is, instead of a mean of per-batch means.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import artifact
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig, load_config, parse_config
from trainer.data import Row, collate, epoch_batches, read_examples, split_holdout, tokenize_all
from trainer.errors import TrainerError, TrainingInterrupted
from trainer.hardware import cpu_has_native_bf16
from trainer.progress import Progress
from trainer.template import DEFAULT_TEMPLATE

log = logging.getLogger("trainer")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- small helpers


def resolve_config(config: Any, overrides: list[str] | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return parse_config(config.to_dict(), overrides=overrides)
    if isinstance(config, dict):
        return parse_config(config, overrides=overrides)
    return load_config(config, overrides=overrides)


def _allow_precision_change(precision: str) -> None:
    """Let one process train again with another precision (e.g. an fp32 run after a bf16 one).

    Accelerate keeps the first Accelerator's mixed precision process-wide and refuses a different
    one later. In a single process nothing else depends on that state, so it is dropped; distributed
    state (PartialState) is left alone, and a distributed run still gets Accelerate's own error.
    """
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def choose_precision(cfg: TrainConfig) -> str:
    """Accelerate's mixed_precision for this config on this machine.

    CUDA: fp16 (autocast + loss scaling), or bf16 where the GPU has it. CPU: bf16 autocast where the
    CPU computes bf16 natively, for ``bf16`` and also for ``fp16``: CPUs have no fast fp16 matmul
    (fp16 autocast measured 37x slower than fp32 here, and Accelerate quietly trains fp16 configs in
    fp32 on CPU), while native bf16 made a distilgpt2 LoRA step 1.5x faster. fp32 otherwise.
    """
    import torch

    t = cfg.training
    if not (t.fp16 or t.bf16):
        return "no"
    asked = "fp16" if t.fp16 else "bf16"
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() not in (
        "1",
        "true",
    )
    if cuda:
        if t.fp16:
            return "fp16"
        if torch.cuda.is_bf16_supported():
            return "bf16"
        log.warning("bf16 requested but this GPU lacks bf16: training in fp32")
        return "no"
    if cpu_has_native_bf16():
        if t.fp16:
            log.info("fp16 requested on a CPU: this CPU has native bf16, so training uses bf16 autocast")
        return "bf16"
    log.warning("%s requested but this CPU has no native half precision: training in fp32", asked)
    return "no"


def token_loss_sum(model, batch: dict):
    """Summed cross-entropy over target positions (labels != -100), computed in fp32.

    Position t predicts token t+1, so the vocabulary projection runs only where the *next* label
    is a target (a boolean ``logits_to_keep``): prompt and padding positions never reach the
    50k-wide head, which is most of the compute of a small model.
    """
    import torch
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = targets != -100
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets[targets != -100], reduction="sum"
    )


def evaluate_loss(accelerator, model, rows: list[Row], batch_size: int, pad_id: int) -> float:
    """Mean loss per target token over ``rows`` (sharded across processes, summed back)."""
    import torch

    if not rows:
        return float("nan")
    net = accelerator.unwrap_model(model)  # no DDP here: processes run different numbers of batches
    mine = sorted(
        rows[accelerator.process_index :: accelerator.num_processes], key=lambda r: len(r.input_ids)
    )
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    net.eval()
    with torch.no_grad(), accelerator.autocast():
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id).items()}
            total[0] += token_loss_sum(net, batch).double()
            total[1] += sum(r.n_targets for r in chunk)
    net.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@dataclass
class Window:
    """One optimizer step's micro-batches (global view) and their token counts."""

    batches: list[list[int]]
    target_tokens: int
    tokens: int  # non-pad tokens
    padded_tokens: int  # tokens including padding (rows x longest row)


def plan_windows(rows: list[Row], batches: list[list[int]], size: int) -> list[Window]:
    out = []
    for start in range(0, len(batches), size):
        group = batches[start : start + size]
        out.append(
            Window(
                batches=group,
                target_tokens=sum(rows[i].n_targets for b in group for i in b),
                tokens=sum(len(rows[i].input_ids) for b in group for i in b),
                padded_tokens=sum(len(b) * max(len(rows[i].input_ids) for i in b) for b in group),
            )
        )
    return out


def train_window(
    accelerator,
    net,
    optimizer,
    window: Window,
    rows: list[Row],
    pad_id: int,
    *,
    params: list,
    max_grad_norm: float,
    precision: str,
    step: int,
) -> tuple[float, float, bool]:
    """One optimizer step over one window: (mean token loss, gradient norm, skipped by fp16 scaling).

    This process runs its share of the window's micro-batches (every N-th of N processes). DDP needs
    every process to run the same number of micro-steps, so a short share is topped up with a
    zero-weight batch. ``accelerate.accumulate`` skips gradient sync until the k-th micro-step.
    """
    import torch

    world = accelerator.num_processes
    mine = window.batches[accelerator.process_index :: world]
    k = math.ceil(len(window.batches) / world)
    accelerator.gradient_accumulation_steps = k
    accelerator.step = 0  # count micro-steps from the start of this window: sync on the k-th
    pad_multiple = 8 if precision == "fp16" else None  # tensor-core friendly widths, still per batch
    loss_sum = torch.zeros((), device=accelerator.device)
    loss = grad_norm = float("nan")
    for i in range(k):
        idx, weight = (mine[i], 1.0) if i < len(mine) else (window.batches[0], 0.0)
        batch = collate([rows[j] for j in idx], pad_id, pad_multiple)
        batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        with accelerator.accumulate(net):
            summed = token_loss_sum(net, batch) * weight
            # backward() divides by k and DDP averages over processes; undo both so the gradient is
            # that of (the window's summed token loss) / (the window's target tokens).
            accelerator.backward(summed * (k * world / window.target_tokens))
            loss_sum += summed.detach()
            if accelerator.sync_gradients:
                loss = float(accelerator.reduce(loss_sum, reduction="sum")) / window.target_tokens
                if not math.isfinite(loss):  # the watchdog: never step on a NaN/inf loss
                    raise TrainerError(
                        f"loss became {loss} at step {step}; lower training.learning_rate or use fp32/bf16"
                    )
                grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
                if not math.isfinite(grad_norm) and precision != "fp16":  # under fp16 the scaler skips it
                    raise TrainerError(f"gradient norm became {grad_norm} at step {step}")
            optimizer.step()  # step and zero_grad are no-ops until the window's last micro-step
            optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, accelerator.optimizer_step_was_skipped


class StopRequest:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, exit. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread; the caller owns them then
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping", self.signal_name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


# ----------------------------------------------------------------------------- the run


def train_adapter(
    config: Any,
    data_path: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    val_path: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: str | Path | bool | None = None,
    checkpoint_dir: str | Path | None = None,
    progress_jsonl: str | Path | None = None,
    allow_random_weights: bool = False,
    job: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter and publish it at ``output``; returns the training summary.

    ``config`` is a YAML path, a dict or a ``TrainConfig``. ``resume`` is a checkpoint folder, or
    True for the newest one in the checkpoint folder. Raises ``TrainerError`` for bad input
    (nothing is written under ``output``) and ``TrainingInterrupted`` after a signal.
    """
    # Only the main process reports; under `accelerate launch` RANK is set before anything starts.
    progress = progress or Progress(jsonl=progress_jsonl, enabled=os.environ.get("RANK", "0") == "0")
    try:
        return _run(
            config,
            data_path,
            output,
            model=model,
            val_path=val_path,
            overrides=overrides,
            resume=resume,
            checkpoint_dir=checkpoint_dir,
            allow_random_weights=allow_random_weights,
            job=job,
            progress=progress,
        )
    except BaseException as exc:
        msg = (
            str(exc)
            if isinstance(exc, (TrainerError, TrainingInterrupted))
            else f"{type(exc).__name__}: {exc}"
        )
        progress.emit(
            "error", message=msg, interrupted=isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
        )
        raise
    finally:
        progress.close()


def _run(
    config: Any,
    data_path: str | Path,
    output: str | Path,
    *,
    model: str | None,
    val_path: str | Path | None,
    overrides: list[str] | None,
    resume: str | Path | bool | None,
    checkpoint_dir: str | Path | None,
    allow_random_weights: bool,
    job: str | None,
    progress: Progress,
) -> dict[str, Any]:
    # --- inputs first: a typo must fail in a second, not after loading a model
    overrides = list(overrides or [])
    if model:
        overrides.append(f"training.model_name_or_path={model}")
    cfg = resolve_config(config, overrides)
    t = cfg.training
    output = Path(output).absolute()
    data_path = Path(data_path)
    train_examples = read_examples(data_path, DEFAULT_TEMPLATE)
    val_examples = read_examples(val_path, DEFAULT_TEMPLATE) if val_path else None
    data_hash = artifact.file_sha256(data_path, val_path)
    default_ckpt_dir = checkpoint_dir is None
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else output.parent / ".checkpoints" / output.name
    resume_from: Path | None = None
    if resume:
        resume_from = ckpt.latest_checkpoint(ckpt_root) if resume is True else Path(resume)
        if resume_from is None:
            raise TrainerError(f"--resume: no checkpoint found in {ckpt_root}")
        state = ckpt.read_state(resume_from)  # fails early on a folder that is not a checkpoint
        if state["data_sha256"] != data_hash:
            raise TrainerError(f"--resume: {resume_from} was trained on different data")

    from trainer.model import add_lora, count_parameters, load_base_model, load_tokenizer, resolve_base

    started = time.time()
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, only the main process talks
        logging.getLogger().setLevel(logging.WARNING)
    # --- the base model's folder (a wrong path is a one-line error, like any other bad input)
    name = t.model_name_or_path
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise TrainerError(f"base model folder not found: {name}")
    try:
        source = resolve_base(name, allow_random=allow_random_weights)
    except Exception as exc:  # ModelSourceError and friends: one line for the user
        raise TrainerError(str(exc)) from None

    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from transformers import get_scheduler

    from trainer.publish import write_atomic

    _quiet_libraries()
    if os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        log.warning(
            "accelerate launch started a single process (--cpu needs mpirun for more); "
            "for N CPU processes: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
    # Sync points are set per window below (windows at an epoch's end can be short), never by the dataloader.
    precision = choose_precision(cfg)
    _allow_precision_change(precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    set_seed(t.seed)

    # --- tokenizer, base weights, data
    tokenizer = load_tokenizer(source.path)
    base = load_base_model(source.path)
    max_len = min(t.max_seq_length, getattr(base.config, "n_positions", t.max_seq_length))
    train_rows = tokenize_all(train_examples, tokenizer, max_len, name=str(data_path))
    if val_examples is not None:
        eval_rows = tokenize_all(val_examples, tokenizer, max_len, name=str(val_path))
    else:
        train_rows, eval_rows = split_holdout(train_rows, t.eval_fraction, t.seed)
    pad_id = tokenizer.pad_token_id

    # --- LoRA
    peft_model = add_lora(base, cfg.lora, gradient_checkpointing=t.gradient_checkpointing)
    trainable, total = count_parameters(peft_model)
    log.info("trainable params: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    # --- plan: windows per epoch are the same every epoch (only their order changes)
    lengths = [len(r.input_ids) for r in train_rows]
    micro_per_epoch = math.ceil(len(train_rows) / t.per_device_train_batch_size)
    window_size = t.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(micro_per_epoch / window_size)
    total_steps = t.max_steps or steps_per_epoch * t.num_train_epochs
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    precision = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[accelerator.mixed_precision]
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
        precision,
        accelerator.device,
    )

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
    params = [p for p in net.parameters() if p.requires_grad]

    # --- run state (everything a checkpoint must carry besides weights and optimizer)
    run: dict[str, Any] = {
        "step": 0,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "world_size": world,
        "loss_sum": 0.0,
        "loss_count": 0,
        "last_loss": None,
        "eval_history": [],
        "best_eval_loss": None,
        "evals_without_improvement": 0,
        "skipped_steps": 0,
        "tokens": 0,
        "padded_tokens": 0,
        "target_tokens": 0,
        "train_seconds": 0.0,
        "config_fingerprint": cfg.fingerprint(),
        "data_sha256": data_hash,
        "stopped_early": False,
    }
    if resume_from is not None:
        state = ckpt.load_checkpoint(
            resume_from, accelerator=accelerator, model=net, optimizer=optimizer, scheduler=scheduler
        )
        if state["config_fingerprint"] != run["config_fingerprint"] or state["world_size"] != world:
            raise TrainerError(f"--resume: {resume_from} was made with another config or number of processes")
        run.update(state)
        log.info("resumed from %s at step %d", resume_from, run["step"])

    stop = StopRequest()
    stop.install()
    try:
        progress.emit(
            "start",
            step=run["step"],
            total_steps=total_steps,
            epoch=run["step"] / steps_per_epoch,
            lr=scheduler.get_last_lr()[0],
            trainable_params=trainable,
            total_params=total,
            train_rows=len(train_rows),
            eval_rows=len(eval_rows),
            precision=precision,
            resumed_from=str(resume_from) if resume_from else None,
        )
        net.train()
        run_start, run_start_step, run_tokens = time.time(), run["step"], 0
        window_losses: list[float] = []
        mark = [time.time()]  # start of the current timed stretch (checkpoints carry the sum)

        def save(reason: str) -> Path:
            run["train_seconds"] += time.time() - mark[0]
            mark[0] = time.time()
            path = ckpt.save_checkpoint(
                ckpt_root,
                accelerator=accelerator,
                model=net,
                optimizer=optimizer,
                scheduler=scheduler,
                state=run,
                keep=t.save_total_limit,
            )
            progress.emit("checkpoint", step=run["step"], path=str(path), reason=reason)
            return path

        def evaluate() -> None:
            loss = evaluate_loss(accelerator, net, eval_rows, t.per_device_eval_batch_size, pad_id)
            run["eval_history"].append({"step": run["step"], "eval_loss": loss})
            if run["best_eval_loss"] is None or loss < run["best_eval_loss"]:
                run["best_eval_loss"], run["evals_without_improvement"] = loss, 0
            else:
                run["evals_without_improvement"] += 1
            progress.emit("eval", step=run["step"], eval_loss=loss, perplexity=perplexity(loss))

        while run["step"] < total_steps:
            epoch = run["step"] // steps_per_epoch
            batches = epoch_batches(
                lengths,
                t.per_device_train_batch_size,
                seed=t.seed,
                epoch=epoch,
                group_by_length=t.group_by_length,
            )
            windows = plan_windows(train_rows, batches, window_size)
            for window in windows[run["step"] % steps_per_epoch :]:
                loss, grad_norm, skipped = train_window(
                    accelerator,
                    net,
                    optimizer,
                    window,
                    train_rows,
                    pad_id,
                    params=params,
                    max_grad_norm=t.max_grad_norm,
                    precision=precision,
                    step=run["step"] + 1,
                )
                if skipped:
                    run["skipped_steps"] += 1  # fp16 overflow: the scaler lowered its scale instead
                else:
                    scheduler.step()
                run["step"] += 1
                run["loss_sum"] += loss
                run["loss_count"] += 1
                run["last_loss"] = loss
                run["tokens"] += window.tokens
                run["padded_tokens"] += window.padded_tokens
                run["target_tokens"] += window.target_tokens
                run_tokens += window.tokens
                window_losses.append(loss)

                step = run["step"]
                if step % t.logging_steps == 0 or step == total_steps:
                    elapsed = time.time() - run_start
                    per_step = elapsed / max(1, step - run_start_step)
                    progress.emit(
                        "step",
                        step=step,
                        epoch=step / steps_per_epoch,
                        loss=sum(window_losses) / len(window_losses),
                        lr=scheduler.get_last_lr()[0],
                        tokens_per_second=run_tokens / max(elapsed, 1e-9),
                        eta_seconds=per_step * (total_steps - step),
                        grad_norm=grad_norm,
                    )
                    window_losses.clear()
                epoch_end = step % steps_per_epoch == 0
                if eval_rows and (
                    epoch_end or (t.eval_steps and step % t.eval_steps == 0) or step == total_steps
                ):
                    evaluate()
                    if (
                        t.early_stopping_patience
                        and run["evals_without_improvement"] >= t.early_stopping_patience
                    ):
                        log.info(
                            "early stopping: no better eval loss in %d evaluations", t.early_stopping_patience
                        )
                        run["stopped_early"] = True
                if world > 1:  # every process must stop at the same step, so they vote
                    wanted = torch.tensor(float(stop.signal_name is not None), device=accelerator.device)
                    if float(accelerator.reduce(wanted, reduction="sum")) > 0 and stop.signal_name is None:
                        stop.signal_name = "SIGTERM"
                if stop.signal_name is not None:
                    raise TrainingInterrupted(stop.signal_name, str(save("interrupted")))
                if run["stopped_early"] or step >= total_steps:
                    break
                if t.save_steps and step % t.save_steps == 0:
                    save("save_steps")
            if run["stopped_early"]:
                break
        run["train_seconds"] += time.time() - mark[0]

        # --- the adapter: staged, verified and renamed into place by the main process only
        eval_loss = run["eval_history"][-1]["eval_loss"] if run["eval_history"] else None
        summary = {
            "format": FORMAT_VERSION,
            "adapter": output.name,
            "base_model": source.describe(),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4),
            "steps": run["step"],
            "total_steps": total_steps,
            "epochs": round(run["step"] / steps_per_epoch, 4),
            "train_loss": run["loss_sum"] / max(1, run["loss_count"]),
            "final_loss": run["last_loss"],
            "eval_loss": eval_loss,
            "perplexity": perplexity(eval_loss),
            "eval_history": run["eval_history"],
            "stopped_early": run["stopped_early"],
            "skipped_steps": run["skipped_steps"],
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "tokens": run["tokens"],
            "target_tokens": run["target_tokens"],
            "padding_fraction": round(1 - run["tokens"] / max(1, run["padded_tokens"]), 4),
            "tokens_per_second": run["tokens"] / max(run["train_seconds"], 1e-9),
            "train_seconds": round(run["train_seconds"], 3),
            "wall_time_seconds": round(time.time() - started, 3),
            "precision": precision,
            "device": str(accelerator.device),
            "num_processes": world,
            "config": cfg.to_dict(),
            "data": {"train": str(data_path), "validation": str(val_path) if val_path else None},
            "data_sha256": data_hash,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        if is_main:
            with artifact.staged(output) as folder:
                accelerator.unwrap_model(net).save_pretrained(folder)
                record = artifact.Record(
                    template=DEFAULT_TEMPLATE.to_dict(),
                    base_model=t.model_name_or_path,
                    created=artifact.created_now(),
                    job=job,
                )
                artifact.write_record(folder, record)
                write_atomic(folder / artifact.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
                artifact.publish(folder, output)
            if default_ckpt_dir:
                shutil.rmtree(ckpt_root, ignore_errors=True)
        accelerator.wait_for_everyone()
        progress.emit(
            "done",
            step=run["step"],
            path=str(output),
            eval_loss=eval_loss,
            perplexity=perplexity(eval_loss),
            train_loss=summary["train_loss"],
        )
        return summary
    finally:
        stop.restore()

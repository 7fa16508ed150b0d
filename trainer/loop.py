"""The training loop, read top to bottom: ``train_adapter`` = setup -> ``fit`` -> ``save``.

    python -m trainer train --config examples/prototype.yaml --data examples/sample_instructions.jsonl \\
        --output runs/adapters/demo
    accelerate launch --num_processes 2 --cpu -m trainer train ...      # DDP, one adapter written

Order of work (``trainer.setup``): validate inputs (config, data files) before touching a model ->
pick precision -> load base + tokenizer, tokenize -> add LoRA -> plan steps -> optimizer -> (resume).
Then ``fit``: train with token-normalised gradient accumulation, log, evaluate (keeping a copy of
the LoRA weights whenever the eval loss improves), checkpoint. Then ``save``: put back the best
evaluation's weights (``training.select: best``, the default) or keep the last step's, stage the
adapter folder -> verify -> rename into place (``loracore.artifact``).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loracore import artifact
from loracore.atomic import write_atomic
from loracore.progress import Progress
from loracore.template import PromptTemplate
from trainer import checkpoint as ckpt
from trainer.checkpoint import RunState
from trainer.data import PairRow, Row, collate, epoch_batches
from trainer.dpo import dpo_loss, evaluate_preferences, pair_logps
from trainer.errors import USER_ERRORS, TrainerError, TrainingInterrupted
from trainer.setup import Setup, resolve_inputs, setup, start_state

log = logging.getLogger("trainer")
SUMMARY_FORMAT = 1
# While asked to yield, a trainer still works at least this share of the wall time (YieldGate).
DEFAULT_MIN_TRAIN_SHARE = 0.5


# ----------------------------------------------------------------------------- one step, one eval


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


def evaluate_run(run: Setup) -> tuple[float, dict[str, float]]:
    """The eval loss the best checkpoint is chosen by (mean token loss; for DPO the mean DPO loss) and,
    for DPO, the preference metrics (``trainer.dpo.PreferenceEval``)."""
    t = run.cfg.training
    if t.method == "dpo":
        ev = evaluate_preferences(
            run.accelerator,
            run.net,
            run.eval_rows,
            run.ref_eval,
            beta=t.dpo_beta,
            batch_size=t.per_device_eval_batch_size,
            pad_id=run.pad_id,
        )
        return ev.loss, ev.metrics()
    return evaluate_loss(
        run.accelerator, run.net, run.eval_rows, t.per_device_eval_batch_size, run.pad_id
    ), {}


def trainable_weights(accelerator, model) -> dict[str, Any]:
    """A CPU copy of the LoRA weights (PEFT state-dict keys, as in the adapter file): a few MB at most."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(accelerator.unwrap_model(model))
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def selected_weights(run: Setup, state: RunState) -> str:
    """ "best" when the best evaluation's weights are published, "last" for the last step's: asked for
    with ``select: last``, or nothing to choose from (no eval rows)."""
    if run.cfg.training.select == "best" and state.best_weights is not None:
        return "best"
    return "last"


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
    pairs: int = 0  # preference rows (DPO): what the window's loss is averaged over


def plan_windows(rows: list[Row] | list[PairRow], batches: list[list[int]], size: int) -> list[Window]:
    out = []
    per_item = len(rows[0].rows()) if rows else 1  # token rows per item: 2 for a preference pair
    for start in range(0, len(batches), size):
        group = batches[start : start + size]
        out.append(
            Window(
                batches=group,
                target_tokens=sum(rows[i].n_targets for b in group for i in b),
                tokens=sum(rows[i].n_tokens for b in group for i in b),
                padded_tokens=sum(per_item * len(b) * max(rows[i].width for i in b) for b in group),
                pairs=sum(len(b) for b in group) if isinstance(rows[0], PairRow) else 0,
            )
        )
    return out


def sft_objective(rows: list[Row], pad_id: int, device):
    """(summed token loss of a micro-batch, what a window divides it by: its target tokens)."""

    def loss_of(net, idx: list[int], pad_multiple: int | None):
        batch = collate([rows[j] for j in idx], pad_id, pad_multiple)
        return token_loss_sum(net, {name: tensor.to(device) for name, tensor in batch.items()})

    return loss_of, lambda window: window.target_tokens


def dpo_objective(pairs: list[PairRow], refs: list[tuple[float, float]], beta: float, pad_id: int, device):
    """(summed DPO loss of a micro-batch of pairs, what a window divides it by: its pairs)."""
    import torch

    def loss_of(net, idx: list[int], pad_multiple: int | None):
        chosen, rejected = pair_logps(net, [pairs[j] for j in idx], pad_id, device, pad_multiple)
        ref = torch.tensor([refs[j] for j in idx], dtype=chosen.dtype, device=chosen.device)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)[0].sum()

    return loss_of, lambda window: window.pairs


def objective(run: Setup):
    if run.cfg.training.method == "dpo":
        return dpo_objective(
            run.train_rows, run.ref_train, run.cfg.training.dpo_beta, run.pad_id, run.accelerator.device
        )
    return sft_objective(run.train_rows, run.pad_id, run.accelerator.device)


def train_window(
    accelerator,
    net,
    optimizer,
    window: Window,
    loss_of,
    norm: int,
    *,
    params: list,
    max_grad_norm: float,
    autocast_dtype: str,
    step: int,
) -> tuple[float, float, bool]:
    """One optimizer step over one window: (mean loss, gradient norm, skipped by fp16 scaling).

    ``loss_of(net, batch indices, pad multiple)`` is a micro-batch's summed loss (token cross-entropy for
    SFT, per-pair DPO loss), ``norm`` what the window's sum is divided by (its target tokens, its pairs).

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
    pad_multiple = 8 if autocast_dtype == "fp16" else None  # tensor-core friendly widths, still per batch
    loss_sum = torch.zeros((), device=accelerator.device)
    loss = grad_norm = float("nan")
    for i in range(k):
        idx, weight = (mine[i], 1.0) if i < len(mine) else (window.batches[0], 0.0)
        with accelerator.accumulate(net):
            summed = loss_of(net, idx, pad_multiple) * weight
            # backward() divides by k and DDP averages over processes; undo both so the gradient is
            # that of (the window's summed loss) / (the window's target tokens, or pairs).
            accelerator.backward(summed * (k * world / norm))
            loss_sum += summed.detach()
            if accelerator.sync_gradients:
                loss = float(accelerator.reduce(loss_sum, reduction="sum")) / norm
                if not math.isfinite(loss):  # the watchdog: never step on a NaN/inf loss
                    raise TrainerError(
                        f"loss became {loss} at step {step}; lower training.learning_rate or use fp32/bf16"
                    )
                grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
                if (
                    not math.isfinite(grad_norm) and autocast_dtype != "fp16"
                ):  # under fp16 the scaler skips it
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


@dataclass
class YieldGate:
    """Between optimizer steps, wait while ``path`` exists: someone else (live serving) needs the device.

    The trainer only knows the file; whoever shares the device creates and removes it (the job runner
    does, from the generation worker's load). Waiting is bounded twice, so the job is never starved:
      * one wait lasts at most ``max_pause`` seconds, then a step runs whatever the file says;
      * a minimum training share: the gate earns ``(1 - min_share) / min_share`` seconds of waiting per
        second the trainer worked (steps, evaluations, checkpoints, the model load: all measured, since
        the last wait), holds at most ``max_pause`` of them, and a wait spends them. So however long
        serving stays busy, the trainer works at least ``min_share`` of the wall time (0.5: half), and a
        burst of traffic after a quiet stretch still gets up to ``max_pause`` at once. ``min_share`` 0
        is the first bound alone; 1 never waits.
    A signal ends the wait at once. Waiting changes nothing the step computes: the loss curve equals
    that of an unpaused run.
    """

    path: Path | None = None
    max_pause: float = 10.0
    min_share: float = DEFAULT_MIN_TRAIN_SHARE
    poll: float = 0.05
    total: float = 0.0  # seconds yielded so far in this process
    credit: float = 0.0  # seconds the trainer may still wait (min_share's budget)
    since: float = field(default_factory=time.monotonic)  # when the trainer last began working

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share must be within [0, 1], not {self.min_share}")

    def _earn(self, now: float) -> None:
        if self.min_share <= 0:
            self.credit = self.max_pause
        else:
            worked = max(0.0, now - self.since)
            earned = worked * (1.0 - self.min_share) / self.min_share
            self.credit = min(self.max_pause, self.credit + earned)
        self.since = now

    def wait(self, stop: StopRequest) -> float:
        t0 = time.monotonic()
        self._earn(t0)
        bound = min(self.max_pause, self.credit)
        if bound <= 0 or self.path is None or not self.path.exists():
            return 0.0
        deadline = t0 + bound
        while stop.signal_name is None and self.path.exists():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(self.poll, left))
        now = time.monotonic()
        waited = now - t0
        self.credit = max(0.0, self.credit - waited)
        self.since = now
        self.total += waited
        return waited


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
    yield_file: str | Path | None = None,
    max_pause_seconds: float = 10.0,
    min_train_share: float = DEFAULT_MIN_TRAIN_SHARE,
    init_adapter: str | Path | None = None,
    template: PromptTemplate | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter and publish it at ``output``; returns the training summary.

    ``config`` is a YAML path, a dict or a ``TrainConfig``. ``resume`` is a checkpoint folder, or
    True for the newest one in the checkpoint folder. Raises ``TrainerError`` for bad input
    (nothing is written under ``output``) and ``TrainingInterrupted`` after a signal. While
    ``yield_file`` exists, training pauses before loading the model and between steps
    (``YieldGate``: at most ``max_pause_seconds`` each time, and never below ``min_train_share`` of the
    wall time). ``init_adapter`` (an adapter folder of the same LoRA shape) is a warm start: training
    begins from its weights. ``template`` renders the rows (default:
    ``DEFAULT_TEMPLATE``) and is recorded with the adapter, so serving renders prompts the same way.
    """
    # Only the main process reports; under `accelerate launch` RANK is set before anything starts.
    progress = progress or Progress(jsonl=progress_jsonl, enabled=os.environ.get("RANK", "0") == "0")
    try:
        inputs = resolve_inputs(
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
            init_adapter=init_adapter,
            template=template,
        )
        gate = YieldGate(Path(yield_file) if yield_file else None, max_pause_seconds, min_train_share)
        # Loading torch, the base and the rows is a burst of work too: it waits like a step does (a
        # signal meanwhile ends the process, as it would during the load itself). Under a training
        # share nothing is earned yet, so it goes on at once, and its duration earns the first pause.
        gate.wait(StopRequest())
        run = setup(inputs, started=time.time())
        state = start_state(run)
        stop = StopRequest()
        stop.install()
        try:
            fit(run, state, progress, stop, gate)
            summary = Summary.of(run, state)
            save(run, state, summary)
        finally:
            stop.restore()
        progress.emit(
            "done",
            step=state.step,
            path=str(inputs.output),
            eval_loss=summary.eval_loss,
            perplexity=summary.perplexity,
            train_loss=summary.train_loss,
            best_step=summary.best_step,
            best_eval_loss=summary.best_eval_loss,
            last_eval_loss=summary.last_eval_loss,
            selected=summary.selected,
            yielded_seconds=round(gate.total, 3),
            trained_tokens=state.target_tokens,
            method=summary.method,
            **(summary.preference or {}),
        )
        return summary.to_dict()
    except BaseException as exc:
        msg = (
            str(exc)
            if isinstance(exc, (*USER_ERRORS, TrainingInterrupted))
            else f"{type(exc).__name__}: {exc}"
        )
        progress.emit(
            "error", message=msg, interrupted=isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
        )
        raise
    finally:
        progress.close()


def fit(
    run: Setup, state: RunState, progress: Progress, stop: StopRequest, gate: YieldGate | None = None
) -> RunState:
    """Train from ``state.step`` to the planned end (or an early stop), updating ``state``.

    On SIGINT/SIGTERM the current step finishes, a checkpoint is written and ``TrainingInterrupted``
    raised. Before each step ``gate`` may pause (yielding the device); paused time counts in neither
    ``train_seconds`` nor ``tokens_per_second``. Every process runs this; only the main one reports.
    """
    import torch

    gate = gate or YieldGate()
    t = run.cfg.training
    accelerator, scheduler = run.accelerator, run.scheduler
    resumed_from = run.inputs.resume_from
    progress.emit(
        "start",
        step=state.step,
        total_steps=run.total_steps,
        epoch=state.step / run.steps_per_epoch,
        lr=scheduler.get_last_lr()[0],
        trainable_params=run.trainable_params,
        total_params=run.total_params,
        train_rows=len(run.train_rows),
        eval_rows=len(run.eval_rows),
        precision=run.autocast_dtype,
        resumed_from=str(resumed_from) if resumed_from else None,
        # a resumed run carries on from the checkpoint's evaluations
        eval_loss=state.eval_loss,
        best_step=state.best_step,
        best_eval_loss=state.best_eval_loss,
        last_eval_loss=state.eval_loss,
    )
    run.net.train()
    lengths = [r.width for r in run.train_rows]
    loss_of, norm_of = objective(run)
    first_step, t0, tokens_this_run, paused_this_run = state.step, time.time(), 0, 0.0
    losses_since_log: list[float] = []
    stretch_start = time.time()  # train_seconds is summed per stretch, so a checkpoint carries it

    def checkpoint(reason: str) -> Path:
        nonlocal stretch_start
        now = time.time()
        state.train_seconds += now - stretch_start
        stretch_start = now
        path = ckpt.save_checkpoint(
            run.inputs.ckpt_root,
            accelerator=accelerator,
            model=run.net,
            optimizer=run.optimizer,
            scheduler=scheduler,
            state=state,
            keep=t.save_total_limit,
        )
        progress.emit("checkpoint", step=state.step, path=str(path), reason=reason)
        return path

    while state.step < run.total_steps and not state.stopped_early:
        # the epoch's windows are a pure function of (seed, epoch): a resumed run skips those it did
        epoch = state.step // run.steps_per_epoch
        batches = epoch_batches(
            lengths,
            t.per_device_train_batch_size,
            seed=t.seed,
            epoch=epoch,
            group_by_length=t.group_by_length,
        )
        windows = plan_windows(run.train_rows, batches, run.window_size)
        for window in windows[state.step % run.steps_per_epoch :]:
            # serving first: wait while asked to (bounded), between steps only
            paused = gate.wait(stop)
            stretch_start += paused
            paused_this_run += paused
            # one optimizer step over the window's micro-batches
            loss, grad_norm, skipped = train_window(
                accelerator,
                run.net,
                run.optimizer,
                window,
                loss_of,
                norm_of(window),
                params=run.params,
                max_grad_norm=t.max_grad_norm,
                autocast_dtype=run.autocast_dtype,
                step=state.step + 1,
            )
            if not skipped:  # under fp16 an overflow skips the step: the scaler lowered its scale instead
                scheduler.step()
            state.add_step(
                loss,
                tokens=window.tokens,
                padded_tokens=window.padded_tokens,
                target_tokens=window.target_tokens,
                skipped=skipped,
            )
            tokens_this_run += window.tokens
            losses_since_log.append(loss)
            step = state.step

            # log
            if step % t.logging_steps == 0 or step == run.total_steps:
                elapsed = time.time() - t0
                per_step = elapsed / max(1, step - first_step)
                progress.emit(
                    "step",
                    step=step,
                    epoch=step / run.steps_per_epoch,
                    loss=sum(losses_since_log) / len(losses_since_log),
                    lr=scheduler.get_last_lr()[0],
                    tokens_per_second=tokens_this_run / max(elapsed - paused_this_run, 1e-9),
                    eta_seconds=per_step * (run.total_steps - step),  # pauses included: they recur
                    grad_norm=grad_norm,
                    yielded_seconds=round(gate.total, 3),
                    trained_tokens=state.target_tokens,  # tokens that received loss, all epochs so far
                )
                losses_since_log.clear()

            # evaluate at each epoch's end, every eval_steps and at the end; stop early if it stalls
            epoch_end = step % run.steps_per_epoch == 0
            if run.eval_rows and (
                epoch_end or (t.eval_steps and step % t.eval_steps == 0) or step == run.total_steps
            ):
                eval_loss, metrics = evaluate_run(run)
                if state.add_eval(eval_loss, metrics) and t.select == "best":
                    state.best_weights = trainable_weights(accelerator, run.net)
                progress.emit(
                    "eval",
                    step=step,
                    eval_loss=eval_loss,
                    perplexity=perplexity(eval_loss) if t.method == "sft" else None,
                    best_step=state.best_step,
                    best_eval_loss=state.best_eval_loss,
                    last_eval_loss=eval_loss,
                    **metrics,
                )
                if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
                    log.info(
                        "early stopping: no better eval loss in %d evaluations", t.early_stopping_patience
                    )
                    state.stopped_early = True

            # a signal: checkpoint and stop (every process must stop at the same step, so they vote)
            if run.world > 1:
                wanted = torch.tensor(float(stop.signal_name is not None), device=accelerator.device)
                if float(accelerator.reduce(wanted, reduction="sum")) > 0 and stop.signal_name is None:
                    stop.signal_name = "SIGTERM"
            if stop.signal_name is not None:
                raise TrainingInterrupted(stop.signal_name, str(checkpoint("interrupted")))
            if state.stopped_early or step >= run.total_steps:
                break
            if t.save_steps and step % t.save_steps == 0:
                checkpoint("save_steps")
    state.train_seconds += time.time() - stretch_start
    return state


def save(run: Setup, state: RunState, summary: Summary) -> None:
    """Publish the adapter at the output: the selected weights (``summary.selected``), staged, verified
    and renamed in by the main process only."""
    accelerator, inputs = run.accelerator, run.inputs
    if accelerator.is_main_process:
        if not run.eval_rows:
            log.info("no evaluation rows: publishing the last step's weights (selected: last)")
        elif summary.selected == "best" and state.best_step != state.step:
            log.info(
                "publishing the weights of step %d (eval loss %.4f; the last evaluation had %.4f)",
                state.best_step,
                state.best_eval_loss,
                state.eval_loss,
            )
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(accelerator.unwrap_model(run.net), state.best_weights)
        with artifact.staged(inputs.output) as folder:
            accelerator.unwrap_model(run.net).save_pretrained(folder)
            record = artifact.Record(
                template=run.template.to_dict(),
                base_model=run.cfg.training.model_name_or_path,
                created=artifact.created_now(),
                job=inputs.job,
                base=run.base_record,
            )
            artifact.write_record(folder, record)
            write_atomic(folder / artifact.SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
            artifact.publish(folder, inputs.output)  # seals the record with the weights' sha256
        if inputs.ckpt_root_is_default:
            shutil.rmtree(inputs.ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- the summary


@dataclass
class Summary:
    """``training_summary.json``; ``train_adapter`` returns it as a dict (same keys, same order)."""

    format: int
    adapter: str
    base_model: dict  # trainer.model.BaseSource.describe(): path, origin, random_weights
    trainable_params: int
    total_params: int
    trainable_percent: float
    steps: int
    total_steps: int
    epochs: float
    train_loss: float  # mean over steps of each step's mean token loss
    final_loss: float | None  # the last step's
    eval_loss: float | None  # the published weights' (best_eval_loss or last_eval_loss, per selected)
    perplexity: float | None  # of eval_loss
    best_step: int | None  # the step of the lowest eval loss (None without evaluations)
    best_eval_loss: float | None
    last_eval_loss: float | None  # the last evaluation's
    selected: str  # "best": the weights of best_step were published; "last": the last step's
    eval_history: list[dict[str, Any]]
    stopped_early: bool
    skipped_steps: int
    train_rows: int
    eval_rows: int
    tokens: int
    target_tokens: int
    padding_fraction: float
    tokens_per_second: float
    train_seconds: float
    wall_time_seconds: float
    precision: str  # the autocast dtype trained in: fp32, fp16 or bf16
    device: str
    num_processes: int
    config: dict
    data: dict  # {"train": path, "validation": path or None}
    data_sha256: str
    resumed_from: str | None
    method: str = "sft"  # "sft" | "dpo"
    # DPO: the preference metrics of the published weights' evaluation (trainer.dpo.PreferenceEval)
    preference: dict | None = None

    @classmethod
    def of(cls, run: Setup, state: RunState) -> Summary:
        inputs = run.inputs
        selected = selected_weights(run, state)
        eval_loss = state.best_eval_loss if selected == "best" else state.eval_loss
        return cls(
            format=SUMMARY_FORMAT,
            adapter=inputs.output.name,
            base_model=run.base.describe(),
            trainable_params=run.trainable_params,
            total_params=run.total_params,
            trainable_percent=round(100 * run.trainable_params / run.total_params, 4),
            steps=state.step,
            total_steps=run.total_steps,
            epochs=round(state.step / run.steps_per_epoch, 4),
            train_loss=state.train_loss,
            final_loss=state.last_loss,
            eval_loss=eval_loss,
            perplexity=perplexity(eval_loss) if run.cfg.training.method == "sft" else None,
            best_step=state.best_step,
            best_eval_loss=state.best_eval_loss,
            last_eval_loss=state.eval_loss,
            selected=selected,
            eval_history=state.eval_history,
            stopped_early=state.stopped_early,
            skipped_steps=state.skipped_steps,
            train_rows=len(run.train_rows),
            eval_rows=len(run.eval_rows),
            tokens=state.tokens,
            target_tokens=state.target_tokens,
            padding_fraction=round(1 - state.tokens / max(1, state.padded_tokens), 4),
            tokens_per_second=state.tokens / max(state.train_seconds, 1e-9),
            train_seconds=round(state.train_seconds, 3),
            wall_time_seconds=round(time.time() - run.started, 3),
            precision=run.autocast_dtype,
            device=str(run.accelerator.device),
            num_processes=run.world,
            config=run.cfg.to_dict(),
            data={
                "train": str(inputs.data_path),
                "validation": str(inputs.val_path) if inputs.val_path else None,
            },
            data_sha256=inputs.data_sha256,
            resumed_from=str(inputs.resume_from) if inputs.resume_from else None,
            method=run.cfg.training.method,
            preference=state.metrics_of(state.best_step if selected == "best" else None)
            if run.cfg.training.method == "dpo"
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

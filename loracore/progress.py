"""Progress reporting: a tqdm bar for people, JSON lines for machines (the /train job runner).

Every JSON line has the same keys, so a reader never needs to guess:
    event             "start" | "step" | "eval" | "checkpoint" | "done" | "error"
    step, total_steps optimizer steps done / planned
    epoch             fractional epoch (2.5 = half-way through the third)
    loss              mean train loss per target token over the last logged steps (null if none)
    eval_loss         the latest eval loss (null before the first evaluation)
    tokens_per_second non-pad tokens per second since the start of this run (all processes)
    eta_seconds       estimated seconds to the end
    lr                the learning rate of the last step
    best_step         the step of the lowest eval loss so far (null before the first evaluation)
    best_eval_loss    that eval loss
    last_eval_loss    the latest evaluation's loss
    selected          on "done": "best" or "last", the weights published (null before)
    time              Unix time of the event
plus event-specific extras (perplexity, path, message, yielded_seconds, trained_tokens, DPO's
preference metrics, ...). Only the main process
reports. ``STATE_KEYS`` is that list; ``JOB_KEYS`` what a /train job's status carries of it (the service's
job store and its views derive from these, never from their own lists).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

EVENTS = ("start", "step", "eval", "checkpoint", "done", "error")
# The keys every line carries, in order (the state as of the event).
STATE_KEYS = (
    "step",
    "total_steps",
    "epoch",
    "loss",
    "eval_loss",
    "tokens_per_second",
    "eta_seconds",
    "lr",
    "best_step",  # the step whose weights are (or will be) published, by eval loss
    "best_eval_loss",
    "last_eval_loss",
    "selected",  # at the end: "best" or "last" (no eval rows, or training.select=last)
)
# DPO runs (training.method: dpo) add these on "eval" and "done" lines: the preference metrics of the
# evaluation (on "done", of the published weights); trainer.dpo.PreferenceEval.
PREFERENCE_KEYS = (
    "method",
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
)
# A job's progress: the latest state plus the seconds the trainer yielded the CPU to serving, the tokens
# that received loss so far (on "step" and "done" lines) and a DPO run's preference metrics.
JOB_KEYS = (*STATE_KEYS, "yielded_seconds", "trained_tokens", *PREFERENCE_KEYS)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: report them as null (the watchdog's error line says what happened)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    def __init__(self, *, jsonl: str | Path | None = None, enabled: bool = True, bar: bool | None = None):
        self.enabled = enabled
        self._streams: list[TextIO] = []
        self._owned: list[TextIO] = []
        if enabled and jsonl is not None:
            if str(jsonl) == "-":
                self._streams.append(sys.stdout)
            else:
                path = Path(jsonl)
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
                self._streams.append(fh)
                self._owned.append(fh)
        # The bar goes to stderr and only on a terminal, so logs and pipes stay clean.
        self._want_bar = enabled and (sys.stderr.isatty() if bar is None else bar)
        self._bar = None
        self.total_steps = 0
        self.state: dict[str, Any] = {**dict.fromkeys(STATE_KEYS), "step": 0, "total_steps": 0, "epoch": 0.0}

    @property
    def writes_stdout(self) -> bool:
        return sys.stdout in self._streams

    def emit(self, event: str, **fields: Any) -> None:
        assert event in EVENTS, event
        if not self.enabled:
            return
        for key in self.state:
            if key in fields:
                self.state[key] = fields.pop(key)
        line = {"event": event, **self.state, **fields, "time": round(time.time(), 3)}
        text = json.dumps({k: _clean(v) for k, v in line.items()})
        for stream in self._streams:
            stream.write(text + "\n")
            stream.flush()
        self._update_bar(event)

    def _update_bar(self, event: str) -> None:
        if not self._want_bar:
            return
        if self._bar is None and event == "start":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.state["total_steps"], unit="step", dynamic_ncols=True, file=sys.stderr
            )
        if self._bar is None:
            return
        s = self.state
        self._bar.n = s["step"]
        post = {}
        if s["loss"] is not None:
            post["loss"] = f"{s['loss']:.4f}"
        if s["eval_loss"] is not None:
            post["eval"] = f"{s['eval_loss']:.4f}"
        if s["tokens_per_second"]:
            post["tok/s"] = f"{s['tokens_per_second']:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()
        if event in ("done", "error"):
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for fh in self._owned:
            fh.close()
        self._owned.clear()
        self._streams.clear()

"""The training benchmark: this trainer vs the Hugging Face Trainer + PEFT, same data, steps and seed.

Each run is its own process (``bench.train_worker``); methods are interleaved over rounds with the
order reversed every other round. Tokens/s counts real (non-padding) tokens over the training
loop's own time (model loading, tokenizing and saving excluded for every method).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import REPO, ForeignLoad, log, machine_description, ratio, wait_for_quiet_cpu, write_json
from bench.train_data import write_dataset
from testing.weights import PROTOTYPE_LORA, ensure_base

TARGETS = {
    "ours_vs_prototype_tokens": (
        ">=",
        3.0,
        "trainer vs the prototype's approach (HF Trainer, pad to max_length), tokens/s",
    ),
    "ours_vs_hf_dynamic_tokens": (">=", 1.2, "trainer vs HF Trainer with dynamic padding, tokens/s"),
    "ours_vs_hf_dynamic_bf16_tokens": (
        ">=",
        1.2,
        "trainer vs HF Trainer with dynamic padding and bf16=True (equal precision on a bf16 CPU), tokens/s",
    ),
    "ours_vs_hf_dynamic_eval_loss": (
        "<=",
        1.02,
        "trainer eval loss / HF dynamic eval loss (equal final loss)",
    ),
}


@dataclass
class TrainConfig:
    workdir: Path = REPO / "runs" / "bench"
    outdir: Path = REPO / "docs" / "benchmarks"
    device: str = "cpu"
    base_shape: dict = field(default_factory=dict)
    rank: int = 32
    steps: int = 20
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 5e-4
    warmup_steps: int = 1
    max_length: int = 256
    train_rows: int = 160
    eval_rows: int = 40
    rounds: int = 2
    methods: tuple[str, ...] = ("loraserve", "hf-maxlen", "hf-dynamic", "hf-dynamic-bf16")
    seed: int = 0
    quiet_wait_s: float = 10.0
    threads: int | None = None


def run(cfg: TrainConfig) -> dict:
    t_start = time.time()
    base = ensure_base(cfg.workdir, shape=cfg.base_shape)
    train, val = write_dataset(cfg.workdir / "train-data", cfg.train_rows, cfg.eval_rows, cfg.seed)
    machine = machine_description()
    lora = dict(PROTOTYPE_LORA, r=cfg.rank, lora_alpha=2 * cfg.rank)
    runs: list[dict] = []
    for rnd in range(cfg.rounds):
        order = list(cfg.methods) if rnd % 2 == 0 else list(reversed(cfg.methods))
        for method in order:
            label = f"{method}-r{rnd}"
            out_dir = cfg.workdir / "train-runs" / label
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            spec = {
                "method": method,
                "model": str(base),
                "train": str(train),
                "eval": str(val),
                "out_dir": str(out_dir),
                "device": cfg.device,
                "lora": lora,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "max_length": cfg.max_length,
                "seed": cfg.seed,
            }
            write_json(out_dir / "spec.json", spec)
            wait_for_quiet_cpu(cfg.quiet_wait_s)
            with ForeignLoad() as fl, open(out_dir / "worker.log", "w") as logf:
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.train_worker",
                        str(out_dir / "spec.json"),
                        str(out_dir / "out.json"),
                    ],
                    cwd=REPO,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                )
            if proc.returncode != 0:
                tail = (out_dir / "worker.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{tail}")
            res = json.loads((out_dir / "out.json").read_text())
            res.update(method=method, round=rnd, label=label, foreign_cores=round(fl.cores, 2))
            res["tokens_per_s"] = res["real_tokens"] / res["train_s"] if res.get("real_tokens") else None
            curve = res.get("loss_curve") or []
            res["final_train_loss"] = curve[-1][1] if curve else None
            res["final_train_loss_last5"] = statistics.fmean(v for _, v in curve[-5:]) if curve else None
            log(
                "train_run",
                label=label,
                tok_s=_r(res["tokens_per_s"]),
                train_s=_r(res["train_s"]),
                eval_loss=_r(res["eval_loss"]),
                real_tokens=res.get("real_tokens"),
                foreign=res["foreign_cores"],
            )
            runs.append(res)

    ratios = _ratios(runs, cfg.rounds)
    return {
        "benchmark": "train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "ratios": ratios,
        "targets": _targets(ratios),
        "runs": runs,
    }


def _ratios(runs: list[dict], rounds: int) -> dict:
    by = {(r["method"], r["round"]): r for r in runs}
    out: dict = {}
    pairs = {
        "ours_vs_prototype_tokens": ("loraserve", "hf-maxlen", "tokens_per_s", False),
        "ours_vs_hf_dynamic_tokens": ("loraserve", "hf-dynamic", "tokens_per_s", False),
        "hf_dynamic_vs_prototype_tokens": ("hf-dynamic", "hf-maxlen", "tokens_per_s", False),
        "ours_vs_hf_dynamic_bf16_tokens": ("loraserve", "hf-dynamic-bf16", "tokens_per_s", False),
        "ours_vs_hf_dynamic_eval_loss": ("loraserve", "hf-dynamic", "eval_loss", False),
        "ours_vs_prototype_eval_loss": ("loraserve", "hf-maxlen", "eval_loss", False),
    }
    for key, (a, b, field_, _) in pairs.items():
        vals = [
            ratio(by[(a, i)][field_], by[(b, i)][field_])
            for i in range(rounds)
            if (a, i) in by and (b, i) in by
        ]
        vals = [v for v in vals if v is not None]
        out[key] = statistics.median(vals) if vals else None
        out[key + "_rounds"] = vals
    return out


def _targets(ratios: dict) -> list[dict]:
    rows = []
    for key, (op, target, text) in TARGETS.items():
        v = ratios.get(key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        rows.append({"key": key, "what": text, "op": op, "target": target, "measured": v, "met": met})
    return rows


def _r(x, nd: int = 3):
    return None if x is None else round(x, nd)

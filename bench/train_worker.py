"""One training run of one method, in its own process (fresh Accelerate state, clean peak memory).

    python -m bench.train_worker SPEC.json OUT.json

Methods:
- ``loraserve``: this project's trainer (``trainer.train_adapter``), prototype hyper-parameters.
- ``hf-maxlen``: Hugging Face ``Trainer`` + PEFT as the prototype ran it: every row padded to max_length.
- ``hf-dynamic``: the same ``Trainer`` with dynamic padding (pad to the longest row of each batch).
- ``hf-dynamic-bf16``: ``hf-dynamic`` with ``bf16=True`` instead of the prototype's ``fp16=True``: the
  equal-precision comparison where this project's trainer picks bf16 (a CPU with native bf16).

Every method gets the prototype's ``fp16: true`` (except ``hf-dynamic-bf16``) and records the precision
it actually trained in: on a CPU Accelerate turns fp16 into a no-op (fp32), while this project's trainer
uses bf16 autocast where the CPU has native bf16.

All three see the same rows (tokenized by the trainer's own code, loss on response tokens and
EOS), the same number of optimizer steps, batch size, accumulation, learning rate schedule and
seed. Afterwards every adapter is evaluated by the same function, untimed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from bench.common import write_json


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rows(data: Path, tokenizer, max_length: int):
    from loracore.template import DEFAULT_TEMPLATE
    from trainer.data import read_examples, tokenize_all

    return tokenize_all(read_examples(data, DEFAULT_TEMPLATE), tokenizer, max_length, name=str(data))


def run_ours(spec: dict, out_dir: Path) -> dict:
    from trainer import train_adapter

    progress = out_dir / "progress.jsonl"
    config = {
        "lora": spec["lora"],
        "training": {
            "model_name_or_path": spec["model"],
            "num_train_epochs": 1,
            "max_steps": spec["steps"],
            "per_device_train_batch_size": spec["batch_size"],
            "gradient_accumulation_steps": spec["grad_accum"],
            "learning_rate": spec["lr"],
            "warmup_steps": spec["warmup_steps"],
            "lr_scheduler_type": "linear",
            "weight_decay": 0.0,
            "max_seq_length": spec["max_length"],
            "fp16": True,  # the prototype's setting; the trainer picks what this device does well
            "eval_fraction": 0.0,
            "save_steps": 0,
            "seed": spec["seed"],
        },
    }
    summary = train_adapter(config, spec["train"], out_dir / "adapter", progress_jsonl=progress)
    curve = []
    for line in progress.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "step" and ev.get("loss") is not None:
            curve.append([ev["step"], ev["loss"]])
    return {
        "train_s": summary["train_seconds"],
        "steps": summary["steps"],
        "loss_curve": curve,
        "padding_fraction": summary.get("padding_fraction"),
        "real_tokens": summary.get("tokens"),
        "adapter": str(out_dir / "adapter"),
        "precision": summary["precision"],
    }


def run_hf(spec: dict, out_dir: Path, dynamic: bool, bf16: bool = False) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from trainer.model import load_base_model, load_tokenizer

    tok = load_tokenizer(spec["model"])
    rows = _rows(Path(spec["train"]), tok, spec["max_length"])
    pad = tok.pad_token_id
    max_length = spec["max_length"]
    stats = {"real": 0, "padded": 0}

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch) if dynamic else max_length
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
            stats["real"] += n
        stats["padded"] += ids.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    dataset = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    torch.manual_seed(spec["seed"])
    model = load_base_model(spec["model"])
    lcfg = LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=True, bias="none", **spec["lora"])
    model = get_peft_model(model, lcfg)
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        warmup_steps=spec["warmup_steps"],
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec["seed"],
        data_seed=spec["seed"],
        use_cpu=spec["device"] != "cuda",
        fp16=not bf16,  # the prototype's setting (Accelerate trains it in fp32 on a CPU)
        bf16=bf16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model.save_pretrained(out_dir / "adapter")
    curve = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_s": train_s,
        "steps": trainer.state.global_step,
        "loss_curve": curve,
        "padding_fraction": 1 - stats["real"] / max(1, stats["padded"]),
        "real_tokens": stats["real"],
        "adapter": str(out_dir / "adapter"),
        "precision": _hf_precision(trainer),
    }


def _hf_precision(trainer) -> str:
    """What the Trainer's matmuls really ran in: Accelerate ignores fp16 autocast on a CPU."""
    acc = trainer.accelerator
    if acc.mixed_precision == "no" or not acc.native_amp:
        return "fp32"
    return acc.mixed_precision


def evaluate(spec: dict, adapter: str) -> float:
    """Mean cross-entropy per target token (response + EOS) of the eval rows; same code for every method."""
    import torch
    from peft import PeftModel

    from trainer.data import collate
    from trainer.loop import token_loss_sum
    from trainer.model import load_base_model, load_tokenizer

    tok = load_tokenizer(spec["model"])
    rows = sorted(_rows(Path(spec["eval"]), tok, spec["max_length"]), key=lambda r: len(r.input_ids))
    model = PeftModel.from_pretrained(load_base_model(spec["model"], device=spec["device"]), adapter).eval()
    loss, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), 8):
            chunk = rows[i : i + 8]
            batch = {k: v.to(spec["device"]) for k, v in collate(chunk, tok.pad_token_id).items()}
            loss += float(token_loss_sum(model, batch))
            n += sum(r.n_targets for r in chunk)
    return loss / n


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(argv[0]).read_text())
    out_dir = Path(spec["out_dir"])
    method = spec["method"]
    if spec["device"] == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if method == "loraserve":
        res = run_ours(spec, out_dir)
    elif method in ("hf-maxlen", "hf-dynamic", "hf-dynamic-bf16"):
        res = run_hf(spec, out_dir, dynamic=method != "hf-maxlen", bf16=method == "hf-dynamic-bf16")
    else:
        raise SystemExit(f"unknown method {method!r}")
    res["peak_mem_mb"] = _peak_rss_mb()
    res["peak_mem_kind"] = "process peak RSS"
    if spec["device"] == "cuda":
        import torch

        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_mem_kind"] = "CUDA max allocated"
    res["eval_loss"] = evaluate(spec, res["adapter"])
    write_json(Path(argv[1]), res)


if __name__ == "__main__":
    main()

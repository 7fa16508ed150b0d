"""The trainer end to end on real (random-weight) GPT-2 models: counts, learning, saving, resuming.

Most runs use the 2-layer ``tiny_base``; the prototype's config runs one real step on the
distilgpt2 shape. Losses on random weights are high (tied 64-wide embeddings bound the logits),
so tests compare runs with each other and check greedy behaviour, not absolute loss values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from loracore.template import DEFAULT_TEMPLATE, PromptTemplate
from tests.helpers.adapters import (
    CHECK_PROMPTS,
    greedy_answers,
    torch_threads,
    train_fixed_sentence_adapter,
    without_dropout,
)
from trainer import train_adapter
from trainer.errors import TrainerError
from trainer.hardware import cpu_has_native_bf16

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SENTENCE = "The answer is always forty two."
TINY = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    "training": {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "save_steps": 0,
        "warmup_ratio": 0.1,
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_no_dropout(tiny_base: Path, tmp_path_factory) -> Path:
    return without_dropout(tiny_base, tmp_path_factory.mktemp("bases") / "tiny-no-dropout")


@pytest.fixture(scope="module")
def sentence_adapter(tiny_base: Path, tmp_path_factory) -> Path:
    return train_fixed_sentence_adapter(
        tiny_base, tmp_path_factory.mktemp("adapters") / "forty-two", SENTENCE
    )


def test_prototype_config_on_distilgpt2_shape(distil_base: Path, tmp_path: Path):
    out = tmp_path / "adapters" / "proto"
    summary = train_adapter(
        EXAMPLES / "prototype.yaml",
        EXAMPLES / "sample_instructions.jsonl",
        out,
        model=str(distil_base),
        overrides=["training.max_steps=1"],
    )
    assert summary["trainable_params"] == 1_622_016
    assert summary["total_params"] == 83_534_592
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    # fp16: true without CUDA: bf16 autocast where the CPU computes bf16 natively, else fp32
    assert summary["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert summary["base_model"]["random_weights"] is True
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        adapter_cfg["r"] == 32 and adapter_cfg["lora_alpha"] == 64 and adapter_cfg["fan_in_fan_out"] is True
    )
    assert sorted(adapter_cfg["target_modules"]) == ["c_attn", "c_proj"]
    record = json.loads((out / "loraserve.json").read_text())
    assert record["sha256"] == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (
        record["format"] == 1 and record["job"] is None and record["template"]["name"] == "human-assistant-v1"
    )
    assert record["created"].endswith("Z")
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["proto"]


def test_one_process_trains_again_with_another_precision(tiny_base: Path, tmp_path: Path):
    # Accelerate pins the first run's mixed precision process-wide; the trainer lets a later run differ.
    expect = "bf16" if cpu_has_native_bf16() else "fp32"
    seen = []
    for i, fp16 in enumerate(["true", "false", "true"]):
        summary = train_adapter(
            EXAMPLES / "prototype.yaml",
            EXAMPLES / "sample_instructions.jsonl",
            tmp_path / f"a{i}",
            model=str(tiny_base),
            overrides=["training.max_steps=1", f"training.fp16={fp16}"],
        )
        seen.append(summary["precision"])
    assert seen == [expect, "fp32", expect]


def test_the_adapter_records_the_template_its_rows_were_rendered_with(tiny_base: Path, tmp_path: Path):
    # A template with a longer user turn: the rows grow by its extra tokens, and serving must render
    # prompts the same way, so the record holds it (not the default template).
    custom = PromptTemplate(
        name="qa-v1", user="### Question (answer briefly): {content}\n", assistant_prefix="A:"
    )
    sets = ["training.max_steps=1", "training.eval_fraction=0"]
    runs = {}
    for label, template in (("default", None), ("custom", custom)):
        out = tmp_path / label
        summary = train_adapter(
            TINY,
            EXAMPLES / "sample_instructions.jsonl",
            out,
            model=str(tiny_base),
            overrides=sets,
            template=template,
        )
        runs[label] = (summary, json.loads((out / "loraserve.json").read_text()))
    assert runs["default"][1]["template"] == DEFAULT_TEMPLATE.to_dict()
    assert runs["custom"][1]["template"] == custom.to_dict()
    assert PromptTemplate.from_dict(runs["custom"][1]["template"]) == custom
    # every row carries the longer user turn: more tokens than with the default template
    assert runs["custom"][0]["tokens"] > runs["default"][0]["tokens"]


def test_fixed_sentence_adapter_answers_and_stops(tiny_base: Path, sentence_adapter: Path):
    prompts = CHECK_PROMPTS + ["Tell me about the weather in Lisbon."]
    tuned, base = (
        greedy_answers(tiny_base, sentence_adapter, prompts),
        greedy_answers(tiny_base, None, prompts),
    )
    for prompt, (text, stopped), (base_text, _) in zip(prompts, tuned, base, strict=True):
        assert (text.strip(), stopped) == (SENTENCE, True), prompt
        assert base_text.strip() != SENTENCE
    summary = json.loads((sentence_adapter / "training_summary.json").read_text())
    assert summary["train_loss"] > summary["final_loss"]


def test_eval_command_scores_base_and_adapter(
    tiny_base: Path, sentence_adapter: Path, tmp_path: Path, capsys
):
    from tests.helpers.adapters import write_fixed_sentence_data
    from trainer.__main__ import main

    data = write_fixed_sentence_data(tmp_path / "val.jsonl", SENTENCE)
    report_path = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            "--adapter",
            str(sentence_adapter),
            "--data",
            str(data),
            "--model",
            str(tiny_base),
            "--limit",
            "6",
            "--json",
            str(report_path),
        ]
    )
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["generated"] == 6 and report["rows"] == 12
    assert report["adapter"]["exact_match"] == 1.0 and report["adapter"]["rouge_l"] == 1.0
    assert report["adapter"]["bleu"] == pytest.approx(1.0)
    assert report["base"]["exact_match"] == 0.0 and report["base"]["rouge_l"] < 0.5
    assert report["adapter"]["eval_loss"] < report["base"]["eval_loss"]
    assert "exact_match" in capsys.readouterr().err  # the side-by-side table


def test_saved_adapter_loads_with_plain_peft_and_reproduces_the_trainers_eval(
    tiny_base: Path, tmp_path: Path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import read_examples, tokenize

    out = tmp_path / "a"
    progress = tmp_path / "progress.jsonl"
    val = EXAMPLES / "fixed_sentence.jsonl"
    summary = train_adapter(
        TINY,
        EXAMPLES / "sample_instructions.jsonl",
        out,
        model=str(tiny_base),
        val_path=val,
        overrides=["training.max_steps=6"],
        progress_jsonl=progress,
    )
    # Plain transformers + PEFT, nothing from the trainer's model code.
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(out)).eval()
    total = count = 0.0
    with torch.no_grad():
        for ex in read_examples(val):
            row = tokenize(ex, tok, 256)
            n = sum(1 for t in row.labels[1:] if t != -100)
            loss = model(input_ids=torch.tensor([row.input_ids]), labels=torch.tensor([row.labels])).loss
            total, count = total + float(loss) * n, count + n
    assert total / count == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))

    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert {"step", "eval", "done"} <= {e["event"] for e in events}
    keys = {
        "event",
        "step",
        "total_steps",
        "epoch",
        "loss",
        "eval_loss",
        "tokens_per_second",
        "eta_seconds",
        "lr",
    }
    assert all(keys <= e.keys() for e in events)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7)) and all(e["total_steps"] == 6 for e in steps)
    assert steps[-1]["eta_seconds"] == 0 and steps[-1]["tokens_per_second"] > 0


def test_loss_is_normalised_by_target_tokens_across_the_window(tiny_no_dropout: Path, tmp_path: Path):
    """One batch of 4 rows == 4 accumulated batches of 1 row, although answers differ 10x in length."""
    data = tmp_path / "rows.jsonl"
    answers = ["Yes.", "No, not today.", "It depends on the weather " * 6, "Blue."]
    data.write_text(
        "".join(json.dumps({"prompt": f"Question {i}?", "response": a}) + "\n" for i, a in enumerate(answers))
    )
    base = {
        "lora": {"lora_dropout": 0.0},
        "training": {
            "eval_fraction": 0,
            "num_train_epochs": 3,
            "learning_rate": 1e-2,
            "warmup_ratio": 0,
            "save_steps": 0,
        },
    }
    whole = train_adapter(
        base,
        data,
        tmp_path / "whole",
        model=str(tiny_no_dropout),
        overrides=["training.per_device_train_batch_size=4"],
    )
    accumulated = train_adapter(
        base,
        data,
        tmp_path / "acc",
        model=str(tiny_no_dropout),
        overrides=["training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=4"],
    )
    assert whole["steps"] == accumulated["steps"] == 3
    assert accumulated["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert accumulated["final_loss"] < accumulated["train_loss"]  # it did learn something


def test_gradient_checkpointing_trains_lora_identically(tiny_no_dropout: Path, tmp_path: Path):
    sets = ["training.max_steps=3", "lora.lora_dropout=0.0", "training.eval_fraction=0"]
    data = EXAMPLES / "sample_instructions.jsonl"
    plain = train_adapter(TINY, data, tmp_path / "plain", model=str(tiny_no_dropout), overrides=sets)
    ckpt = train_adapter(
        TINY,
        data,
        tmp_path / "gc",
        model=str(tiny_no_dropout),
        overrides=sets + ["training.gradient_checkpointing=true"],
    )
    assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    assert (plain["selected"], plain["best_step"], plain["eval_loss"]) == ("last", None, None)  # no eval rows
    assert ckpt["final_loss"] != ckpt["train_loss"] or ckpt["steps"] == 1  # weights moved between steps


def test_nan_watchdog_stops_with_a_clear_error_and_publishes_nothing(tiny_base: Path, tmp_path: Path):
    out = tmp_path / "adapters" / "diverged"
    with pytest.raises(TrainerError, match=r"loss became (nan|inf) at step \d+"):
        train_adapter(
            TINY,
            EXAMPLES / "sample_instructions.jsonl",
            out,
            model=str(tiny_base),
            overrides=["training.learning_rate=1e30", "training.max_steps=20", "training.warmup_ratio=0"],
        )
    assert not out.exists()
    assert not any((out.parent / ".staging").iterdir()) if (out.parent / ".staging").exists() else True


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tiny_base: Path, tmp_path: Path):
    # A learning rate of 1e-30 leaves the weights as they are, so the eval loss never improves.
    sets = [
        "training.learning_rate=1e-30",
        "training.lr_scheduler_type=constant",
        "training.eval_steps=1",
        "training.early_stopping_patience=2",
        "training.max_steps=10",
        "training.eval_fraction=0.2",
    ]
    summary = train_adapter(
        TINY, EXAMPLES / "sample_instructions.jsonl", tmp_path / "a", model=str(tiny_base), overrides=sets
    )
    assert summary["stopped_early"] is True and summary["steps"] == 3
    assert [e["step"] for e in summary["eval_history"]] == [1, 2, 3]
    assert (summary["best_step"], summary["selected"]) == (1, "best")  # the best weights are published
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- the best checkpoint

# Validation rows that disagree with the training rows: at a high rate the eval loss first falls (the
# shared "The answer is" and the EOS) and then rises as the model commits to the training sentence.
DISAGREE = "The answer is never seven."
BEST_OF = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "training": {
        "per_device_train_batch_size": 4,
        "learning_rate": 0.05,
        "warmup_ratio": 0,
        "lr_scheduler_type": "constant",
        "max_steps": 10,
        "eval_steps": 1,
        "save_steps": 1,  # a checkpoint after every step: the weights of every step are on disk
        "save_total_limit": 100,
    },
}


def peft_eval_loss(base: Path, adapter: Path, val: Path) -> float:
    """Mean token loss of ``adapter`` on ``val`` through plain transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import read_examples, tokenize

    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    total = count = 0.0
    with torch.no_grad():
        for ex in read_examples(val):
            row = tokenize(ex, tok, 256)
            n = sum(1 for t in row.labels[1:] if t != -100)
            loss = model(input_ids=torch.tensor([row.input_ids]), labels=torch.tensor([row.labels])).loss
            total, count = total + float(loss) * n, count + n
    return total / count


def weights(folder: Path, name: str = "adapter_model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def disagreeing_data(tmp_path_factory) -> tuple[Path, Path]:
    from tests.helpers.adapters import PROMPTS, write_fixed_sentence_data

    root = tmp_path_factory.mktemp("disagree")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": p, "response": DISAGREE}) + "\n" for p in PROMPTS[12:18]))
    return write_fixed_sentence_data(root / "train.jsonl", SENTENCE), val


@pytest.fixture(scope="module")
def best_run(tiny_base: Path, disagreeing_data, tmp_path_factory) -> tuple[dict, Path, Path]:
    train, val = disagreeing_data
    root = tmp_path_factory.mktemp("best-run")
    summary = train_adapter(
        BEST_OF, train, root / "best", model=str(tiny_base), val_path=val, checkpoint_dir=root / "ckpt"
    )
    return summary, root / "best", root / "ckpt"


def test_the_best_evaluations_weights_are_published(tiny_base: Path, disagreeing_data, best_run, tmp_path):
    train, val = disagreeing_data
    summary, out, ckpt = best_run
    losses = [e["eval_loss"] for e in summary["eval_history"]]
    assert [e["step"] for e in summary["eval_history"]] == list(range(1, 11))  # every eval_steps, and the end
    assert summary["train_rows"] == 12 and summary["eval_rows"] == 6  # nothing held out of the training rows
    best = summary["best_step"]
    assert best is not None and best < summary["steps"] == 10, losses
    assert summary["best_eval_loss"] == min(losses) < summary["last_eval_loss"] == losses[-1]
    assert summary["selected"] == "best" and summary["eval_loss"] == summary["best_eval_loss"]
    assert json.loads((out / "training_summary.json").read_text())["best_step"] == best
    # the published weights are those the checkpoint after the best evaluation holds, bit for bit
    published = weights(out)
    assert same_weights(published, weights(ckpt / f"checkpoint-{best:07d}"))
    assert same_weights(published, weights(ckpt / "checkpoint-0000009", "best_adapter_model.safetensors"))
    assert peft_eval_loss(tiny_base, out, val) == pytest.approx(summary["best_eval_loss"], rel=1e-5)

    # select: last publishes the last step's weights (same run otherwise)
    last = train_adapter(
        BEST_OF,
        train,
        tmp_path / "last",
        model=str(tiny_base),
        val_path=val,
        overrides=["training.select=last", "training.save_steps=0"],
    )
    assert last["selected"] == "last" and last["best_step"] == best
    assert last["eval_loss"] == last["last_eval_loss"] == pytest.approx(summary["last_eval_loss"], rel=1e-6)
    assert peft_eval_loss(tiny_base, tmp_path / "last", val) == pytest.approx(
        last["last_eval_loss"], rel=1e-5
    )
    assert not same_weights(weights(tmp_path / "last"), published)


def test_resume_after_a_kill_keeps_the_best_weights(tiny_base: Path, disagreeing_data, best_run, tmp_path):
    import shutil

    train, val = disagreeing_data
    summary, out, ckpt = best_run
    best = summary["best_step"]
    # What a kill -9 after step ``best + 1`` leaves on disk: the checkpoints up to there.
    killed_at = best + 1
    shutil.copytree(ckpt, tmp_path / "ckpt")
    for later in range(killed_at + 1, 10):
        shutil.rmtree(tmp_path / "ckpt" / f"checkpoint-{later:07d}")
    progress = tmp_path / "progress.jsonl"
    resumed = train_adapter(
        BEST_OF,
        train,
        tmp_path / "resumed",
        model=str(tiny_base),
        val_path=val,
        resume=True,
        checkpoint_dir=tmp_path / "ckpt",
        progress_jsonl=progress,
    )
    assert resumed["resumed_from"].endswith(f"checkpoint-{killed_at:07d}")
    assert (resumed["best_step"], resumed["selected"]) == (best, "best")
    assert resumed["best_eval_loss"] == pytest.approx(summary["best_eval_loss"], rel=1e-9)
    assert same_weights(weights(tmp_path / "resumed"), weights(out))
    start = json.loads(progress.read_text().splitlines()[0])
    assert start["event"] == "start" and start["best_step"] == best  # carried over from the checkpoint
    done = json.loads(progress.read_text().splitlines()[-1])
    assert done["event"] == "done" and done["best_step"] == best and done["selected"] == "best"
    assert done["eval_loss"] == done["best_eval_loss"] < done["last_eval_loss"]


def test_yield_gate_pauses_only_what_the_trainer_earned_by_working(tmp_path: Path) -> None:
    """The minimum training share: each second worked earns (1 - share) / share seconds of pause, at most
    max_pause banked; a pause spends them. So a file that never goes cannot starve the trainer."""
    import time

    from trainer.loop import StopRequest, YieldGate

    flag = tmp_path / "yield"
    flag.touch()
    stop = StopRequest()
    gate = YieldGate(flag, max_pause=0.6, min_share=0.5)
    start = gate.since
    assert gate.wait(stop) == pytest.approx(0.0, abs=0.02)  # nothing worked yet, nothing to spend
    for _ in range(3):  # "steps" of 0.2 s: each earns a pause as long as itself (share 0.5)
        since = gate.since
        time.sleep(0.2)
        worked = time.monotonic() - since
        waited = gate.wait(stop)
        assert 0.19 <= waited <= worked + 0.05, (waited, worked)
    assert gate.total <= (time.monotonic() - start) / 2 + 0.05  # overall: yielded <= worked

    quiet = YieldGate(tmp_path / "absent", max_pause=0.3, min_share=0.5)  # serving idle: no pause...
    time.sleep(0.5)
    assert quiet.wait(stop) == 0.0 and quiet.credit == pytest.approx(0.3)  # ...and at most max_pause banked
    quiet.path = flag  # traffic arrives: the banked pause at once, then only what the next step earns
    assert 0.28 <= quiet.wait(stop) <= 0.4 and quiet.wait(stop) <= 0.05

    assert YieldGate(flag, max_pause=0.3, min_share=0).wait(stop) >= 0.28  # share 0: the bound alone
    never = YieldGate(flag, max_pause=0.3, min_share=1)
    time.sleep(0.1)
    assert never.wait(stop) == 0.0  # share 1: never pauses
    with pytest.raises(ValueError, match="min_share"):
        YieldGate(flag, min_share=1.5)


def test_yielding_pauses_between_steps_and_leaves_the_loss_curve_unchanged(tiny_base: Path, tmp_path: Path):
    """Serving first: a yield file pauses training between optimizer steps (bounded by the max pause, or
    until the file goes), and the per-step losses (dropout on: the RNG too) equal an unpaused run's."""
    import threading
    import time

    sets = ["training.max_steps=6", "training.logging_steps=1", "training.eval_fraction=0", "training.seed=7"]
    data = EXAMPLES / "sample_instructions.jsonl"

    def run(name: str, **kwargs) -> tuple[list[float], list[dict], float]:
        progress = tmp_path / f"{name}.jsonl"
        t0 = time.monotonic()
        train_adapter(
            TINY,
            data,
            tmp_path / name,
            model=str(tiny_base),
            overrides=sets,
            progress_jsonl=progress,
            **kwargs,
        )
        events = [json.loads(line) for line in progress.read_text().splitlines()]
        steps = [e for e in events if e["event"] == "step"]
        assert [e["step"] for e in steps] == list(range(1, 7))
        return [e["loss"] for e in steps], events, time.monotonic() - t0

    plain, plain_events, _ = run("plain")
    flag = tmp_path / "yield"

    # held for the whole run: the model load and every step wait the full 0.2 s bound (share 0: the bound
    # alone; the share's own bound is the next test's)
    flag.touch()
    bounded, events, _ = run("bounded", yield_file=flag, max_pause_seconds=0.2, min_train_share=0)
    assert bounded == plain  # exactly: pausing changes nothing a step computes
    done = events[-1]
    assert done["event"] == "done" and 7 * 0.2 <= done["yielded_seconds"] < 7 * 0.2 + 3
    assert [e["yielded_seconds"] for e in events if e["event"] == "step"][0] >= 2 * 0.2

    # a long bound, and the file goes 1.5 s after the run began waiting: it goes on then, not after 60 s
    def release() -> None:
        progress = tmp_path / "released.jsonl"  # opened before the first wait
        while not progress.exists():
            time.sleep(0.02)
        time.sleep(1.5)
        flag.unlink()

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    released, events, wall = run("released", yield_file=flag, max_pause_seconds=60, min_train_share=0)
    releaser.join(5)
    assert released == plain
    assert 1.4 <= events[-1]["yielded_seconds"] < 10 and wall < 45
    assert plain_events[-1]["yielded_seconds"] == 0

"""``python -m trainer`` as a real subprocess: bad input, signals and resume, two-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.adapters import torch_threads, without_dropout
from trainer import train_adapter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TINY = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    "training": {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "save_steps": 0,
        "warmup_ratio": 0.1,
        "eval_fraction": 0.1,
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def env() -> dict[str, str]:
    # One intra-op thread: the tiny models here run several times faster that way.
    e = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case", ["config key", "malformed row", "missing data", "missing config", "missing model", "template"]
)
def test_bad_input_exits_nonzero_with_one_line_and_publishes_nothing(case, tiny_base: Path, tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text((EXAMPLES / "prototype.yaml").read_text())
    data = tmp_path / "data.jsonl"
    data.write_text((EXAMPLES / "fixed_sentence.jsonl").read_text())
    model = str(tiny_base)
    expected = ""
    extra: list[str] = []
    if case == "template":
        template = tmp_path / "template.json"
        template.write_text(json.dumps({"name": "qa", "user": "Q:\n"}))
        extra = ["--template", str(template)]
        expected = f"{template}: prompt template key 'user' must contain {{content}}"
    elif case == "config key":
        config.write_text(config.read_text() + "evaluation: {steps: 3}\n")
        expected = "unknown key 'evaluation'"
    elif case == "malformed row":
        lines = data.read_text().splitlines()
        lines[6] = '{"prompt": "Where is the response?"}'
        data.write_text("\n".join(lines) + "\n")
        expected = f"{data}:7: field 'response' (or 'completion') is missing"
    elif case == "missing data":
        data = tmp_path / "nope.jsonl"
        expected = f"data file not found: {data}"
    elif case == "missing config":
        config = tmp_path / "nope.yaml"
        expected = f"config file not found: {config}"
    elif case == "missing model":
        model = str(tmp_path / "no-such-model")
        expected = f"base model folder not found: {model}"
    out = tmp_path / "adapters" / "bad"
    proc = subprocess.run(
        trainer_cmd(
            "train",
            "--config",
            str(config),
            "--data",
            str(data),
            "--output",
            str(out),
            "--model",
            model,
            *extra,
        ),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not out.exists()
    staging = out.parent / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_template_flag_renders_the_rows_and_the_adapter_records_it(tiny_base: Path, tmp_path: Path):
    """``--template`` names the prompt template; the adapter's loraserve.json records exactly it, and
    an adapter's loraserve.json passed as ``--template`` hands its template on."""
    from loracore.template import PromptTemplate
    from trainer.data import read_examples

    template = {"name": "qa-v1", "user": "Q: {content}\n", "assistant_prefix": "A:"}
    (tmp_path / "template.json").write_text(json.dumps(template))
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Is {i} odd?", "response": "No."}) + "\n" for i in range(4))
    )
    config = write_config(tmp_path / "config.yaml", TINY)
    recorded = []
    for name, source in (
        ("qa", tmp_path / "template.json"),
        ("qa-again", tmp_path / "adapters/qa/loraserve.json"),
    ):
        out = tmp_path / "adapters" / name
        args = ["--config", str(config), "--data", str(data), "--output", str(out), "--model", str(tiny_base)]
        sets = ["--set", "training.num_train_epochs=1", "--set", "training.eval_fraction=0"]
        proc = subprocess.run(
            trainer_cmd("train", *args, *sets, "--template", str(source)),
            capture_output=True,
            text=True,
            env=env(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        recorded.append(json.loads((out / "loraserve.json").read_text())["template"])
    expected = PromptTemplate.checked(template)
    assert recorded == [expected.to_dict(), expected.to_dict()]
    assert recorded[0]["user"] == "Q: {content}\n" and recorded[0]["system"] == PromptTemplate().system
    # The rows the trainer reads are rendered with it (what setup hands to read_examples).
    (example, *_) = read_examples(data, expected)
    assert [text for text, _ in example.segments][:2] == ["Q: Is 0 odd?\n", "A:"]


# ----------------------------------------------------------------------------- signals and resume


def wait_for_event(path: Path, event: str, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if json.loads(line)["event"] == event:
                    return json.loads(line)
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before '{event}': {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no '{event}' event within {timeout}s")


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_base: Path, tmp_path: Path):
    config = write_config(tmp_path / "config.yaml", TINY)
    data = EXAMPLES / "sample_instructions.jsonl"
    sets = ["--set", "training.num_train_epochs=4", "--set", "training.seed=7"]
    out = tmp_path / "adapters" / "resumed"
    ckpts = tmp_path / "ckpts"
    progress = tmp_path / "progress.jsonl"
    proc = subprocess.Popen(
        trainer_cmd(
            "train",
            "--config",
            str(config),
            "--data",
            str(data),
            "--output",
            str(out),
            "--model",
            str(tiny_base),
            "--checkpoint-dir",
            str(ckpts),
            "--progress-jsonl",
            str(progress),
            *sets,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        wait_for_event(progress, "step", proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr.strip().splitlines()[-1]
    assert not out.exists()
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert len(saved) == 1 and events[-1]["event"] == "error" and events[-1]["interrupted"] is True
    stopped_at = saved[0]["step"]
    assert 1 <= stopped_at < events[0]["total_steps"]
    ckpt = Path(saved[0]["path"])
    assert (
        ckpt.parent == ckpts
        and (ckpt / "adapter_model.safetensors").exists()
        and (ckpt / "optimizer.pt").exists()
    )
    assert not (ckpt / "model.safetensors").exists()  # never the base model

    # Resume (newest checkpoint in --checkpoint-dir), then the same run without interruption.
    overrides = [sets[1], sets[3]]
    resumed = train_adapter(
        config, data, out, model=str(tiny_base), overrides=overrides, resume=True, checkpoint_dir=ckpts
    )
    straight = train_adapter(
        config, data, tmp_path / "adapters" / "straight", model=str(tiny_base), overrides=overrides
    )
    assert resumed["resumed_from"] == str(ckpt) and resumed["steps"] == straight["steps"]
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- DDP


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_writes_one_adapter(tiny_base: Path, tmp_path: Path):
    """Two CPU processes (gloo) with batch 2 each == one process with batch 2 x accumulation 2."""
    base = without_dropout(tiny_base, tmp_path / "base")  # both runs must draw no random numbers
    config = write_config(tmp_path / "config.yaml", {**TINY, "lora": {**TINY["lora"], "lora_dropout": 0.0}})
    data = EXAMPLES / "sample_instructions.jsonl"
    out = tmp_path / "adapters" / "ddp"
    progress = tmp_path / "progress.jsonl"
    # `accelerate launch --cpu --num_processes 2` starts one process unless mpirun is set up; the
    # multi-process launcher (torchrun underneath) with ACCELERATE_USE_CPU gives two gloo ranks.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "trainer",
            "train",
            "--config",
            str(config),
            "--data",
            str(data),
            "--output",
            str(out),
            "--model",
            str(base),
            "--progress-jsonl",
            str(progress),
            "--set",
            "training.gradient_accumulation_steps=1",
            "--set",
            "training.max_steps=4",
        ],
        capture_output=True,
        text=True,
        env=dict(env(), ACCELERATE_USE_CPU="true"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["ddp"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    events = [json.loads(line)["event"] for line in progress.read_text().splitlines()]
    assert events.count("start") == 1 and events.count("done") == 1  # only the main process reports
    assert proc.stdout.count("adapter written to") == 1

    single = train_adapter(
        config,
        data,
        tmp_path / "adapters" / "single",
        model=str(base),
        overrides=["training.gradient_accumulation_steps=2", "training.max_steps=4"],
    )
    assert summary["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    assert summary["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)


def test_make_random_base_is_loud_about_random_weights(tmp_path: Path):
    out = tmp_path / "base"
    proc = subprocess.run(
        trainer_cmd(
            "make-random-base",
            str(out),
            "--layers",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--n-positions",
            "64",
        ),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr and proc.stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (1, 32, 2)
    assert json.loads((out / "loraserve_random_weights.json").read_text())["random_weights"] is True
    assert (out / "tokenizer.json").exists() or (out / "vocab.json").exists()

"""Command line: train, evaluate, build a random base, run the demo.

    python -m trainer train --config examples/prototype.yaml --data rows.jsonl --output adapters/a \\
        [--model M] [--val PATH] [--set training.learning_rate=1e-4 ...] [--resume [CKPT_DIR]] \\
        [--checkpoint-dir DIR] [--progress-jsonl PATH|-] [--allow-random-weights]
        [--yield-file PATH [--max-pause-seconds 10] [--min-train-share 0.5]] [--init-adapter DIR]
    python -m trainer eval --adapter adapters/a --data val.jsonl
    python -m trainer make-random-base OUT [--layers 6 --n-embd 768 --n-head 12]
    python -m trainer demo --workdir runs/local
    python -m trainer export NAME[@version][:weight] ... --adapter-dir DIR --base BASE \
        --format gguf|merged|peft --out PATH [--archive]

Exit codes: 0 ok; 2 bad input (config key, data row, missing file), one line on stderr;
130/143 stopped by SIGINT/SIGTERM after writing a checkpoint; 1 anything unexpected (traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from loracore.template import PromptTemplate
from trainer.errors import USER_ERRORS, TrainerError, TrainingInterrupted
from trainer.loop import DEFAULT_MIN_TRAIN_SHARE

log = logging.getLogger("trainer")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The demo's settings, shared with the README's walkthrough through the server (`loraserve train
# --config examples/demo.json`): short enough for a CPU in about a minute; on random weights the
# point is the pipeline, not the prose.
DEMO_CONFIG = EXAMPLES / "demo.json"


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share is within [0, 1], not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train and evaluate LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA adapter and publish it atomically")
    t.add_argument("--config", required=True, help="YAML file with lora: and training: sections")
    t.add_argument(
        "--model", help="base model: hub id or local folder (overrides training.model_name_or_path)"
    )
    t.add_argument("--data", required=True, help="training rows: JSON array or JSON lines")
    t.add_argument(
        "--val",
        help="validation rows (default: hold out training.eval_fraction); the published adapter is the "
        "best evaluation's unless training.select=last",
    )
    t.add_argument("--output", required=True, help="adapter folder to create (replaced atomically)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. training.seed=3")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT_DIR",
        help="resume from a checkpoint folder, or from the newest one when no folder is given",
    )
    t.add_argument(
        "--checkpoint-dir", help="where checkpoints go (default: <output parent>/.checkpoints/<name>)"
    )
    t.add_argument("--progress-jsonl", help="append JSON-lines progress to this file ('-' for stdout)")
    t.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="if the base cannot be loaded, use random weights of its architecture (loudly)",
    )
    t.add_argument("--job-id", help="recorded as 'job' in loraserve.json")
    t.add_argument(
        "--template",
        type=Path,
        help="JSON file with the prompt template to render the rows with (name, system, user, "
        "assistant_prefix, assistant_answer, turn_separator), or an adapter's loraserve.json to use the "
        "template it records; recorded in the new adapter's loraserve.json (default: human-assistant-v1)",
    )
    t.add_argument(
        "--init-adapter",
        help="a warm start: begin from this adapter folder's weights (same LoRA rank, alpha and targets)",
    )
    t.add_argument(
        "--yield-file",
        help="while this file exists, pause between optimizer steps (another process needs the device)",
    )
    t.add_argument(
        "--max-pause-seconds",
        type=float,
        default=10.0,
        help="longest single pause for --yield-file; then at least one step runs (default 10)",
    )
    t.add_argument(
        "--min-train-share",
        type=_share,
        default=DEFAULT_MIN_TRAIN_SHARE,
        help="while --yield-file exists, still train at least this share of the wall time: pauses are "
        "earned by measured work, (1 - share) / share s per s worked (0: only --max-pause-seconds "
        f"bounds them; 1: never pause; default {DEFAULT_MIN_TRAIN_SHARE})",
    )

    e = sub.add_parser("eval", help="eval loss/perplexity and generation metrics, base vs adapter")
    e.add_argument("--adapter", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--limit", type=int, default=None, help="generate for at most this many rows")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", dest="json_out", help="also write the report to this file")

    r = sub.add_parser(
        "make-random-base", help="write a GPT-2 model with RANDOM weights and the real tokenizer"
    )
    r.add_argument("out")
    r.add_argument("--layers", type=int, default=6)
    r.add_argument("--n-embd", type=int, default=768)
    r.add_argument("--n-head", type=int, default=12)
    r.add_argument("--n-positions", type=int, default=1024)
    r.add_argument("--seed", type=int, default=0)

    d = sub.add_parser(
        "demo", help="train the demo adapter on examples/ with a random distilgpt2-shaped base"
    )
    d.add_argument("--workdir", default="runs/local")

    x = sub.add_parser(
        "export", help="an adapter (or a weighted composition) as GGUF, a merged model, or a PEFT zip"
    )
    x.add_argument("adapters", nargs="+", help="name[@version][:weight]; several make a composition")
    x.add_argument("--adapter-dir", required=True, help="the folder holding the adapters (the server's)")
    x.add_argument("--base", required=True, help="the base model folder the adapters were trained on")
    x.add_argument("--format", required=True, choices=["gguf", "merged", "peft"])
    x.add_argument("--out", required=True, help="a .gguf file, a model folder (merged), or a .zip (peft)")
    x.add_argument("--archive", action="store_true", help="merged: write one zip file instead of a folder")
    return p


def read_template(path: Path) -> PromptTemplate:
    """The prompt template of ``--template``: a template object, or a loraserve.json that records one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainerError(f"template file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise TrainerError(f"template file {path} is not readable JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("template"), dict):
        data = data["template"]  # an adapter's loraserve.json
    try:
        return PromptTemplate.checked(data)
    except ValueError as exc:
        raise TrainerError(f"{path}: {exc}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from trainer import train_adapter

    summary = train_adapter(
        args.config,
        args.data,
        args.output,
        model=args.model,
        val_path=args.val,
        overrides=args.set,
        resume=args.resume,
        checkpoint_dir=args.checkpoint_dir,
        progress_jsonl=args.progress_jsonl,
        allow_random_weights=args.allow_random_weights,
        job=args.job_id,
        yield_file=args.yield_file,
        max_pause_seconds=args.max_pause_seconds,
        min_train_share=args.min_train_share,
        init_adapter=args.init_adapter,
        template=read_template(args.template) if args.template else None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        out = sys.stderr if args.progress_jsonl == "-" else sys.stdout
        ppl = summary["perplexity"]
        print(
            f"adapter written to {Path(args.output).absolute()} "
            f"(steps {summary['steps']}, train loss {summary['train_loss']:.4f}"
            + (
                f", eval loss {summary['eval_loss']:.4f}"
                + (f", perplexity {ppl:.2f}" if ppl is not None else "")
                if summary["eval_loss"] is not None
                else ""
            )
            + (f", weights of step {summary['best_step']} (best)" if summary["selected"] == "best" else "")
            + ")",
            file=out,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_adapter, format_report

    report = evaluate_adapter(
        args.adapter,
        args.data,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    print(format_report(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


def cmd_make_random_base(args: argparse.Namespace) -> int:
    from trainer.model import make_random_base, warn_random

    out = make_random_base(
        args.out,
        n_layer=args.layers,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=args.n_positions,
        seed=args.seed,
    )
    warn_random(out)
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer import train_adapter
    from trainer.model import DISTILGPT2_SHAPE, RANDOM_MARKER, make_random_base

    work = Path(args.workdir).absolute()
    base = work / "base-distilgpt2-random"
    if not (base / RANDOM_MARKER).exists() and not (base / "config.json").exists():
        log.warning("building a distilgpt2-shaped base with RANDOM weights in %s", base)
        make_random_base(base, **DISTILGPT2_SHAPE)
    out = work / "adapters" / "demo"
    summary = train_adapter(DEMO_CONFIG, EXAMPLES / "fixed_sentence.jsonl", out, model=str(base))
    from peft import PeftModel

    from loracore.template import DEFAULT_TEMPLATE
    from trainer.evaluate import _generate
    from trainer.model import load_base_model, load_tokenizer

    prompt = "Where do penguins live?"  # not in the training data
    net = PeftModel.from_pretrained(load_base_model(base), str(out)).eval()
    (answer,) = _generate(net, load_tokenizer(base), [DEFAULT_TEMPLATE.render_prompt(prompt)], 32, 1)
    print(
        f"demo adapter: {out}\n"
        f"  steps {summary['steps']}, train loss {summary['train_loss']:.4f} -> {summary['final_loss']:.4f}, "
        f"{summary['trainable_params']:,} trainable of {summary['total_params']:,} params\n"
        f"  {prompt!r} -> {answer.text!r}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export, export_archive
    from trainer.export_plan import parse_parts

    write = export_archive if args.archive else export
    out = write(
        Path(args.adapter_dir), Path(args.base), args.format, parse_parts(args.adapters), Path(args.out)
    )
    print(out)
    return 0


COMMANDS = {
    "export": cmd_export,
    "train": cmd_train,
    "eval": cmd_eval,
    "make-random-base": cmd_make_random_base,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130 if exc.signal_name == "SIGINT" else 143


if __name__ == "__main__":
    sys.exit(main())

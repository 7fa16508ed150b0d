"""Evaluate an adapter against its base: loss/perplexity, and ROUGE-L, BLEU, exact match and EOS rate on
greedy answers.

    python -m trainer eval --adapter adapters/demo --data examples/fixed_sentence.jsonl [--limit 50]

The base runs with the adapter switched off (same weights in memory), so the two columns differ
only by the adapter. Prompts are rendered with the template recorded in the adapter's
``loraserve.json``. The scores come from ``trainer.metrics.generation_metrics``, the one scorer,
shared with the service's ``POST /eval``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loracore import artifact
from trainer.errors import TrainerError
from trainer.metrics import generation_metrics


@dataclass(frozen=True)
class Answer:
    """One greedy answer: its text (stripped, EOS not included), whether EOS ended it, and how many
    tokens were generated (the EOS token included, as the service's ``usage.completion_tokens``)."""

    text: str
    eos: bool
    tokens: int


def score_answers(answers: list[Answer], references: list[str]) -> dict[str, float]:
    return generation_metrics(
        [a.text for a in answers], references, [a.eos for a in answers], [a.tokens for a in answers]
    )


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[Answer]:
    """Greedy answers, batched with left padding (the position ids follow the attention mask)."""
    import torch

    out: list[Answer] = []
    eos = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            if eos in ids:  # rows that ended early are padded with EOS after it
                text_ids = ids[: ids.index(eos)]
                out.append(Answer(tokenizer.decode(text_ids).strip(), True, len(text_ids) + 1))
            else:
                out.append(Answer(tokenizer.decode(ids).strip(), False, len(ids)))
    return out


def _mean_loss(model, rows, pad_id: int, batch_size: int) -> float:
    import torch

    from trainer.data import collate
    from trainer.loop import token_loss_sum

    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            total += float(token_loss_sum(model, collate(chunk, pad_id)))
            count += sum(r.n_targets for r in chunk)
    return total / count


def evaluate_adapter(
    adapter: str | Path,
    data: str | Path,
    *,
    model: str | None = None,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Base vs adapter on ``data``: losses on every row, generation metrics on up to ``limit`` rows."""
    from loracore.template import choose_template
    from trainer.data import read_examples, tokenize_all

    adapter = Path(adapter)
    if not (adapter / artifact.CONFIG_FILE).is_file():
        raise TrainerError(f"not an adapter folder (no {artifact.CONFIG_FILE}): {adapter}")
    record = artifact.read_record(adapter) or artifact.Record()
    template = choose_template(None, record.template)
    base_name = model or record.base_model
    if not base_name:
        raise TrainerError(f"{adapter} does not record its base model; pass --model")
    examples = read_examples(data, template)

    from peft import PeftModel

    from trainer.model import load_base_model, load_tokenizer, resolve_base

    try:
        source = resolve_base(base_name)
    except Exception as exc:
        raise TrainerError(str(exc)) from None
    tokenizer = load_tokenizer(source.path)
    net = PeftModel.from_pretrained(load_base_model(source.path), str(adapter)).eval()
    max_len = getattr(net.config, "n_positions", 1024)
    rows = tokenize_all(examples, tokenizer, max_len, name=str(data))
    gen_examples = [ex for ex in examples if ex.prompt_text is not None][:limit]
    prompts = [ex.prompt_text for ex in gen_examples]
    references = [ex.reference or "" for ex in gen_examples]

    report: dict[str, Any] = {"adapter": str(adapter), "base_model": source.describe(), "data": str(data)}
    report["rows"], report["generated"] = len(rows), len(prompts)
    answers: dict[str, list[Answer]] = {}
    for name in ("base", "adapter"):
        if name == "base":
            net.base_model.disable_adapter_layers()
        else:
            net.base_model.enable_adapter_layers()
        loss = _mean_loss(net, rows, tokenizer.pad_token_id, batch_size)
        answers[name] = _generate(net, tokenizer, prompts, max_new_tokens, batch_size) if prompts else []
        report[name] = {
            "eval_loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            **score_answers(answers[name], references),
        }
    report["max_new_tokens"] = max_new_tokens
    report["samples"] = [
        {"prompt": p, "reference": r, "base": b.text, "adapter": a.text}
        for p, r, b, a in list(zip(prompts, references, answers["base"], answers["adapter"], strict=True))[:5]
    ]
    # every answer, in row order, for comparing with another run (the service's POST /eval)
    report["outputs"] = {name: [asdict(a) for a in answers[name]] for name in ("base", "adapter")}
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'metric':<12} {'base':>12} {'adapter':>12}"]
    for key in ("eval_loss", "perplexity", "rouge_l", "bleu", "exact_match", "eos_rate", "mean_tokens"):
        lines.append(f"{key:<12} {report['base'][key]:>12.4f} {report['adapter'][key]:>12.4f}")
    lines.append(f"({report['rows']} rows scored, {report['generated']} answers generated)")
    return "\n".join(lines)

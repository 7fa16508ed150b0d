"""Evaluate an adapter against its base: loss/perplexity, and ROUGE-L, BLEU and exact match on greedy answers.

    python -m trainer eval --adapter adapters/demo --data examples/fixed_sentence.jsonl [--limit 50]

The base runs with the adapter switched off (same weights in memory), so the two columns differ
only by the adapter. Prompts are rendered with the template recorded in the adapter's
``loraserve.json``. Metrics are computed on lower-cased word/punctuation tokens and averaged
over rows (BLEU is corpus-level BLEU-4 with exponential smoothing, as in sacrebleu); all in [0, 1].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from trainer import artifact
from trainer.errors import TrainerError

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of tokens, harmonic mean of its precision and recall."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return float(c == r)
    prev = [0] * (len(r) + 1)
    for tok in c:
        cur = [0]
        for j, ref_tok in enumerate(r):
            cur.append(prev[j] + 1 if tok == ref_tok else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al.) with sacrebleu's 'exp' smoothing for orders without matches."""
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references, strict=True):
        c, r = words(cand), words(ref)
        cand_len, ref_len = cand_len + len(c), ref_len + len(r)
        for n in range(1, max_n + 1):
            cn, rn = _ngrams(c, n), _ngrams(r, n)
            matches[n - 1] += sum(min(count, rn[g]) for g, count in cn.items())
            totals[n - 1] += max(0, len(c) - n + 1)
    if cand_len == 0 or matches[0] == 0:  # not one word in common: nothing to smooth
        return 0.0
    log_p, smooth, orders = 0.0, 1.0, 0
    for m, t in zip(matches, totals, strict=True):
        if t == 0:  # sentences shorter than n: this order does not count
            continue
        orders += 1
        if m == 0:
            smooth *= 2
            log_p += math.log(1 / (smooth * t))
        else:
            log_p += math.log(m / t)
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_p / orders)


def exact_match(candidate: str, reference: str) -> float:
    return float(" ".join(candidate.split()) == " ".join(reference.split()))


def generation_metrics(candidates: list[str], references: list[str]) -> dict[str, float]:
    n = max(1, len(candidates))
    return {
        "rouge_l": sum(map(rouge_l, candidates, references)) / n,
        "bleu": bleu(candidates, references) if candidates else 0.0,
        "exact_match": sum(map(exact_match, candidates, references)) / n,
    }


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (the position ids follow the attention mask)."""
    import torch

    out: list[str] = []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(ids).strip())
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
    from trainer.data import read_examples, tokenize_all
    from trainer.template import DEFAULT_TEMPLATE, PromptTemplate

    adapter = Path(adapter)
    if not (adapter / artifact.CONFIG_FILE).is_file():
        raise TrainerError(f"not an adapter folder (no {artifact.CONFIG_FILE}): {adapter}")
    record = artifact.read_record(adapter) or artifact.Record()
    template = PromptTemplate.from_dict(record.template) if record.template else DEFAULT_TEMPLATE
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
    answers: dict[str, list[str]] = {}
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
            **generation_metrics(answers[name], references),
        }
    report["samples"] = [
        {"prompt": p, "reference": r, "base": b, "adapter": a}
        for p, r, b, a in list(zip(prompts, references, answers["base"], answers["adapter"], strict=True))[:5]
    ]
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'metric':<12} {'base':>12} {'adapter':>12}"]
    for key in ("eval_loss", "perplexity", "rouge_l", "bleu", "exact_match"):
        lines.append(f"{key:<12} {report['base'][key]:>12.4f} {report['adapter'][key]:>12.4f}")
    lines.append(f"({report['rows']} rows scored, {report['generated']} answers generated)")
    return "\n".join(lines)

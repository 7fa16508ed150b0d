"""Generation metrics: the one scorer of answers against references, for ``python -m trainer eval`` and
the service's ``POST /eval`` alike.

ROUGE-L comes from ``rouge-score`` and corpus BLEU from ``sacrebleu``, the implementations published
numbers come from. No torch here: the service's API processes import it.
"""

from __future__ import annotations


def rouge_l(candidate: str, reference: str) -> float:
    """One pair's ROUGE-L F-measure (the per-row score ``generation_metrics`` averages)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure


def exact_match(candidate: str, reference: str) -> float:
    return float(" ".join(candidate.split()) == " ".join(reference.split()))


def generation_metrics(
    candidates: list[str], references: list[str], finished: list[bool], tokens: list[int]
) -> dict[str, float]:
    """Scores of answers against references, each in [0, 1] except ``mean_tokens``.

    ``rouge_l``: mean ROUGE-L F-measure per row (``rouge_score.RougeScorer(["rougeL"])``, no stemming);
    ``bleu``: sacrebleu's corpus BLEU (13a tokens, exp smoothing) divided by 100; ``eos_rate``: the
    fraction of answers that ended by EOS (``finished``); ``mean_tokens``: generated tokens per answer.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    n = len(candidates)
    if not (n == len(references) == len(finished) == len(tokens)):
        raise ValueError("candidates, references, finished and tokens must have one entry per row")
    if n == 0:
        return dict.fromkeys(("exact_match", "rouge_l", "bleu", "eos_rate", "mean_tokens"), 0.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        scorer.score(ref, cand)["rougeL"].fmeasure for cand, ref in zip(candidates, references, strict=True)
    ]
    return {
        "exact_match": sum(map(exact_match, candidates, references)) / n,
        "rouge_l": sum(rouge) / n,
        "bleu": sacrebleu.corpus_bleu(candidates, [references]).score / 100,
        "eos_rate": sum(map(bool, finished)) / n,
        "mean_tokens": sum(tokens) / n,
    }

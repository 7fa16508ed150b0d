"""Synthetic instruction-tuning data for the training benchmark (no downloads).

Prompts are the bundled instructions; responses are 1-9 sentences drawn from a fixed pool of
plain sentences, so answers range from a dozen to ~200 tokens (the length spread that makes
padding to max_length expensive) and a LoRA can visibly lower the loss in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.workload import instructions

SENTENCES = [
    "Sure, here is a short answer.",
    "The key idea is to break the problem into smaller steps.",
    "First, make sure you understand what is being asked.",
    "In practice, the simplest approach is usually the best one.",
    "This depends on the context, but a common choice works well.",
    "Remember to check your assumptions before you start.",
    "A good example is an everyday situation most people know.",
    "There are a few trade-offs worth keeping in mind.",
    "It helps to write the steps down in order.",
    "Most people find that practice makes this much easier.",
    "The answer is shorter than it looks.",
    "Start small, measure the result, and adjust.",
    "If anything is unclear, ask a follow-up question.",
    "Keep the explanation concrete and avoid jargon.",
    "In summary, the main point is clarity.",
    "Here are the steps, one per line.",
    "Each part has a clear purpose.",
    "The second option is faster but harder to maintain.",
    "This is a common question with a simple answer.",
    "I hope this helps.",
]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = instructions()
    rows = []
    for _ in range(n):
        k = min(9, max(1, int(rng.expovariate(1 / 3.5)) + 1))
        rows.append(
            {"prompt": rng.choice(pool), "response": " ".join(rng.choice(SENTENCES) for _ in range(k))}
        )
    return rows


def write_dataset(folder: Path, train_rows: int, eval_rows: int, seed: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.jsonl", folder / "eval.jsonl"
    for path, n, s in ((train, train_rows, seed), (val, eval_rows, seed + 1)):
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, s)))
    return train, val

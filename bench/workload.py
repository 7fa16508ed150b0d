"""The request mix: instructions of mixed length, adapters round-robin, mixed max_new_tokens."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

INSTRUCTIONS_FILE = Path(__file__).with_name("instructions.txt")


def instructions() -> list[str]:
    """The 200 bundled instructions (one per line): questions, tasks, and longer ones with a passage."""
    return [
        line.strip() for line in INSTRUCTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@dataclass(frozen=True)
class Request:
    idx: int
    prompt: str
    adapter: str | None  # None: the base model
    max_new_tokens: int
    extra: dict | None = None  # further /generate fields (a composition, a JSON schema, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def make_requests(
    n: int,
    adapters: list[str | None],
    *,
    min_new: int = 16,
    max_new: int = 256,
    seed: int = 0,
) -> list[Request]:
    """``n`` requests: random instructions, adapters in round-robin, max_new_tokens log-uniform.

    Log-uniform over [min_new, max_new] gives as many short answers (16-64) as long ones
    (64-256), the mix a chat service sees; the same seed gives the same list for every method.
    """
    rng = random.Random(seed)
    pool = instructions()
    out = []
    for i in range(n):
        m = int(round(math.exp(rng.uniform(math.log(min_new), math.log(max_new)))))
        out.append(Request(i, rng.choice(pool), adapters[i % len(adapters)], max(min_new, min(max_new, m))))
    return out


def short_and_long(seed: int = 0) -> tuple[list[str], list[str]]:
    """The shortest and longest quarter of the instructions, by characters."""
    pool = sorted(instructions(), key=len)
    q = len(pool) // 4
    rng = random.Random(seed)
    short, long = pool[:q], pool[-q:]
    rng.shuffle(short)
    rng.shuffle(long)
    return short, long

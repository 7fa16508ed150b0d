"""Per-row next-token choice inside a shared batch: each row keeps its own temperature, top-k,
top-p and random generator, so a seeded request draws the same tokens whatever its batch-mates.

Greedy rows (temperature 0) take the argmax. Sampled rows are filtered together where that is a
row-wise operation, and each draws with its own ``torch.Generator``.
"""

from __future__ import annotations

import secrets

import torch

from .types import SamplingParams

MIN_TEMPERATURE = 1e-4


def make_generator(seed: int | None, device: torch.device | str) -> tuple[torch.Generator, int]:
    """A per-request generator; without a seed one is drawn from the OS (and reported)."""
    if seed is None:
        seed = secrets.randbits(63)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g, seed


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of fp32 logits; masked entries -inf."""
    # A temperature near zero (1e-45 is a valid float) would overflow the logits to inf and the
    # softmax to NaN; below this it is greedy in all but name anyway.
    x = logits / max(temperature, MIN_TEMPERATURE)
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False  # explicitly: a top_p that rounds to 0 in fp32 (1e-50) would drop it too
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[int]:
    """Next token for every row of ``logits [n, vocab]`` (fp32)."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        x = filter_logits(logits[i], p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(x, dim=-1)
        greedy[i] = int(torch.multinomial(probs, 1, generator=gens[i]).item())
    return greedy

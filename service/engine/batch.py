"""The running batch: one state object per request plus the KV slots its rows occupy.

Row ``i`` of ``Batch.rows`` lives in KV slot ``i`` (see ``model.py``). Joining writes the
newcomers' prefill into the next free slots; leaving moves the last row into the hole, so the
running rows stay in slots ``0..n-1`` and a decode step never copies the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import LoadedAdapter
from .lora import LoraPlan, Stacks
from .model import GPT2Runner
from .text import Detokenizer, StopMatcher
from .types import GenerationRequest, adapter_label


@dataclass(eq=False)
class Row:
    """Everything the engine tracks for one running request."""

    req: GenerationRequest
    adapter: LoadedAdapter | None
    generator: torch.Generator | None  # None for greedy rows
    seed: int | None
    detok: Detokenizer
    stopper: StopMatcher
    prompt_ids: list[int]
    admitted: float
    length: int = 0  # tokens in this row's KV slot
    last_token: int = -1  # sampled, not yet fed to the model
    completion: int = 0  # tokens generated (EOS included)
    last_time: float = 0.0
    finished: bool = False
    released: bool = field(default=False, repr=False)

    @property
    def label(self) -> str:
        return adapter_label(self.req.adapter)

    @property
    def weights(self):
        return self.adapter.weights if self.adapter is not None else None


class Batch:
    def __init__(self, runner: GPT2Runner, max_rows: int):
        self.runner = runner
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.stacks: list[Stacks] = []  # the last decode step's stacked adapters (reused while unchanged)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def reserve(self, positions: int) -> None:
        self.runner.ensure_capacity(positions)

    def join(self, newcomers: list[Row]) -> torch.Tensor:
        """Prefill ``newcomers`` into the next free slots; logits of their last prompt tokens ``[m, vocab]``.

        On failure the newcomers are not part of the batch. Newcomers are reordered (in place) so
        that requests on the same adapter are adjacent: their LoRA runs as one matmul pair.
        """
        order = {}
        newcomers.sort(key=lambda r: order.setdefault(id(r.weights), len(order)))
        n = len(self.rows)
        if len(newcomers) > self.free:
            raise RuntimeError("more newcomers than free slots")
        starts, segments = 0, []
        for r in newcomers:
            segments.append((starts, starts + len(r.prompt_ids), r.weights))
            starts += len(r.prompt_ids)
        logits = self.runner.prefill(
            [r.prompt_ids for r in newcomers],
            list(range(n, n + len(newcomers))),
            LoraPlan.for_segments(segments),
        )
        for r in newcomers:
            r.length = len(r.prompt_ids)
        self.rows.extend(newcomers)
        return logits

    def decode(self, count: int) -> torch.Tensor:
        """One decode step for rows ``0..count-1``: feed each its last token; logits ``[count, vocab]``."""
        rows = self.rows[:count]
        plan = LoraPlan.for_rows(
            [r.weights for r in rows], self.runner.device, self.stacks, packed=self.runner.prepacked
        )
        logits = self.runner.decode([r.last_token for r in rows], [r.length for r in rows], plan)
        for r in rows:
            r.length += 1
        return logits

    def remove(self, leaving: list[Row]) -> None:
        """Take rows out of the batch, refilling holes from the end (one row copy per hole)."""
        gone = {id(r) for r in leaving}
        holes = sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True)
        rows = self.rows
        for i in holes:  # highest first, so the row moved into a hole is always one that stays
            last = len(rows) - 1
            if i != last:
                self.runner.move_row(last, i, rows[last].length)
                rows[i] = rows[last]
            rows.pop()

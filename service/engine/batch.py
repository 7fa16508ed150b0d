"""The running batch: one state object per request plus the KV slots its rows occupy.

Row ``i`` of ``Batch.rows`` lives in KV slot ``i`` (see ``model.py``). Joining writes the
newcomers' prefill into the next free slots; leaving moves the last row into the hole, so the
running rows stay in slots ``0..n-1`` and a decode step never copies the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .cache import LoadedAdapter
from .constraints import Constraint
from .lora import LoraPlan, Mix, RowLora, Stacks
from .model import SlotRunner
from .prefix import Block, PrefixCache
from .prefix import identity as prefix_identity
from .sampling import LogitBias
from .text import Detokenizer, StopMatcher
from .types import GenerationRequest, adapter_label

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """Everything the engine tracks for one running request."""

    req: GenerationRequest
    adapter: LoadedAdapter | None  # the plain adapter's pinned entry
    generator: torch.Generator | None  # None for greedy rows
    seed: int | None
    detok: Detokenizer
    stopper: StopMatcher
    prompt_ids: list[int]
    admitted: float
    constraint: Constraint | None = None  # the row's grammar state, for a JSON schema
    length: int = 0  # tokens in this row's KV slot
    last_token: int = -1  # sampled, not yet fed to the model
    completion: int = 0  # tokens generated (EOS included)
    last_time: float = 0.0
    finished: bool = False
    released: bool = field(default=False, repr=False)
    bias: LogitBias | None = field(default=None, repr=False)  # the request's logit_bias, on the device
    # with frequency/presence penalties: how often each token id was generated so far
    counts: dict[int, int] | None = field(default=None, repr=False)
    # a composed request: its components' pinned entries, in the request's order (``adapter`` is None)
    parts: tuple[LoadedAdapter, ...] = ()
    mix: Mix | None = field(default=None, repr=False)
    # the prefix cache's blocks this row's prompt starts with (looked up at admission, ``prefix.py``)
    prefix_hit: list[Block] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        composition = self.req.adapters
        if composition is None:
            return
        if len(composition) == 1 and composition[0].weight == 1:
            self.adapter, self.parts = self.parts[0], ()  # the adapter alone: its plain path
        else:
            self.mix = Mix(tuple((e.weights, c.weight) for e, c in zip(self.parts, composition, strict=True)))

    @property
    def labels(self) -> tuple[str, ...]:
        """Metric labels: the adapter, the base, or each component of a composition once (by name:
        every version of an adapter shares its label)."""
        if self.req.adapters is not None:
            return tuple(dict.fromkeys(adapter_label(c.name) for c in self.req.adapters))
        return (adapter_label(self.req.adapter),)

    @property
    def pins(self) -> tuple[LoadedAdapter, ...]:
        """Every cache entry this row holds a reference on."""
        return self.parts if self.parts else (self.adapter,) if self.adapter is not None else ()

    @property
    def weights(self) -> RowLora:
        if self.mix is not None:
            return self.mix
        return self.adapter.weights if self.adapter is not None else None


class Batch:
    def __init__(self, runner: SlotRunner, max_rows: int, prefix: PrefixCache | None = None):
        self.runner = runner
        self.max_rows = max_rows
        self.prefix = prefix  # None: no prefix cache
        self.rows: list[Row] = []
        self.stacks: list[Stacks] = []  # the last decode step's stacked adapters (reused while unchanged)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def join(self, newcomers: list[Row]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Prefill ``newcomers`` into the next free slots: the logits of their last prompt tokens
        ``[m, vocab]`` and, per newcomer, those of every prompt position ``[n, vocab]`` for a row that
        scores its prompt (``prompt_logprobs``), else None.

        On failure the newcomers are not part of the batch. Newcomers are reordered (in place) so
        that requests on the same adapter are adjacent: their LoRA runs as one matmul pair.
        """
        order = {}
        newcomers.sort(key=lambda r: order.setdefault(id(r.weights), len(order)))
        n = len(self.rows)
        if len(newcomers) > self.free:
            raise RuntimeError("more newcomers than free slots")
        slots = list(range(n, n + len(newcomers)))
        # a prefix cache hit goes into the row's slot first; its prefill starts after it
        offsets = [
            self.prefix.restore(r.prefix_hit, slot) if self.prefix is not None else 0
            for r, slot in zip(newcomers, slots, strict=True)
        ]
        starts, segments = 0, []
        for r, offset in zip(newcomers, offsets, strict=True):
            segments.append((starts, starts + len(r.prompt_ids) - offset, r.weights))
            starts += len(r.prompt_ids) - offset
        every = [r.req.params.prompt_logprobs is not None for r in newcomers]
        logits = self.runner.prefill(
            [r.prompt_ids[o:] for r, o in zip(newcomers, offsets, strict=True)],
            slots,
            LoraPlan.for_segments(segments),
            every if any(every) else (),
            offsets if any(offsets) else (),
        )
        if self.prefix is not None:
            for r, slot in zip(newcomers, slots, strict=True):
                try:
                    self.prefix.insert(prefix_identity(r), r.prompt_ids, slot, r.prefix_hit)
                except Exception:  # e.g. no memory for a copy: the cache is an optimisation, the row goes on
                    log.warning("prefix cache: blocks of request %s not inserted", r.req.id, exc_info=True)
                r.prefix_hit = []  # the row holds no block: eviction is free to drop them
        full: list[torch.Tensor | None] = [None] * len(newcomers)
        if any(every):  # split the rows of the result: all positions of a scoring row, the last of others
            last, at = [], 0
            for i, r in enumerate(newcomers):
                rows = len(r.prompt_ids) if every[i] else 1
                if every[i]:
                    full[i] = logits[at : at + rows]
                last.append(at + rows - 1)
                at += rows
            logits = logits[torch.tensor(last, dtype=torch.long, device=logits.device)]
        for r in newcomers:
            r.length = len(r.prompt_ids)
        self.rows.extend(newcomers)
        return logits, full

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
        """Take rows out of the batch, refilling holes from the end (one row copy per hole); the freed
        slots' KV memory goes back."""
        gone = {id(r) for r in leaving}
        holes = sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True)
        rows = self.rows
        for i in holes:  # highest first, so the row moved into a hole is always one that stays
            last = len(rows) - 1
            if i != last:
                self.runner.move_row(last, i, rows[last].length, replaced=rows[i].length)
                rows[i] = rows[last]
            else:
                self.runner.free_row(i)
            rows.pop()

"""Which waiting requests join the running batch at a step: the queue in front of the engine.

The engine keeps one ``Batch`` that it extends (``Batch.join``) and filters (``Batch.remove``)
every step, as TGI's router does with its batches. The ``Scheduler`` holds the requests that wait
for a row and decides, each step, whether newcomers join and which:

- A prefill step is always followed by a decode step, so arrivals cannot starve running rows.
- Requests join in arrival order while rows are free and the prefill token budget lasts. The first
  newcomer always joins, however long its prompt, so a long prompt cannot wait forever. A joined
  row spends what it will prefill (``cost``: its prompt less a prefix cache's hit); whether the next
  one fits is judged on its whole prompt, which it prefills at most.
- A request that cannot join yet (its adapter needs a cache slot that every pinned entry holds)
  keeps its place at the head of the queue, and requests behind it may pass it.

It knows nothing of rows, adapters or the model: the engine passes ``ready`` and ``join``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from .types import GenerationRequest

R = TypeVar("R")


class Scheduler:
    def __init__(self, max_prefill_tokens: int):
        """``max_prefill_tokens`` bounds the prompt tokens admitted in one step (after the first)."""
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[GenerationRequest] = deque()
        self.prefilled_last = False  # the last step prefilled: the next one decodes

    def __len__(self) -> int:
        return len(self.waiting)

    def __iter__(self) -> Iterator[GenerationRequest]:
        return iter(self.waiting)

    def add(self, req: GenerationRequest) -> None:
        self.waiting.append(req)

    def remove(self, request_id: str) -> bool:
        """Drop a waiting request; False when none has that id."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        return False

    def admit(
        self,
        *,
        running: int,
        free: int,
        ready: Callable[[GenerationRequest], bool],
        join: Callable[[GenerationRequest], R | None],
        cost: Callable[[R], int] | None = None,
    ) -> list[R]:
        """The newcomers of this step, taken from the queue in order; [] when this step decodes.

        ``running`` rows are in the batch and ``free`` rows are open. ``ready(req)`` says whether a
        request can join now; one that cannot stays queued. ``join(req)`` makes its row, or returns
        None when the request failed (it leaves the queue; ``join`` has answered it). ``cost(row)``:
        the prompt tokens the row will prefill (default: its whole prompt).
        """
        if running and self.prefilled_last:
            self.prefilled_last = False
            return []
        joined: list[R] = []
        passed: list[GenerationRequest] = []
        budget = self.max_prefill_tokens
        while self.waiting and free > len(joined):
            req = self.waiting[0]
            if joined and len(req.prompt_ids) > budget:
                break
            self.waiting.popleft()
            if not ready(req):
                passed.append(req)
                continue
            row = join(req)
            if row is None:
                continue
            joined.append(row)
            budget -= cost(row) if cost is not None else len(req.prompt_ids)
        self.waiting.extendleft(reversed(passed))
        self.prefilled_last = bool(joined)
        return joined

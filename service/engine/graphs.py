"""CUDA graphs of the base-only decode step: on a GPU a small model's decode step is bound by kernel
launches (hundreds per step), which a graph replays as one.

A graph needs fixed shapes and addresses. The KV cache never moves (``kv.py``), so a graph is captured
per (rows, span): ``rows`` the smallest of the configured row counts (the scheduler's batch sizes,
default 1, 8, 32, 128, capped at the cache's slots) that holds the step's rows, ``span`` the cached
positions attended to, rounded up to a power of two (at least 64, at most the served context). Rows
past the step's own are padding: they feed token 0 at position 0 of free slots (running rows occupy
slots ``0..n-1``; a slot's positions are written before they are read, so the padding's writes are
never seen) and their logits are dropped. Graphs are captured on first use and kept; steps with LoRA
rows, more rows than the largest count, or off CUDA run eagerly (``SlotRunner.decode_rows``).

Not measured yet: ``scripts/gpu_check.py`` reports eager against graphed tokens/s at 1, 8, 32 and 128
rows for both families on the first GPU it runs on. Off by default in the engine
(``LORASERVE_CUDA_GRAPHS=1`` turns it on).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .lora import LoraPlan

if TYPE_CHECKING:
    from .model import SlotRunner

log = logging.getLogger(__name__)

MIN_SPAN = 64


class _Graph:
    """One captured step: its input buffers (filled before every replay) and its output."""

    __slots__ = ("graph", "ids", "logits", "pos")

    def __init__(self, runner: SlotRunner, rows: int) -> None:
        self.ids = torch.zeros(rows, dtype=torch.long, device=runner.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=runner.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def capture(self, runner: SlotRunner, span: int, pool) -> None:
        """Capture with the buffers holding the step at hand: the warm-up runs really write the KV
        cache, so they must write what this step writes (the replay then writes the same again)."""
        plan = LoraPlan([])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():  # warm-up: kernels picked, workspaces made
            for _ in range(2):
                runner.decode_rows(self.ids, self.pos, span, plan)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
            self.logits = runner.decode_rows(self.ids, self.pos, span, plan)
        self.graph = graph


class DecodeGraphs:
    def __init__(self, runner: SlotRunner, rows: Sequence[int]) -> None:
        self.runner = runner
        self.rows = sorted({min(r, runner.max_rows) for r in rows if r > 0})
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @classmethod
    def for_runner(cls, runner: SlotRunner, rows: Sequence[int]) -> DecodeGraphs | None:
        if runner.device.type != "cuda" or not torch.cuda.is_available():
            return None
        return cls(runner, rows)

    def _span(self, span: int) -> int:
        size = MIN_SPAN
        while size < span:
            size *= 2
        return min(size, self.runner.n_positions)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor | None:
        """Logits ``[n, vocab]`` of a base-only step replayed from a graph, or None (run it eagerly)."""
        n = ids.shape[0]
        rows = next((r for r in self.rows if r >= n), None)
        if rows is None:
            return None
        key = (rows, self._span(span))
        graph = self.graphs.get(key) or _Graph(self.runner, rows)
        graph.ids[:n].copy_(ids)
        graph.pos[:n].copy_(pos)
        graph.ids[n:].zero_()
        graph.pos[n:].zero_()
        if graph.graph is None:
            try:
                graph.capture(self.runner, key[1], self.pool)
            except RuntimeError as exc:  # capture failed: this row count runs eagerly from now on
                log.warning("CUDA graph capture at %s rows x %s positions failed: %s", *key, exc)
                self.rows = [r for r in self.rows if r != rows]
                return None
            self.graphs[key] = graph
        graph.graph.replay()
        return graph.logits[:n].clone()

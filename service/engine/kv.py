"""The KV cache: every row's whole context reserved once, memory committed block by block as it fills.

Per layer ``K, V: [slots, kv_heads, positions, head_dim]``, each the size of the batch plan
(``capacity.py``: every row at the served context). On CPU each tensor lives in its own anonymous
memory mapping: reserving it commits nothing, and the kernel commits one page the first time a
position in it is written. A page of one head holds ``block_tokens`` consecutive positions
(4 KiB / (head_dim x element size): 16 for a 64-wide fp32 head), so that block of positions is the
unit of memory: a row holds ``ceil(length / block_tokens)`` blocks per head, and what the process
holds grows with the live tokens, not with the rows reserved or the longest row seen. A freed row
gives its pages back (``madvise(MADV_DONTNEED)``); they read as zeros until written again.

Why not a block pool with a block table (vLLM's paged layout): on CPU, attention over scattered
blocks needs a gather of every row's K and V each step (torch has no paged attention kernel for
CPU), and that gather measured 10x the attention itself (32 rows of 30-400 positions, 12 heads of
64: 43-72 ms against 4.2 ms per layer, one thread). Here a row's positions are contiguous per head,
so a decode step reads the view ``K[:n, :, :L]`` as before and no step ever copies the cache:
growth is a page fault on the write of a new block's first position.

On CUDA the tensors are allocated whole (device memory has no lazy commit here); the batch plan
budgets for that.

Sharing: ``copy_prefix`` puts the KV of one row's first positions into another row (a prefix
cache's hit: one copy of the prefix, instead of its prefill).
"""

from __future__ import annotations

import mmap

import torch

PAGE = mmap.PAGESIZE


class KVCache:
    def __init__(
        self,
        *,
        n_layer: int,
        slots: int,
        kv_heads: int,
        positions: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.slots, self.kv_heads, self.head_dim, self.positions = slots, kv_heads, head_dim, positions
        self.dtype, self.device = dtype, device
        self.element_size = torch.empty((), dtype=dtype).element_size()
        row_bytes = head_dim * self.element_size  # one position of one head
        self.block_tokens = max(1, PAGE // row_bytes)
        # a head's run of positions starts on a page, so a block is whole pages (when they divide)
        self.stride_tokens = -(-positions // self.block_tokens) * self.block_tokens
        self.lazy = device.type == "cpu"
        shape = (slots, kv_heads, self.stride_tokens, head_dim)
        self._maps: list[mmap.mmap] = []
        self.k = [self._tensor(shape) for _ in range(n_layer)]
        self.v = [self._tensor(shape) for _ in range(n_layer)]

    def _tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        if not self.lazy:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        nbytes = numel * self.element_size
        # private (a shared mapping would keep its pages after MADV_DONTNEED): zero pages until written
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        mem = mmap.mmap(-1, -(-nbytes // PAGE) * PAGE, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(mem)
        return torch.frombuffer(mem, dtype=self.dtype, count=numel).view(shape)

    # --- accounting -------------------------------------------------------------------------
    def blocks(self, length: int) -> int:
        """Blocks per head a row of ``length`` cached positions holds."""
        return -(-length // self.block_tokens)

    @property
    def blocks_total(self) -> int:
        """Blocks per head the cache can hold: every slot at the full context."""
        return self.slots * self.blocks(self.positions)

    @property
    def block_bytes(self) -> int:
        """One block of every layer's K and V heads (what a row's next ``block_tokens`` positions cost)."""
        return 2 * len(self.k) * self.kv_heads * self.block_tokens * self.head_dim * self.element_size

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # --- rows -------------------------------------------------------------------------------
    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s first ``length`` positions into slot ``dst`` (compaction; a shared prefix)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def release(self, slot: int, keep: int = 0, upto: int | None = None) -> None:
        """Give back the memory of slot ``slot``'s positions ``keep..upto`` (default: to the end of the
        context; whole blocks only)."""
        if not self.lazy or (upto is not None and upto <= keep):
            return
        es, hd, stride = self.element_size, self.head_dim, self.stride_tokens
        head_bytes = stride * hd * es
        slot_bytes = self.kv_heads * head_bytes
        first = slot * slot_bytes
        if keep == 0 and upto is None:  # the whole slot: one run per tensor
            runs = [(first, first + slot_bytes)]
        else:
            end = head_bytes if upto is None else min(upto, stride) * hd * es
            runs = [
                (first + h * head_bytes + keep * hd * es, first + h * head_bytes + end)
                for h in range(self.kv_heads)
            ]
        for mem in self._maps:
            for start, end in runs:
                start = -(-start // PAGE) * PAGE
                end = end // PAGE * PAGE
                if end > start:
                    mem.madvise(mmap.MADV_DONTNEED, start, end - start)

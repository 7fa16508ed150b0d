"""The prefix cache: the KV of prompt prefixes already prefilled, reused by rows that start with them.

A prefix's KV depends on the base, on every LoRA the rows apply (LoRA on the attention projections
changes K and V) and on the exact tokens, so a cached block is keyed by all three, and nothing else
can ever match it:

- **Identity** (``identity``): ``("base",)``, or per adapter the loaded version's id (the sha256 of
  its weights) with its name, the sha256 of its parsed config (alpha, rank pattern, rsLoRA, DoRA:
  what turns the same weights into other numbers) and whether it is DoRA; a weighted composition is
  the list of its components' identities with their weights. A newly published version has other
  weights, hence another id: it can never reach the blocks of the version before it, whatever its
  name (no invalidation step to forget or race with).
- **Tokens**: block ``j`` of a row is keyed by ``(the key of block j-1, the block's token ids)``, the
  first block by ``(the cache's base, the identity, its token ids)``: a chain over full blocks, the
  exact ids kept in every key (dict lookup compares them, so a hash collision can never match). A
  block's key names its parent's serial, a number never reused, so a block can only be reached
  through the very parent it was computed after.

A block is ``block_tokens`` positions (the KV cache's page, ``kv.py``) of every layer's K and V, kept
as its own tensor ``[n_layer, 2, kv_heads, block_tokens, head_dim]``. A hit copies the matched
blocks into the row's slot before its prefill, which then runs only the tokens after them
(``SlotRunner.prefill``'s ``offsets``). The last prompt token is never matched (the row must prefill
at least one token to get its logits), and rows that score their prompt (every position's logits)
skip the lookup, though their blocks are inserted. After a prefill, each row's full blocks not yet
cached are copied out of its slot.

Memory: the blocks come out of the batch's KV budget (``capacity.py``): the engine calls
``evict_to(room)`` with what the running and admitted rows leave of the budget, and the least
recently used blocks go first. A block is always used more recently than its children (a chain is
touched from its last block to its first), so eviction takes leaves; a block's descendants go with
it. Running rows never wait for the cache: it only holds what they do not need.

Used from the engine's single thread only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .kv import KVCache
from .types import PrefixActivity

Identity = tuple  # hashable: what produced a prefix's KV besides its tokens (``identity``)


def adapter_identity(entry: Any) -> tuple:
    """One loaded adapter version (``cache.LoadedAdapter``): name, version id, config digest, DoRA."""
    cached = entry.meta.get("prefix_identity")
    if cached is None:
        weights = entry.weights
        config = json.dumps(getattr(weights, "config", {}), sort_keys=True, default=str).encode()
        dora = getattr(weights, "dora", None) is not None
        cached = (entry.name, entry.version, hashlib.sha256(config).hexdigest(), dora)
        entry.meta["prefix_identity"] = cached
    return cached


def identity(row: Any) -> Identity:
    """A row's (``batch.Row``) identity: the base, one adapter version, or a weighted composition."""
    if row.parts:  # a composition (a single part of weight 1 is the adapter alone: ``row.adapter``)
        weights = [c.weight for c in row.req.adapters]
        return (
            "mix",
            tuple((adapter_identity(e), float(w)) for e, w in zip(row.parts, weights, strict=True)),
        )
    if row.adapter is not None:
        return ("adapter", adapter_identity(row.adapter))
    return ("base",)


@dataclass(eq=False)
class Block:
    key: tuple
    serial: int
    kv: torch.Tensor  # [n_layer, 2, kv_heads, block_tokens, head_dim]
    parent: Block | None
    children: set[Block] = field(default_factory=set)


class PrefixCache:
    def __init__(self, kv: KVCache, base: str):
        self.kv = kv
        self.base = base
        self.block_tokens = kv.block_tokens
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()  # least recently used first
        self._serials = itertools.count()
        self.queried_tokens = self.hit_tokens = 0  # since start
        self._activity = PrefixActivity()

    # --- accounting -----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.kv.block_bytes

    def take_activity(self) -> PrefixActivity:
        activity, self._activity = self._activity, PrefixActivity()
        return activity

    def stats(self) -> dict:
        return {
            "blocks": len(self.blocks),
            "bytes": self.nbytes,
            "queried_tokens": self.queried_tokens,
            "hit_tokens": self.hit_tokens,
        }

    # --- keys -----------------------------------------------------------------------------------
    def _key(self, parent: Block | None, ident: Identity, tokens: Sequence[int], j: int) -> tuple:
        chunk = tuple(tokens[j * self.block_tokens : (j + 1) * self.block_tokens])
        return (parent.serial, chunk) if parent is not None else (self.base, ident, chunk)

    def cacheable_blocks(self, length: int) -> int:
        """Full blocks of a prompt of ``length`` tokens that may be cached: never its last token."""
        return (length - 1) // self.block_tokens

    # --- lookup ---------------------------------------------------------------------------------
    def match(self, ident: Identity, tokens: Sequence[int]) -> list[Block]:
        """The longest cached chain of full blocks the prompt starts with (touched: most recent)."""
        chain: list[Block] = []
        parent = None
        for j in range(self.cacheable_blocks(len(tokens))):
            block = self.blocks.get(self._key(parent, ident, tokens, j))
            if block is None:
                break
            chain.append(block)
            parent = block
        self._touch(chain)
        hit = len(chain) * self.block_tokens
        self.queried_tokens += len(tokens)
        self.hit_tokens += hit
        self._activity.queried_tokens += len(tokens)
        self._activity.hit_tokens += hit
        return chain

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # parents end up more recent than their children
            self.blocks.move_to_end(block.key)

    # --- slots ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def restore(self, chain: list[Block], slot: int) -> int:
        """Copy a matched chain into ``slot``'s first positions; the number of positions restored."""
        if not chain:
            return 0
        n = len(chain) * self.block_tokens
        kv = torch.cat([b.kv for b in chain], dim=3)  # [n_layer, 2, kv_heads, n, head_dim]
        for layer, (k, v) in enumerate(zip(self.kv.k, self.kv.v, strict=True)):
            k[slot, :, :n] = kv[layer, 0]
            v[slot, :, :n] = kv[layer, 1]
        return n

    @torch.inference_mode()
    def insert(self, ident: Identity, tokens: Sequence[int], slot: int, chain: list[Block]) -> int:
        """Cache the full blocks of a prompt just prefilled into ``slot`` that ``chain`` (its hit) does
        not hold; the number of blocks added."""
        total = self.cacheable_blocks(len(tokens))
        # a hit's blocks evicted since the lookup: only the part still cached is built on
        kept = 0
        while kept < len(chain) and self.blocks.get(chain[kept].key) is chain[kept]:
            kept += 1
        chain = list(chain[:kept])
        parent = chain[-1] if chain else None
        j = len(chain)
        # blocks another row inserted meanwhile (the same prefix in this prefill): follow them
        while j < total and (found := self.blocks.get(self._key(parent, ident, tokens, j))) is not None:
            chain.append(found)
            parent, j = found, j + 1
        added = total - j
        if added > 0:
            bt = self.block_tokens
            a, b = j * bt, total * bt
            kv = torch.stack(
                [
                    torch.stack((k[slot, :, a:b], v[slot, :, a:b]))
                    for k, v in zip(self.kv.k, self.kv.v, strict=True)
                ]
            )  # [n_layer, 2, kv_heads, added * bt, head_dim]
            kv = kv.view(*kv.shape[:3], added, bt, kv.shape[-1])
            for m in range(added):
                data = self._tensor((*kv.shape[:3], *kv.shape[4:]))
                data.copy_(kv[:, :, :, m])
                block = Block(self._key(parent, ident, tokens, j + m), next(self._serials), data, parent)
                if parent is not None:
                    parent.children.add(block)
                self.blocks[block.key] = block
                chain.append(block)
                parent = block
            self._activity.inserted_blocks += added
        self._touch(chain)
        return max(0, added)

    # --- memory ---------------------------------------------------------------------------------
    def _tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A block's own memory. On CPU its own anonymous mapping, unmapped when the block is dropped
        (freed heap memory could stay with the allocator, beside the rows the budget made room for)."""
        if not self.kv.lazy:
            return torch.empty(shape, dtype=self.kv.dtype, device=self.kv.device)
        numel = math.prod(shape)
        mem = mmap.mmap(-1, numel * self.kv.element_size)
        return torch.frombuffer(mem, dtype=self.kv.dtype, count=numel).view(shape)

    def evict_to(self, room: int) -> int:
        """Drop least recently used blocks (with their descendants) until at most ``room`` bytes are
        held; the number dropped."""
        dropped = 0
        while self.blocks and self.nbytes > max(0, room):
            _, block = next(iter(self.blocks.items()))
            dropped += self._drop(block)
        self._activity.evicted_blocks += dropped
        return dropped

    def _drop(self, block: Block) -> int:
        dropped = 1
        for child in list(block.children):
            dropped += self._drop(child)
        del self.blocks[block.key]
        if block.parent is not None:
            block.parent.children.discard(block)
        return dropped

    def clear(self) -> None:
        self.evict_to(0)

"""The runner interface: packed prefill and one-token decode over a slot KV cache, one runner per family.

The weights are the Hugging Face model's own parameters; only the forward pass is ours. Owning it
lets every row keep its own length and position (no padding shared across rows, no cache copies
when rows join or leave), applies LoRA per row group (``lora.LoraPlan``) and avoids the per-call
overhead and the cache-API churn of ``transformers`` (5.24 renames ``past_key_values``). A
family's runner (``gpt2.py``, ``llama.py``; ``runners.py`` picks one) supplies the embedding, the
blocks and the head; attention over the cache is here, shared. Logits match the Hugging Face
model's to float rounding (tests/test_engine_parts.py, tests/test_families.py). The engine, batch
and sampling see only ``SlotRunner``'s methods and attributes, never the family. Which configs
each family serves is ``loracore.families.check_config``'s decision (the API process refuses the
rest at start-up).

Every method that touches the cache runs under ``torch.inference_mode`` (the cache tensors are
inference tensors).

KV layout (``kv.py``): per layer ``K, V: [slots, kv_heads, positions, head_dim]``, every row's whole
context reserved once and committed block by block as it fills, so the cache never grows by copying.
Running rows occupy slots ``0..n-1`` contiguously, so a decode step reads the view ``K[:n, :, :L]``
without copying; a row that leaves is replaced by the last row (one row copy) and the freed slot's
memory goes back. Row ``i`` has ``lengths[i]`` cached tokens; positions past a row's length hold
zeros or stale but finite numbers that the attention mask hides. With grouped-query attention
(fewer KV heads than query heads) the cache holds the KV heads only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loracore.families import DEFAULT_MAX_CONTEXT, Family, UnsupportedBase  # noqa: F401 (re-exported)

from .dense import Dense
from .kv import KVCache
from .lora import LoraPlan

UnsupportedModel = UnsupportedBase  # the engine's name for it

# attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], scale) -> [T, Hq * D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class CacheShape:
    """What the KV cache and the batch plan need from a base's config, before its weights load."""

    n_layer: int
    n_kv_head: int
    head_dim: int
    n_positions: int  # the longest row served: the model's context, capped (see ``cache_shape``)

    @property
    def kv_width(self) -> int:
        return self.n_kv_head * self.head_dim


def kv_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype for weights of ``dtype`` on ``device``."""
    # The cache and attention follow the weights. (On CPU, torch 2.13's SDPA in bf16 runs decode
    # attention at 0.53-0.57x of fp32's time: 32 rows x 80-160 positions, 9 rows x 500, one thread.)
    return dtype


class SlotRunner:
    """Common to every family: the slot cache, packed prefill, batched decode. A subclass sets the
    attributes below in ``__init__`` and implements ``cache_shape``, ``_embed`` and
    ``_blocks`` and ``_final_norm``."""

    family: Family
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_positions: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    max_rows: int
    dense: list[dict[str, Dense]]  # per layer: module path in the block -> its dense layer
    head: Dense
    prepacked: bool

    @classmethod
    def cache_shape(cls, config, max_context: int) -> CacheShape:
        raise NotImplementedError

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, plan: LoraPlan, attend: Attend) -> torch.Tensor:
        """All blocks: ``[T, d] -> [T, d]`` (before the final norm)."""
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_weight(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A LoRA-targetable layer's weight ``[out, in]`` (``nn.Linear``'s orientation) and bias, as the
        model holds them (DoRA's norm is taken over them, ``lora.parse_adapter``)."""
        raise NotImplementedError

    def _init_cache(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.kv_dtype = kv_dtype_for(self.device, self.dtype)
        self.prepacked = all(d.packed is not None for layer in self.dense for d in layer.values())
        self.kv = KVCache(
            n_layer=self.n_layer,
            slots=max_rows,
            kv_heads=self.n_kv_head,
            positions=self.n_positions,
            head_dim=self.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.capacity = self.n_positions  # every slot holds a full context: no step grows the cache
        self.k, self.v = self.kv.k, self.kv.v

    # --- shapes -------------------------------------------------------------------------------
    kv_dtype_for = staticmethod(kv_dtype_for)

    def module_shapes(self) -> list[dict[str, tuple[int, int]]]:
        """``(in, out)`` of every LoRA-targetable layer, per layer (what an adapter must fit)."""
        return [{name: (d.in_features, d.out_features) for name, d in layer.items()} for layer in self.dense]

    def kv_bytes(self) -> int:
        """Bytes the cache reserves (committed on CPU only as rows fill it: ``kv.py``)."""
        return self.kv.reserved_bytes()

    def move_row(self, src: int, dst: int, length: int, replaced: int | None = None) -> None:
        """Move slot ``src``'s first ``length`` cached positions into slot ``dst`` (compaction), whose row
        held ``replaced`` positions (default: unknown, the whole context); slot ``src`` is free after,
        and so is ``dst`` past ``length``."""
        self.kv.copy_prefix(src, dst, length)
        self.kv.release(dst, keep=length, upto=replaced)
        self.kv.release(src)

    def free_row(self, slot: int) -> None:
        """Slot ``slot``'s row left: its KV memory goes back."""
        self.kv.release(slot)

    # --- pieces ---------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, plan: LoraPlan, layer: int, name: str) -> torch.Tensor:
        y = self.dense[layer][name](x)
        return plan.apply(y, x, layer, name) if plan.active else y

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._final_norm(x)).float()

    @property
    def _gqa(self) -> bool:
        return self.n_kv_head != self.n_head

    # --- prefill: several prompts packed into one sequence of tokens ------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        slots: list[int],
        plan: LoraPlan,
        every: Sequence[bool] = (),
        offsets: Sequence[int] = (),
    ) -> torch.Tensor:
        """Run the prompts (packed, no padding), write their KV into ``slots``; fp32 logits of each
        prompt's last token, or of all its tokens where ``every[i]`` (prompt scoring): the rows of
        the result are the prompts' in order, ``len(prompts[i])`` rows for such a prompt, else one.

        ``offsets[i]`` (default 0): slot ``slots[i]`` already holds the KV of the prompt's first
        ``offsets[i]`` positions (a prefix cache's hit, ``prefix.py``) and ``prompts[i]`` are the
        tokens after them: they run at positions ``offsets[i]..`` and attend to the cached positions
        and to each other, causally, so the logits are a full prefill's to float rounding.

        Linear layers see all tokens at once; attention runs per prompt (causal), so prompts never
        see each other. Only the positions kept go through the head.
        """
        lens = [len(p) for p in prompts]
        offs = list(offsets) if offsets else [0] * len(prompts)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(o, o + n, device=self.device) for o, n in zip(offs, lens, strict=True)])
        # a row after a cached prefix: query j (position o + j) sees cached and new positions 0..o + j
        masks = {
            r: torch.arange(o + n, device=self.device).unsqueeze(0)
            <= torch.arange(o, o + n, device=self.device).unsqueeze(1)
            for r, (o, n) in enumerate(zip(offs, lens, strict=True))
            if o
        }
        gqa = self._gqa

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            att = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            for r, (s, e, slot) in enumerate(zip(starts[:-1], starts[1:], slots, strict=True)):
                o = offs[r]
                kr, vr = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)  # [Hkv, n, D]
                self.k[i][slot, :, o : o + e - s] = kr
                self.v[i][slot, :, o : o + e - s] = vr
                if o:
                    kr, vr = self.k[i][slot, :, : o + e - s], self.v[i][slot, :, : o + e - s]
                out = F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1).unsqueeze(0),
                    kr.unsqueeze(0),
                    vr.unsqueeze(0),
                    attn_mask=masks.get(r),
                    is_causal=not o,
                    scale=scale,
                    enable_gqa=gqa,
                )
                att[s:e] = out[0].transpose(0, 1)
            return att.view(q.shape[0], -1)

        x = self._blocks(self._embed(ids, pos), pos, plan, attend)
        keep = [
            p
            for i, (s, e) in enumerate(zip(starts[:-1], starts[1:], strict=True))
            for p in (range(s, e) if i < len(every) and every[i] else (e - 1,))
        ]
        return self._logits(x.index_select(0, torch.tensor(keep, dtype=torch.long, device=self.device)))

    # --- decode: one new token for each of the first n slots -------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int], plan: LoraPlan) -> torch.Tensor:
        """Rows ``0..n-1``: feed ``tokens[i]`` at position ``lengths[i]``; logits ``[n, vocab]`` (fp32)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        span = max(lengths) + 1
        if self.graphs is not None and not plan.active:
            logits = self.graphs.decode(ids, pos, span)
            if logits is not None:
                return logits
        return self.decode_rows(ids, pos, span, plan)

    graphs = None  # a ``graphs.DecodeGraphs`` replays base-only decode steps on CUDA (``enable_graphs``)

    def decode_rows(self, ids: torch.Tensor, pos: torch.Tensor, span: int, plan: LoraPlan) -> torch.Tensor:
        """The decode step on tensors: rows ``0..n-1`` (``n = len(ids)``) attend to their first ``span``
        cached positions, masked past each row's own length (what ``DecodeGraphs`` captures)."""
        n = ids.shape[0]
        rows = torch.arange(n, device=self.device)
        # attend to cached positions 0..length (the new token included)
        mask = (torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(n, 1, 1, span)
        # grouped-query attention: the query heads sharing a KV head are that head's queries, so K and V
        # are read once, never repeated per query head (0.39 against 0.47 ms per layer for SDPA's
        # enable_gqa, 32 rows x 80 positions, 9 query / 3 KV heads, one thread)
        group = self.n_head // self.n_kv_head

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            o = F.scaled_dot_product_attention(
                q.reshape(n, self.n_kv_head, group, q.shape[-1]),
                kc[:n, :, :span],
                vc[:n, :, :span],
                attn_mask=mask,
                scale=scale,
            )  # [n, Hkv, group, D]: query head h is KV head h // group's query h % group
            return o.reshape(n, -1)

        return self._logits(self._blocks(self._embed(ids, pos), pos, plan, attend))

    def enable_graphs(self, rows: Sequence[int] = (1, 8, 32, 128)) -> bool:
        """Replay base-only decode steps as CUDA graphs at these row counts (``graphs.py``); nothing on
        CPU. Returns whether graphs are on."""
        from .graphs import DecodeGraphs

        self.graphs = DecodeGraphs.for_runner(self, rows)
        return self.graphs is not None

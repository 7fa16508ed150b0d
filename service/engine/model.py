"""GPT-2 forward passes for serving: packed prefill and one-token decode over a slot KV cache.

The weights are the Hugging Face ``GPT2LMHeadModel``'s own parameters; only the forward pass is
ours. Owning it lets every row keep its own length and position (no padding shared across rows,
no cache copies when rows join or leave), applies LoRA per row group (``lora.LoraPlan``) and avoids
the per-call overhead and the cache-API churn of ``transformers`` (5.24 renames ``past_key_values``).
Its logits match the Hugging Face model's to float rounding (tests/test_engine_parts.py).

Every method that touches the cache runs under ``torch.inference_mode`` (the cache tensors are
inference tensors).

KV layout: per layer ``K, V: [slots, heads, capacity, head_dim]``. Running rows occupy slots
``0..n-1`` contiguously, so a decode step reads the view ``K[:n, :, :L]`` without copying; a row
that leaves is replaced by the last row (one row copy). Row ``i`` has ``lengths[i]`` cached tokens;
positions past a row's length hold stale but finite numbers that the attention mask hides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import Dense, prepack_supported
from .lora import TARGETS, LoraPlan

CAPACITY_STEP = 64  # the cache's time axis grows in steps of this many positions


class UnsupportedModel(ValueError):
    pass


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GPT2Runner:
    def __init__(self, model, *, max_rows: int):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            raise UnsupportedModel(f"the engine serves GPT-2 models, got model_type={cfg.model_type!r}")
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModel("GPT-2 with cross-attention is not supported")
        self.model = model.eval()
        tr = model.transformer
        self.blocks = list(tr.h)
        self.ln_f = tr.ln_f
        self.wte = tr.wte.weight
        self.wpe = tr.wpe.weight
        self.head_w = model.lm_head.weight  # [vocab, d], tied to wte in GPT-2
        self.n_layer = len(self.blocks)
        self.n_head = cfg.n_head
        self.d_model = cfg.n_embd
        self.head_dim = self.d_model // self.n_head
        self.n_positions = cfg.n_positions
        self.vocab_size = self.head_w.shape[0]
        self.device = self.wte.device
        self.dtype = self.wte.dtype
        self.kv_dtype = self.kv_dtype_for(self.device, self.dtype)
        self.scaling = [float(b.attn.scaling) for b in self.blocks]
        # gelu_new is the tanh approximation: one fused kernel instead of the module's seven ops
        act = getattr(cfg, "activation_function", "gelu_new")
        self.act = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu": F.gelu}.get(act)
        self.max_rows = max_rows
        # the dense layers (LoRA targets among them) and the LM head, prepacked for oneDNN on CPU
        pack = prepack_supported(self.device, self.dtype)
        self.dense: list[dict[str, Dense]] = [
            {
                "attn.c_attn": Dense.from_conv1d(b.attn.c_attn, pack=pack, batch_hint=max_rows),
                "attn.c_proj": Dense.from_conv1d(b.attn.c_proj, pack=pack, batch_hint=max_rows),
                "mlp.c_fc": Dense.from_conv1d(b.mlp.c_fc, pack=pack, batch_hint=max_rows),
                "mlp.c_proj": Dense.from_conv1d(b.mlp.c_proj, pack=pack, batch_hint=max_rows),
            }
            for b in self.blocks
        ]
        self.head = Dense(self.head_w.detach(), None, pack=pack, batch_hint=max_rows)
        self.prepacked = all(d.packed is not None for layer in self.dense for d in layer.values())
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    # --- shapes -------------------------------------------------------------------------------
    @staticmethod
    def kv_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
        """The cache's dtype for weights of ``dtype`` on ``device``."""
        # bf16 attention on CPU runs far below fp32's speed (decode at 9 rows x 500 positions: 6.5 ms
        # vs 1.8 ms per layer), while the matmuls gain from bf16: keep the cache and attention in fp32.
        cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
        return torch.float32 if cpu_bf16 else dtype

    def module_shapes(self) -> list[dict[str, tuple[int, int]]]:
        """``(in, out)`` of every LoRA-targetable Conv1D, per layer (what an adapter must fit)."""
        out = []
        for b in self.blocks:
            mods = {
                "attn.c_attn": b.attn.c_attn,
                "attn.c_proj": b.attn.c_proj,
                "mlp.c_fc": b.mlp.c_fc,
                "mlp.c_proj": b.mlp.c_proj,
            }
            out.append({name: tuple(mods[name].weight.shape) for name in TARGETS})
        return out

    @torch.inference_mode()
    def ensure_capacity(self, positions: int) -> None:
        """Grow the cache's time axis to hold ``positions`` tokens per row (copies once per growth)."""
        if positions <= self.capacity:
            return
        new = min(self.n_positions, -(-positions // CAPACITY_STEP) * CAPACITY_STEP)
        shape = (self.max_rows, self.n_head, new, self.head_dim)
        ks, vs = [], []
        for i in range(self.n_layer):
            k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity] = self.k[i]
                v[:, :, : self.capacity] = self.v[i]
            ks.append(k)
            vs.append(v)
        self.k, self.v, self.capacity = ks, vs, new

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` cached positions into slot ``dst`` (compaction)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # --- pieces ---------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, plan: LoraPlan, layer: int, name: str) -> torch.Tensor:
        y = self.dense[layer][name](x)
        return plan.apply(y, x, layer, name) if plan.active else y

    def _mlp(self, i: int, block, x: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
        h = block.ln_2(x)
        h = self._linear(h, plan, i, "mlp.c_fc")
        h = self.act(h) if self.act is not None else block.mlp.act(h)
        return x + self._linear(h, plan, i, "mlp.c_proj")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x)).float()

    # --- prefill: several prompts packed into one sequence of tokens ------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], plan: LoraPlan) -> torch.Tensor:
        """Run the prompts (packed, no padding), write their KV into ``slots``; logits of each last token.

        Linear layers see all tokens at once; attention runs per prompt (causal), so prompts never
        see each other.
        """
        lens = [len(p) for p in prompts]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        self.ensure_capacity(max(lens))
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        x = self.wte[ids] + self.wpe[pos]  # [T, d]
        H, D = self.n_head, self.head_dim
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            qkv = self._linear(h, plan, i, "attn.c_attn")
            q, k, v = qkv.to(self.kv_dtype).view(-1, 3, H, D).unbind(1)  # each [T, H, D]
            att = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            for s, e, slot in zip(starts[:-1], starts[1:], slots, strict=True):
                kr, vr = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)  # [H, n, D]
                self.k[i][slot, :, : e - s] = kr
                self.v[i][slot, :, : e - s] = vr
                o = F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1).unsqueeze(0),
                    kr.unsqueeze(0),
                    vr.unsqueeze(0),
                    is_causal=True,
                    scale=self.scaling[i],
                )
                att[s:e] = o[0].transpose(0, 1)
            att = att.view(-1, self.d_model).to(self.dtype)
            x = x + self._linear(att, plan, i, "attn.c_proj")
            x = self._mlp(i, block, x, plan)
        last = torch.tensor([e - 1 for e in starts[1:]], dtype=torch.long, device=self.device)
        return self._logits(x.index_select(0, last))

    # --- decode: one new token for each of the first n slots -------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int], plan: LoraPlan) -> torch.Tensor:
        """Rows ``0..n-1``: feed ``tokens[i]`` at position ``lengths[i]``; logits ``[n, vocab]`` (fp32)."""
        n = len(tokens)
        L = max(lengths) + 1
        self.ensure_capacity(L)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        rows = torch.arange(n, device=self.device)
        # attend to cached positions 0..length (the new token included)
        mask = (torch.arange(L, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(n, 1, 1, L)
        x = self.wte[ids] + self.wpe[pos]  # [n, d]
        H, D = self.n_head, self.head_dim
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            qkv = self._linear(h, plan, i, "attn.c_attn")
            q, k, v = qkv.to(self.kv_dtype).view(n, 3, H, D).unbind(1)  # [n, H, D]
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            o = F.scaled_dot_product_attention(
                q.unsqueeze(2), kc[:n, :, :L], vc[:n, :, :L], attn_mask=mask, scale=self.scaling[i]
            )  # [n, H, 1, D]
            o = o.reshape(n, self.d_model).to(self.dtype)
            x = x + self._linear(o, plan, i, "attn.c_proj")
            x = self._mlp(i, block, x, plan)
        return self._logits(x)

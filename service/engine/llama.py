"""Llama-family decoders (``model_type`` llama, mistral, qwen2, qwen3): RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP; Qwen2's q/k/v bias and Qwen3's per-head q/k RMSNorm come from
the modules themselves (a bias is part of the dense layer, a norm is there or not).

Rotary: the inverse frequencies and the attention factor are the Hugging Face rotary module's own
(``rope_theta`` and ``rope_scaling``, computed once at load), so every static scaling type HF
implements gives HF's numbers; the types whose frequencies change with the sequence length
(``dynamic``, ``longrope``) are refused. A sliding window (Mistral, Qwen with ``use_sliding_window``)
is honoured by serving at most the window's length of context: within it, windowed attention is
full attention, and a longer request is refused like any request past the context (PromptTooLong).
"""

from __future__ import annotations

import torch

from loracore.families import LLAMA, check_config, served_context

from .dense import Dense, prepack_supported
from .lora import LoraPlan
from .model import Attend, CacheShape, SlotRunner, UnsupportedModel


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner(SlotRunner):
    family = LLAMA

    @classmethod
    def cache_shape(cls, config, max_context: int) -> CacheShape:
        positions = served_context(config.to_dict(), max_context)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return CacheShape(config.num_hidden_layers, kv_heads, _head_dim(config), positions)

    def __init__(self, model, *, max_rows: int, max_context: int = 1 << 30):
        cfg = model.config
        if cfg.model_type not in LLAMA.model_types or not hasattr(model, "model"):
            raise UnsupportedModel(f"the Llama runner serves {LLAMA.model_types}, got {cfg.model_type!r}")
        check_config(cfg.to_dict())
        self.model = model.eval()
        body = model.model
        self.blocks = list(body.layers)
        self.norm = body.norm
        self.embed = body.embed_tokens.weight
        self.head_w = model.get_output_embeddings().weight  # the embedding itself when tied
        shape = self.cache_shape(cfg, max_context)
        self.n_layer = len(self.blocks)
        self.n_head = cfg.num_attention_heads
        self.n_kv_head = shape.n_kv_head
        self.head_dim = shape.head_dim
        self.n_positions = shape.n_positions
        self.vocab_size = self.head_w.shape[0]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        rotary = body.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().to(self.device)
        self.rope_factor = float(rotary.attention_scaling)
        self.scaling = [float(b.self_attn.scaling) for b in self.blocks]
        pack = prepack_supported(self.device, self.dtype)
        self.dense = [
            {
                name: Dense(m.weight.detach(), _bias(m), pack=pack, batch_hint=max_rows)
                for name in LLAMA.targets
                for m in [b.get_submodule(name)]
            }
            for b in self.blocks
        ]
        self.head = Dense(self.head_w.detach(), None, pack=pack, batch_hint=max_rows)
        self._init_cache(max_rows)

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.embed[ids]

    def _rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D]`` for positions ``pos`` (fp32 like HF, then the attention dtype)."""
        freqs = pos.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_factor).to(self.kv_dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_factor).to(self.kv_dtype).unsqueeze(1)
        return cos, sin

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, plan: LoraPlan, attend: Attend) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        cos, sin = self._rotary(pos)
        for i, block in enumerate(self.blocks):
            attn = block.self_attn
            h = block.input_layernorm(x)
            q = self._linear(h, plan, i, "self_attn.q_proj").view(T, -1, D)
            k = self._linear(h, plan, i, "self_attn.k_proj").view(T, -1, D)
            v = self._linear(h, plan, i, "self_attn.v_proj").view(T, -1, D)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head, before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.to(self.kv_dtype), k.to(self.kv_dtype), v.to(self.kv_dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            att = attend(i, q, k, v, self.scaling[i]).to(self.dtype)
            x = x + self._linear(att, plan, i, "self_attn.o_proj")
            h = block.post_attention_layernorm(x)
            gate = self._linear(h, plan, i, "mlp.gate_proj")
            up = self._linear(h, plan, i, "mlp.up_proj")
            x = x + self._linear(block.mlp.act_fn(gate) * up, plan, i, "mlp.down_proj")
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def base_weight(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = self.blocks[layer].get_submodule(name)
        return linear.weight.detach(), _bias(linear)


def _bias(module) -> torch.Tensor | None:
    return module.bias.detach() if module.bias is not None else None

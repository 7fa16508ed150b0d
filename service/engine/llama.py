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
        # (in, out) of every LoRA-targetable layer, per layer: what an adapter must fit
        self.shapes = [
            {name: (m.in_features, m.out_features) for name in LLAMA.targets for m in [b.get_submodule(name)]}
            for b in self.blocks
        ]
        # q/k/v, and gate/up, read the same input: each group is one dense layer (weights side by side),
        # so a decode step makes 4 dense calls per layer instead of 7; LoRA terms go to each part's columns
        pack = prepack_supported(self.device, self.dtype)
        self._parts = [self._fused_parts(i) for i in range(self.n_layer)]
        self.dense = [
            {
                **{
                    fused: _fused_dense([b.get_submodule(name) for name, _, _ in parts], pack, max_rows)
                    for fused, parts in self._parts[i].items()
                },
                **{
                    name: Dense(m.weight.detach(), _bias(m), pack=pack, batch_hint=max_rows)
                    for name in _UNFUSED
                    for m in [b.get_submodule(name)]
                },
            }
            for i, b in enumerate(self.blocks)
        ]
        self.head = Dense(self.head_w.detach(), None, pack=pack, batch_hint=max_rows)
        self._init_cache(max_rows)
        # cos, sin of every served position, computed once as HF computes them per call (fp32, then
        # the attention dtype): a step indexes them
        self.cos, self.sin = self._rotary(torch.arange(self.n_positions, device=self.device))

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.embed[ids]

    def _rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D]`` for positions ``pos`` (fp32 like HF, then the attention dtype)."""
        freqs = pos.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_factor).to(self.kv_dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_factor).to(self.kv_dtype).unsqueeze(1)
        return cos, sin

    def _fused_parts(self, layer: int) -> dict[str, list[tuple[str, int, int]]]:
        """Each fused dense layer's parts: ``(module, first column, end column)``."""
        shapes = self.shapes[layer]
        out: dict[str, list[tuple[str, int, int]]] = {}
        for fused, names in _FUSED.items():
            at, parts = 0, []
            for name in names:
                parts.append((name, at, at + shapes[name][1]))
                at += shapes[name][1]
            out[fused] = parts
        return out

    def module_shapes(self) -> list[dict[str, tuple[int, int]]]:
        return [dict(layer) for layer in self.shapes]

    def _linear_parts(self, x: torch.Tensor, plan: LoraPlan, layer: int, fused: str) -> torch.Tensor:
        y = self.dense[layer][fused](x)
        if plan.active:
            for name, start, end in self._parts[layer][fused]:
                plan.apply(y[:, start:end], x, layer, name)  # in place, on the part's columns
        return y

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, plan: LoraPlan, attend: Attend) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        Hq, Hkv = self.n_head, self.n_kv_head
        cos, sin = self.cos[pos], self.sin[pos]
        for i, block in enumerate(self.blocks):
            attn = block.self_attn
            h = block.input_layernorm(x)
            qkv = self._linear_parts(h, plan, i, "self_attn.qkv").view(T, Hq + 2 * Hkv, D)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head, before rotary
                q, k = (
                    attn.q_norm(qkv[:, :Hq]).to(self.kv_dtype),
                    attn.k_norm(qkv[:, Hq : Hq + Hkv]).to(self.kv_dtype),
                )
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                v = qkv[:, Hq + Hkv :].to(self.kv_dtype)
            else:  # q and k heads rotated together
                qkv = qkv.to(self.kv_dtype)
                qk = qkv[:, : Hq + Hkv]
                qk = qk * cos + _rotate_half(qk) * sin
                q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :]
            att = attend(i, q, k, v, self.scaling[i]).to(self.dtype)
            x = x + self._linear(att, plan, i, "self_attn.o_proj")
            h = block.post_attention_layernorm(x)
            gate_up = self._linear_parts(h, plan, i, "mlp.gate_up")
            inner = gate_up.shape[1] // 2
            x = x + self._linear(
                block.mlp.act_fn(gate_up[:, :inner]) * gate_up[:, inner:], plan, i, "mlp.down_proj"
            )
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def base_weight(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = self.blocks[layer].get_submodule(name)
        return linear.weight.detach(), _bias(linear)


# fused dense layer -> its modules, in column order
_FUSED = {
    "self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}
_UNFUSED = ("self_attn.o_proj", "mlp.down_proj")


def _fused_dense(modules: list, pack: bool, batch_hint: int) -> Dense:
    """One dense layer computing ``modules`` (``nn.Linear``s of one input) side by side."""
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [_bias(m) for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b if b is not None else m.weight.new_zeros(m.out_features)
                for m, b in zip(modules, biases, strict=True)
            ]
        )
    return Dense(weight, bias, pack=pack, batch_hint=batch_hint)


def _bias(module) -> torch.Tensor | None:
    return module.bias.detach() if module.bias is not None else None

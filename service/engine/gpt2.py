"""GPT-2 of any size (distilgpt2 .. gpt2-xl): learned positions, LayerNorm, fused QKV Conv1D, GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loracore.families import GPT2, check_config, served_context

from .dense import Dense, prepack_supported
from .lora import LoraPlan
from .model import Attend, CacheShape, SlotRunner, UnsupportedModel


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GPT2Runner(SlotRunner):
    family = GPT2

    @classmethod
    def cache_shape(cls, config, max_context: int) -> CacheShape:
        return CacheShape(
            config.n_layer,
            config.n_head,
            config.n_embd // config.n_head,
            served_context(config.to_dict(), max_context),
        )

    def __init__(self, model, *, max_rows: int, max_context: int = 1 << 30):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer"):
            raise UnsupportedModel(f"the GPT-2 runner serves GPT-2 models, got model_type={cfg.model_type!r}")
        check_config(cfg.to_dict())
        self.model = model.eval()
        tr = model.transformer
        self.blocks = list(tr.h)
        self.ln_f = tr.ln_f
        self.wte = tr.wte.weight
        self.wpe = tr.wpe.weight
        self.head_w = model.lm_head.weight  # [vocab, d], tied to wte in GPT-2
        shape = self.cache_shape(cfg, max_context)
        self.n_layer = len(self.blocks)
        self.n_head = self.n_kv_head = cfg.n_head
        self.d_model = cfg.n_embd
        self.head_dim = shape.head_dim
        self.n_positions = shape.n_positions
        self.vocab_size = self.head_w.shape[0]
        self.device = self.wte.device
        self.dtype = self.wte.dtype
        self.scaling = [float(b.attn.scaling) for b in self.blocks]
        # gelu_new is the tanh approximation: one fused kernel instead of the module's seven ops
        act = getattr(cfg, "activation_function", "gelu_new")
        self.act = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu": F.gelu}.get(act)
        # the dense layers (LoRA targets among them) and the LM head, prepacked for oneDNN on CPU
        pack = prepack_supported(self.device, self.dtype)
        self.dense = [
            {
                name: Dense.from_conv1d(b.get_submodule(name), pack=pack, batch_hint=max_rows)
                for name in GPT2.targets
            }
            for b in self.blocks
        ]
        self.head = Dense(self.head_w.detach(), None, pack=pack, batch_hint=max_rows)
        self._init_cache(max_rows)

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.wte[ids] + self.wpe[pos]

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, plan: LoraPlan, attend: Attend) -> torch.Tensor:
        H, D = self.n_head, self.head_dim
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            qkv = self._linear(h, plan, i, "attn.c_attn")
            q, k, v = qkv.to(self.kv_dtype).view(-1, 3, H, D).unbind(1)  # each [T, H, D]
            att = attend(i, q, k, v, self.scaling[i]).to(self.dtype)
            x = x + self._linear(att, plan, i, "attn.c_proj")
            h = block.ln_2(x)
            h = self._linear(h, plan, i, "mlp.c_fc")
            h = self.act(h) if self.act is not None else block.mlp.act(h)
            x = x + self._linear(h, plan, i, "mlp.c_proj")
        return x

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def base_weight(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        conv = self.blocks[layer].get_submodule(name)  # Conv1D: weight [in, out]
        return conv.weight.detach().t(), conv.bias.detach()

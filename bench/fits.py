"""What fits a 12 GB GPU, per base: computed from the bases' configs, not measured.

    python -m bench fits            # prints the markdown table (docs/benchmarks/fits-12gb.md)

The configs are the public ``config.json`` values of each model (hidden size, layers, heads, KV
heads, head dim, MLP width, vocabulary, tied embeddings). Every figure follows from them by the
formulas in ``row``; none was measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
GPU_BYTES = 12 * 10**9  # a "12 GB" card
CUDA_CONTEXT = 500 << 20  # CUDA context and allocator slack outside our tensors (assumed)
ROW_TOKENS = 1024
# the prototype's training settings (trainer/config.py): batch 8 x 512 tokens, r=32 on the family's
# default targets, fp32 weights (the trainer loads the base in fp32) under fp16/bf16 autocast
TRAIN_BATCH, TRAIN_TOKENS, RANK = 8, 512, 32


@dataclass(frozen=True)
class Base:
    name: str
    family: str  # "gpt2" | "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inner: int  # MLP width
    vocab: int
    tied: bool = True
    positions: int = 0  # GPT-2's learned position table


BASES = [
    Base("distilgpt2", "gpt2", 768, 6, 12, 12, 64, 3072, 50257, positions=1024),
    Base("gpt2", "gpt2", 768, 12, 12, 12, 64, 3072, 50257, positions=1024),
    Base("gpt2-medium", "gpt2", 1024, 24, 16, 16, 64, 4096, 50257, positions=1024),
    Base("gpt2-large", "gpt2", 1280, 36, 20, 20, 64, 5120, 50257, positions=1024),
    Base("gpt2-xl", "gpt2", 1600, 48, 25, 25, 64, 6400, 50257, positions=1024),
    Base("SmolLM2-135M", "llama", 576, 30, 9, 3, 64, 1536, 49152),
    Base("SmolLM2-360M", "llama", 960, 32, 15, 5, 64, 2560, 49152),
    Base("SmolLM2-1.7B", "llama", 2048, 24, 32, 32, 64, 8192, 49152),
    Base("Qwen2.5-0.5B", "llama", 896, 24, 14, 2, 64, 4864, 151936),
    Base("Qwen2.5-1.5B", "llama", 1536, 28, 12, 2, 128, 8960, 151936),
    Base("Qwen3-0.6B", "llama", 1024, 28, 16, 8, 128, 3072, 151936),
    Base("Qwen3-1.7B", "llama", 2048, 28, 16, 8, 128, 6144, 151936),
    Base("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 64, 8192, 128256),
    Base("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 128, 8192, 128256),
]


def linear_shapes(b: Base) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a block."""
    if b.family == "gpt2":
        h = b.hidden
        return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, b.inner), "mlp.c_proj": (b.inner, h)}
    q, kv = b.heads * b.head_dim, b.kv_heads * b.head_dim
    h = b.hidden
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, b.inner),
        "up_proj": (h, b.inner),
        "down_proj": (b.inner, h),
    }


def parameters(b: Base) -> int:
    block = sum(i * o for i, o in linear_shapes(b).values())
    embed = b.vocab * b.hidden * (1 if b.tied else 2) + b.positions * b.hidden
    return b.layers * block + embed  # norms and biases: under 0.1%, left out


def lora_parameters(b: Base) -> int:
    """r=32 on the trainer's default targets: GPT-2 c_attn + c_proj (attn and mlp), Llama every linear."""
    shapes = linear_shapes(b)
    if b.family == "gpt2":
        shapes = {k: v for k, v in shapes.items() if k != "c_fc"}
    return b.layers * sum(RANK * (i + o) for i, o in shapes.values())


def row(b: Base) -> dict:
    params = parameters(b)
    weights16 = 2 * params
    kv_token = 2 * b.layers * b.kv_heads * b.head_dim * 2  # K and V, every layer, fp16
    free = GPU_BYTES - CUDA_CONTEXT - weights16
    budget = free // 2  # the engine's default: half the memory free after the model loads (capacity.py)
    rows = max(0, min(256, budget // (kv_token * ROW_TOKENS)))
    # training: fp32 base weights, LoRA weights + grads + Adam moments in fp32 (16 bytes each), fp16
    # activations kept for backward (about 2 bytes x (10 h + 4 inner) per token and layer: the
    # inputs of every linear layer, norms and the MLP's products), fp32 logits and their gradient
    tokens = TRAIN_BATCH * TRAIN_TOKENS
    lora = lora_parameters(b)
    activations = 2 * tokens * b.layers * (10 * b.hidden + 4 * b.inner)
    logits = 2 * 4 * tokens * b.vocab
    train = 4 * params + 16 * lora + activations + logits + CUDA_CONTEXT
    # gradient_checkpointing: only each block's input is kept, one block's activations at a time
    checkpointed = 2 * tokens * b.layers * b.hidden + activations // b.layers
    train_ckpt = 4 * params + 16 * lora + checkpointed + logits + CUDA_CONTEXT
    return {
        "base": b.name,
        "params_m": params / 1e6,
        "weights_gib": weights16 / GIB,
        "kv_kib_per_token": kv_token / 1024,
        "rows_1024": rows,
        "train_gib": train / GIB,
        "train_fits": train <= GPU_BYTES,
        "train_ckpt_gib": train_ckpt / GIB,
        "train_ckpt_fits": train_ckpt <= GPU_BYTES,
    }


def markdown() -> str:
    lines = [
        "| base | parameters | fp16 weights | KV per token (fp16) | serving: batch rows at 1024 tokens "
        "| LoRA training, batch 8 x 512 | the same with gradient_checkpointing |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BASES:
        r = row(b)
        plain = f"{r['train_gib']:.1f} GiB" + ("" if r["train_fits"] else " (over)")
        ckpt = f"{r['train_ckpt_gib']:.1f} GiB" + ("" if r["train_ckpt_fits"] else " (over)")
        lines.append(
            f"| {r['base']} | {r['params_m']:.0f} M | {r['weights_gib']:.2f} GiB "
            f"| {r['kv_kib_per_token']:.0f} KiB | {r['rows_1024']} | {plain} | {ckpt} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())

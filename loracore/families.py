"""The base-model families loraserve trains and serves, chosen by ``config.json``'s ``model_type``.

One table says, per family: which ``model_type`` values belong to it, where its blocks live, which
block modules LoRA may target (the module paths inside a block, as PEFT names them), and which the
trainer targets by default; and which configs are served at all (``check_config``) and with how much
context. The modules' shapes, and what an adapter folder may hold, are ``lora_format``'s (its
``BaseLayout`` reads this table). The engine's runners, the upload check and the trainer all ask
here. No torch: the API process refuses an unsupported base with it at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnsupportedBase(ValueError):
    """A base whose ``model_type`` (or a setting of it) no runner serves; the message is one line."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # where the blocks are in the HF model ("transformer.h")
    block_key: str  # the blocks' list name in a parameter key ("h" in "transformer.h.0.attn...")
    targets: tuple[str, ...]  # LoRA-targetable modules inside a block, PEFT's names
    default_targets: tuple[str, ...]  # the trainer's targets when the config names none
    conv1d: bool  # weights stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    block_key="h",
    targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    default_targets=("c_attn", "c_proj"),
    conv1d=True,
)
LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    block_key="layers",
    targets=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    # every linear layer of the block: what PEFT's all-linear picks for these models and what the
    # QLoRA paper found needed to match full fine-tuning; the attention-only choice of GPT-2's
    # default would leave the MLP (two thirds of the block) untouched
    default_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    conv1d=False,
)
FAMILIES = (GPT2, LLAMA)
# The longest context served unless asked for more: Llama-family configs allow 32k-128k positions,
# and the batch plan reserves every row's full context, so 128k would leave room for one row.
DEFAULT_MAX_CONTEXT = 4096
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedBase(
        f"unsupported base model: config.json has model_type={model_type!r}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


# rotary types whose inverse frequencies are fixed at load (the ones that change with the sequence
# length, dynamic and longrope, would need per-length frequencies)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(config: dict) -> str:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def check_config(config: dict) -> Family:
    """The family of a base's ``config.json`` contents, or UnsupportedBase (one line) naming what no
    runner serves."""
    model_type = config.get("model_type")
    family = family_for(model_type)
    if family is GPT2 and config.get("add_cross_attention"):
        raise UnsupportedBase("unsupported base model: GPT-2 with cross-attention")
    if family is LLAMA:
        rope = rope_type(config)
        if rope not in ROPE_TYPES:
            raise UnsupportedBase(
                f"unsupported base model: {model_type} with rope_scaling type {rope!r}; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedBase(
                f"unsupported base model: {model_type} with hidden_act {act!r} (SwiGLU needs silu)"
            )
    return family


def sliding_window(config: dict) -> int | None:
    """The attention window when some layer uses one (Mistral; Qwen with ``use_sliding_window``)."""
    window = config.get("sliding_window")
    if not window:
        return None
    if config.get("model_type") == "mistral":
        return int(window)
    if config.get("model_type") in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        return None
    return int(window) if "sliding_attention" in (config.get("layer_types") or []) else None


def served_context(config: dict, max_context: int | None = None) -> int:
    """The longest row (prompt + completion) served: the model's context, at most ``max_context``
    (default ``DEFAULT_MAX_CONTEXT``) and at most the sliding window (within it, windowed attention
    is full attention, so the window is honoured by never exceeding it)."""
    cap = max_context or DEFAULT_MAX_CONTEXT
    if check_config(config) is GPT2:
        return min(int(config.get("n_positions") or 1024), cap)
    positions = min(int(config["max_position_embeddings"]), cap)
    window = sliding_window(config)
    return min(positions, window) if window is not None else positions


def read_config(folder: str | Path) -> dict:
    """The base folder's ``config.json`` as a dict (UnsupportedBase when missing or not JSON)."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedBase(f"cannot read the base model's {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UnsupportedBase(f"{path} does not hold a JSON object")
    return data


def family_of_folder(folder: str | Path) -> Family:
    """The base folder's family, checked as ``check_config`` does."""
    return check_config(read_config(folder))


def base_shape(config: dict) -> dict:
    """What an adapter trained on this base must match: architecture, width, depth."""
    family = family_for(config.get("model_type"))
    if family is GPT2:
        return {
            "model_type": "gpt2",
            "hidden_size": config.get("n_embd"),
            "num_layers": config.get("n_layer"),
        }
    return {
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_hidden_layers"),
    }


def shape_differences(recorded: dict, served: dict) -> list[str]:
    """``key: adapter X, served base Y`` for each base-shape field the two disagree on (a field one
    side does not record is not compared)."""
    out = []
    for key in ("model_type", "hidden_size", "num_layers"):
        a, b = recorded.get(key), served.get(key)
        if a is not None and b is not None and a != b:
            out.append(f"{key}: adapter {a!r}, served base {b!r}")
    return out

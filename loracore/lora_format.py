"""What a PEFT LoRA folder may hold to be served on a base: the one rule table.

The upload check (``PUT /adapters/{name}``, service.adapters.store) and the engine's loader
(service.engine.lora) both apply these rules, so an upload is accepted if and only if the engine can
serve it. Standard library only: a tensor is its name and shape here (read from a safetensors header
without loading it, or from loaded tensors); reading the bytes and checking values stays with the
caller.

    config = check_config(json_object, layout)        # adapter_config.json
    pairs = check_tensors(config, {name: shape}, layout)  # adapter_model.safetensors

A base is described by its ``BaseLayout``: per layer, the modules LoRA can wrap and their
(in_features, out_features), for each family of ``loracore.families``. GPT-2's blocks are
``transformer.h.<i>.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}`` (``Conv1D``); the Llama
family's ``model.layers.<i>.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`` (``nn.Linear``).
PEFT stores ``lora_A [r, in]`` and ``lora_B [out, r]`` for both, and for DoRA (``use_dora``) a
``lora_magnitude_vector [out]`` per module as well (its name has no ``.weight``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracore import families

CONFIG_PART = "adapter_config"  # which upload part (and file) a problem is in
WEIGHTS_PART = "adapter_model"

# Config keys whose value must be one of these (a missing key reads as the first), because the engine
# computes only plain LoRA on a causal LM.
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "task_type": (None, "CAUSAL_LM"),
    "bias": ("none",),
}
# Config keys that change what the adapter computes in a way the engine does not honour: set (truthy),
# the folder is refused, naming the key. Keys not listed are honoured (r, lora_alpha, use_rslora,
# target_modules, rank_pattern: ranks are read from the tensors; use_dora: a magnitude vector per
# module, see ``check_tensors``) or do not matter when serving (lora_dropout, init_lora_weights,
# fan_in_fan_out, ...).
REFUSED_KEYS: dict[str, str] = {
    "lora_bias": "lora_bias is not supported (LoRA matrices only)",
    "modules_to_save": "modules_to_save is not supported (LoRA matrices only)",
    "alpha_pattern": "alpha_pattern is not supported (one lora_alpha for every module)",
    "layer_replication": "layer_replication is not supported (the base's layers as they are)",
    "trainable_token_indices": "trainable_token_indices is not supported (LoRA matrices only)",
    "target_parameters": "target_parameters is not supported (LoRA on modules only)",
    "use_qalora": "QALoRA adapters (use_qalora) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
}


class LoraFormatError(ValueError):
    """A LoRA folder the engine cannot serve on this base; ``part`` names the file, the message why."""

    code = "invalid_adapter"  # the error code a request or an upload refused for it carries (422)

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class BaseLayout:
    """What an adapter must fit: the base's layers and the modules LoRA can wrap in each."""

    model_type: str
    shapes: tuple[dict[str, tuple[int, int]], ...]  # per layer: module path -> (in_features, out_features)
    layer_path: str = "transformer.h"  # the module path of the layer list
    # the tensor-name prefixes before the layer list: PEFT's ``base_model.model.`` and none
    tensor_prefix: str = r"(?:base_model\.model\.)?"

    @classmethod
    def gpt2(cls, n_layer: int, n_embd: int, n_inner: int | None = None) -> BaseLayout:
        n_inner = n_inner or 4 * n_embd
        block = {
            "attn.c_attn": (n_embd, 3 * n_embd),
            "attn.c_proj": (n_embd, n_embd),
            "mlp.c_fc": (n_embd, n_inner),
            "mlp.c_proj": (n_inner, n_embd),
        }
        return cls("gpt2", tuple(dict(block) for _ in range(n_layer)))

    @classmethod
    def llama(cls, config: dict[str, Any]) -> BaseLayout:
        """A Llama-family base (llama, mistral, qwen2, qwen3): grouped-query attention (fewer KV heads),
        ``head_dim`` apart from hidden / heads where the config says so, a SwiGLU MLP."""
        h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        dim = int(config.get("head_dim") or h // heads)
        inner = int(config["intermediate_size"])
        block = {
            "self_attn.q_proj": (h, heads * dim),
            "self_attn.k_proj": (h, kv * dim),
            "self_attn.v_proj": (h, kv * dim),
            "self_attn.o_proj": (heads * dim, h),
            "mlp.gate_proj": (h, inner),
            "mlp.up_proj": (h, inner),
            "mlp.down_proj": (inner, h),
        }
        layers = int(config["num_hidden_layers"])
        return cls(
            str(config["model_type"]), tuple(dict(block) for _ in range(layers)), families.LLAMA.blocks
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseLayout:
        """From a base's ``config.json``; a model type without a known layout has no layers (``check_config``
        then refuses every adapter, naming the type)."""
        model_type = config.get("model_type", "")
        try:
            family = families.check_config(config)
        except families.UnsupportedBase:
            return cls(model_type, ())
        if family is families.LLAMA:
            return cls.llama(config)
        return cls.gpt2(int(config["n_layer"]), int(config["n_embd"]), config.get("n_inner"))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> BaseLayout:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    @property
    def n_layer(self) -> int:
        return len(self.shapes)

    def modules(self) -> list[str]:
        """Module paths inside a layer, in order (every layer has the same ones)."""
        return list(self.shapes[0]) if self.shapes else []

    def module_paths(self) -> list[str]:
        """Every module LoRA can wrap, by its full path (``transformer.h.0.attn.c_attn``)."""
        return [f"{self.layer_path}.{i}.{m}" for i, layer in enumerate(self.shapes) for m in layer]

    def tensor_name(self) -> re.Pattern[str]:
        """A LoRA tensor's name: ``<prefix><layer path>.<i>.<module>.lora_<A|B>[.<adapter>].weight``, or
        DoRA's ``….<module>.lora_magnitude_vector[.<adapter>][.weight]`` (group 3: ``A``, ``B`` or ``M``)."""
        modules = "|".join(re.escape(m) for m in self.modules())
        return re.compile(
            rf"^{self.tensor_prefix}(?:{re.escape(self.layer_path)}|{re.escape(self.layer_path.split('.')[-1])})"
            rf"\.(\d+)\.({modules})\.lora_(?:([AB])(?:\.[A-Za-z0-9_-]+)?\.weight"
            rf"|magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?)$"
        )


def _kind(value: Any) -> str:
    return type(value).__name__


def check_config(config: Any, layout: BaseLayout) -> dict[str, Any]:
    """The config (``adapter_config.json`` parsed) if the engine can serve it on ``layout``; else
    LoraFormatError naming the first problem (the key)."""
    if not layout.shapes:
        raise LoraFormatError(f"LoRA adapters on a {layout.model_type!r} base are not supported", CONFIG_PART)
    if not isinstance(config, dict):
        raise LoraFormatError(f"{CONFIG_PART} must be a JSON object, got {_kind(config)}", CONFIG_PART)
    for key, allowed in REQUIRED_VALUES.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            wanted = " or ".join(repr(a) for a in allowed if a is not None)
            raise LoraFormatError(f"{key} is {value!r}; only {wanted} is served", CONFIG_PART)
    for key, reason in REFUSED_KEYS.items():
        if config.get(key):
            raise LoraFormatError(reason, CONFIG_PART)
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraFormatError(f"r must be a positive integer, got {rank!r}", CONFIG_PART)
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < float("inf"):
        raise LoraFormatError(f"lora_alpha must be a positive number, got {alpha!r}", CONFIG_PART)
    _check_target_modules(config.get("target_modules"), layout)
    return config


def _check_target_modules(targets: Any, layout: BaseLayout) -> None:
    """PEFT reads ``target_modules`` as a list of module names (suffixes) or one regex over full paths;
    absent, it uses its default for the model type (the tensors then say what is wrapped)."""
    if targets is None or targets == "all-linear":  # PEFT's shorthand: every linear layer of the blocks
        return
    paths = layout.module_paths()
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise LoraFormatError(
                f"target_modules regex {targets!r} does not compile: {exc}", CONFIG_PART
            ) from exc
        if not any(pattern.fullmatch(p) for p in paths):
            raise LoraFormatError(
                f"target_modules {targets!r} matches no module of the {layout.model_type} base", CONFIG_PART
            )
        return
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise LoraFormatError("target_modules must be a non-empty list of module names", CONFIG_PART)
    for target in sorted(targets):  # the same module named whatever order PEFT saved them in
        if not any(_selects(target, p) for p in paths):
            known = sorted({m.split(".")[-1] for m in layout.modules()})
            raise LoraFormatError(
                f"target module {target!r} does not exist in the {layout.model_type} base "
                f"(LoRA can target {', '.join(known)})",
                CONFIG_PART,
            )


def _selects(target: str, path: str) -> bool:
    return path == target or path.endswith("." + target)


def targeted(targets: Any, path: str) -> bool:
    """Whether ``target_modules`` (checked) selects the module at ``path``; absent selects every one."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(_selects(t, path) for t in targets)


def check_tensors(
    config: dict[str, Any], tensors: dict[str, tuple[int, ...]], layout: BaseLayout
) -> dict[tuple[int, str], dict[str, str]]:
    """Check the weights' tensor names and shapes against a checked config and the base.

    Returns ``{(layer, module): {"A": name, "B": name}}`` (and ``"M": name`` for DoRA). Rules: only
    LoRA A/B matrices of modules the base has, in layers it has, selected by ``target_modules``; ``A``
    is ``[r, in]`` and ``B`` ``[out, r]`` of that module, both halves present with one rank, and that
    rank is the config's ``r`` unless ``rank_pattern`` sets ranks per module. With ``use_dora`` every
    such module also has its magnitude vector ``M [out]`` (DoRA's output is ``M / ||W + s·B·A||_col``
    times the LoRA layer's, ``W`` the base's weight); without it, none has one.
    """
    if not tensors:
        raise LoraFormatError(f"{WEIGHTS_PART} holds no tensors", WEIGHTS_PART)
    name_re = layout.tensor_name()
    modules = ", ".join(layout.modules())
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in tensors:
        m = name_re.fullmatch(key)
        if not m:
            raise LoraFormatError(
                f"unsupported tensor {key!r} (only LoRA A/B and DoRA magnitudes of {modules})", WEIGHTS_PART
            )
        layer, module, half = int(m.group(1)), m.group(2), m.group(3) or "M"
        if layer >= layout.n_layer:
            raise LoraFormatError(
                f"{key!r} targets layer {layer}, the base has {layout.n_layer}", WEIGHTS_PART
            )
        path = f"{layout.layer_path}.{layer}.{module}"
        if not targeted(config.get("target_modules"), path):
            raise LoraFormatError(
                f"{key!r} is for a module that target_modules {config['target_modules']!r} does not select",
                WEIGHTS_PART,
            )
        if half in pairs.setdefault((layer, module), {}):
            raise LoraFormatError(f"{path} has two {_TENSOR[half]} tensors", WEIGHTS_PART)
        pairs[(layer, module)][half] = key
    dora = bool(config.get("use_dora"))
    if dora and not any("M" in pair for pair in pairs.values()):
        raise LoraFormatError(
            f"use_dora is set, but {WEIGHTS_PART} holds no lora_magnitude_vector (a DoRA adapter has one "
            "per module)",
            CONFIG_PART,
        )
    rank_pattern = bool(config.get("rank_pattern"))
    for (layer, module), pair in sorted(pairs.items()):
        where = f"{layout.layer_path}.{layer}.{module}"
        if "M" in pair and not dora:
            raise LoraFormatError(
                f"{where} has a DoRA lora_magnitude_vector, but use_dora is not set in {CONFIG_PART}",
                WEIGHTS_PART,
            )
        if dora and "M" not in pair:
            raise LoraFormatError(
                f"{where} has no lora_magnitude_vector (use_dora: DoRA needs one per module)", WEIGHTS_PART
            )
        if set(pair) - {"M"} != {"A", "B"}:
            halves = " and ".join(_TENSOR[h] for h in sorted(pair))
            raise LoraFormatError(f"{where} has {halves} but not both lora_A and lora_B", WEIGHTS_PART)
        a, b = tuple(tensors[pair["A"]]), tuple(tensors[pair["B"]])
        fan_in, fan_out = layout.shapes[layer][module]
        r = a[0] if len(a) == 2 else 0
        if len(a) != 2 or len(b) != 2 or a != (r, fan_in) or b != (fan_out, r) or r < 1:
            raise LoraFormatError(
                f"{where}: lora_A {list(a)} / lora_B {list(b)} do not fit the base {fan_in}->{fan_out} "
                f"layer (expected [r, {fan_in}] and [{fan_out}, r])",
                WEIGHTS_PART,
            )
        if not rank_pattern and r != config["r"]:
            raise LoraFormatError(f"{where} has rank {r}, the config says r={config['r']}", WEIGHTS_PART)
        if "M" in pair and tuple(tensors[pair["M"]]) != (fan_out,):
            raise LoraFormatError(
                f"{where}: lora_magnitude_vector {list(tensors[pair['M']])} does not fit the base "
                f"{fan_in}->{fan_out} layer (expected [{fan_out}])",
                WEIGHTS_PART,
            )
    return pairs


_TENSOR = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}  # a tensor's kind, as PEFT names it

"""Batched multi-adapter LoRA for GPT-2's Conv1D layers, without PEFT at serving time.

An adapter is read straight from its PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
into per-layer pairs ``A [in, r]``, ``B [r, out]`` with the LoRA scaling folded into ``B``. In a forward
pass each target layer computes the base ``x @ W + b`` once for all rows and then, for each adapter
present in the batch, adds ``(x[rows] @ A) @ B`` to that adapter's rows. Base-model rows get nothing
added. No hooks, no module swapping: an adapter is plain tensors, so rows that started on an older
version of an adapter keep using it after a newer version is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors_bytes

# GPT-2 block modules a LoRA adapter may target (Conv1D, weight stored [in, out]).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(
    r"(?:^|\.)h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


class AdapterFormatError(ValueError):
    """An adapter folder that is not a LoRA adapter this base can serve; the message says why."""


@dataclass
class LoraWeights:
    """One adapter version in serving form: ``layers[i][module] = (A, B_scaled)``."""

    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    rank: int
    alpha: float
    target_modules: list[str]
    nbytes: int
    config: dict = field(default_factory=dict, repr=False)


def _check_config(cfg: dict) -> None:
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, only LORA is served")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("lora_bias"):
        problems.append("lora_bias is not supported")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']!r} is not supported")
    if cfg.get("alpha_pattern"):
        problems.append("alpha_pattern is not supported")
    if "r" not in cfg or "lora_alpha" not in cfg:
        problems.append("adapter_config.json lacks r or lora_alpha")
    if problems:
        raise AdapterFormatError("; ".join(problems))


def parse_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    shapes: list[dict[str, tuple[int, int]]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> LoraWeights:
    """Turn the two files of a PEFT LoRA folder into serving form.

    ``shapes[i][module] = (in_features, out_features)`` of the base's Conv1D layers. Everything that
    does not fit (unknown keys, shapes, missing halves, unsupported options) raises
    AdapterFormatError naming the problem; nothing is silently dropped.
    """
    try:
        cfg = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    _check_config(cfg)
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterFormatError(f"{WEIGHTS_FILE} does not parse: {exc}") from exc
    if not tensors:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no tensors")

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if not m:
            raise AdapterFormatError(f"unsupported tensor {key!r} (only LoRA A/B of {', '.join(TARGETS)})")
        layer, module, half = int(m.group(1)), m.group(2), m.group(3)
        if layer >= len(shapes):
            raise AdapterFormatError(f"{key!r} targets layer {layer}, the base has {len(shapes)}")
        halves.setdefault((layer, module), {})[half] = t

    alpha = float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in shapes]
    nbytes, ranks, modules = 0, set(), set()
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"h.{layer}.{module} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[layer][module]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, fan_in) or b.shape != (fan_out, r) or r < 1:
            raise AdapterFormatError(
                f"h.{layer}.{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"{fan_in}->{fan_out} layer (expected [r, {fan_in}] and [{fan_out}, r])"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(f"h.{layer}.{module} holds NaN or infinite values")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # Serving form: x @ A_t @ B_t, scaling folded into B (same numbers as PEFT up to rounding).
        a_t = a.t().to(device=device, dtype=dtype).contiguous()
        b_t = (b.float().t() * scaling).to(device=device, dtype=dtype).contiguous()
        layers[layer][module] = (a_t, b_t)
        nbytes += a_t.numel() * a_t.element_size() + b_t.numel() * b_t.element_size()
        ranks.add(r)
        modules.add(module)
    return LoraWeights(
        layers=layers,
        rank=max(ranks),
        alpha=alpha,
        target_modules=sorted(modules),
        nbytes=nbytes,
        config=cfg,
    )


def read_adapter_files(folder: str | os.PathLike) -> tuple[bytes, bytes, os.stat_result]:
    """Read config and weights from ONE version of the folder.

    The folder is opened once and both files are read relative to that handle, so an atomic swap of
    the folder (publish) in the middle cannot pair one version's config with another's weights.
    Returns the bytes and the weights file's stat (its identity).
    """
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cfg_fd = os.open(CONFIG_FILE, os.O_RDONLY, dir_fd=dfd)
        with os.fdopen(cfg_fd, "rb") as f:
            cfg = f.read()
        w_fd = os.open(WEIGHTS_FILE, os.O_RDONLY, dir_fd=dfd)
        with os.fdopen(w_fd, "rb") as f:
            st = os.fstat(f.fileno())
            weights = f.read()
    finally:
        os.close(dfd)
    return cfg, weights, st


class LoraPlan:
    """Which rows of the current forward pass use which adapter.

    ``groups`` holds ``(rows, weights)`` where ``rows`` is a slice (contiguous rows) or an index
    tensor. Built once per forward pass and consulted by every target layer.
    """

    __slots__ = ("groups",)

    def __init__(self, groups: list[tuple[slice | torch.Tensor, LoraWeights]]):
        self.groups = groups

    @classmethod
    def for_rows(cls, adapters: list[LoraWeights | None], device: torch.device | str) -> LoraPlan:
        """One group per distinct adapter; rows of an adapter that are contiguous become a slice."""
        by_adapter: dict[int, tuple[LoraWeights, list[int]]] = {}
        for i, w in enumerate(adapters):
            if w is not None:
                by_adapter.setdefault(id(w), (w, []))[1].append(i)
        groups: list[tuple[slice | torch.Tensor, LoraWeights]] = []
        for w, rows in by_adapter.values():
            if rows[-1] - rows[0] + 1 == len(rows):
                groups.append((slice(rows[0], rows[-1] + 1), w))
            else:
                groups.append((torch.tensor(rows, dtype=torch.long, device=device), w))
        return cls(groups)

    @classmethod
    def for_segments(cls, segments: list[tuple[int, int, LoraWeights | None]]) -> LoraPlan:
        """Packed prefill: each request is a contiguous token range ``[start, end)``."""
        return cls([(slice(s, e), w) for s, e, w in segments if w is not None])

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """Add each group's LoRA delta to ``y`` (= base output for ``x``), in place."""
        for rows, w in self.groups:
            pair = w.layers[layer].get(module)
            if pair is None:
                continue
            a, b = pair
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ a, b)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a) @ b)
        return y

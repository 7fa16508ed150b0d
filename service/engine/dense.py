"""The base model's dense layers for serving: oneDNN-prepacked weights on CPU, plain addmm elsewhere.

A decode step is memory bound: every weight is read once per step. On CPU ``torch.addmm`` over a
row-major weight reads it at about half the rate oneDNN reaches with its blocked ("prepacked")
layout, the layout ``torch.compile`` uses on CPU through ``mkldnn._linear_pointwise``. Measured on
the 2-vCPU EPYC, one thread, distilgpt2's 24 block layers at 1 row: 12.9 ms -> 6.2 ms (bf16);
the 50257-word LM head: 9.4 -> 4.6 ms. In bf16 the results are bit-identical to addmm, in fp32 they
differ by float rounding.

The two ops are private to torch, so the first packed layer of each shape and dtype is checked
against ``F.linear``; an error or a mismatch falls back to addmm for that layer (and logs why).
``LORASERVE_CPU_PREPACK=0`` turns packing off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from trainer.hardware import cpu_has_native_bf16

log = logging.getLogger(__name__)

_checked: set[tuple] = set()  # (shape, dtype, has bias) already checked against F.linear


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing pays on CPU for fp32, and for bf16 where the CPU multiplies bf16 natively."""
    if os.environ.get("LORASERVE_CPU_PREPACK", "1") == "0":
        return False
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return cpu_has_native_bf16()
    return dtype == torch.float32


class Dense:
    """``y = x @ W.T + b`` for 2-D ``x``; ``weight`` is ``[out, in]`` (``nn.Linear``'s layout)."""

    __slots__ = ("bias", "in_features", "out_features", "packed", "weight_t")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool, batch_hint: int):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.weight_t: torch.Tensor | None = None  # [in, out], for addmm when not packed
        if pack:
            self.packed = _pack(weight, bias, batch_hint)
        if self.packed is None:
            self.weight_t = weight.t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    @classmethod
    def from_conv1d(cls, module, *, pack: bool, batch_hint: int) -> Dense:
        """HF GPT-2 ``Conv1D`` stores its weight ``[in, out]``."""
        w = module.weight.detach().t()
        return cls(w.contiguous() if pack else w, module.bias.detach(), pack=pack, batch_hint=batch_hint)


@torch.inference_mode()
def _pack(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> torch.Tensor | None:
    """The oneDNN-packed copy of ``weight``, or None if packing fails or changes the numbers."""
    key = (tuple(weight.shape), weight.dtype, bias is not None)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        if key in _checked:
            return packed
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").float()
        want = F.linear(x, weight, bias).float()
    except (RuntimeError, AttributeError, TypeError) as exc:  # op missing or unsupported here
        log.warning("oneDNN prepacking unavailable (%s: %s); using addmm", type(exc).__name__, exc)
        return None
    tol = 1e-2 * (float(want.abs().max()) + 1.0)
    if got.shape != want.shape or not float((got - want).abs().max()) <= tol:
        log.warning("oneDNN packed linear disagrees with F.linear for %s; using addmm", tuple(weight.shape))
        return None
    _checked.add(key)
    return packed

"""Batched multi-adapter LoRA for the base's dense layers, without PEFT at serving time.

An adapter is read straight from its PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
into per-layer pairs ``A [in, r]``, ``B [r, out]`` (the same for GPT-2's Conv1D and ``nn.Linear``:
PEFT stores ``lora_A [r, in]`` and ``lora_B [out, r]`` for both) with the LoRA scaling folded into
``B``. In a forward
pass each target layer computes the base ``x @ W + b`` once for all rows and then, for each adapter
present in the batch, adds ``(x[rows] @ A) @ B`` to that adapter's rows. Base-model rows get nothing
added. A *composed* row (``Mix``) gets ``sum_i w_i * (x @ A_i) @ B_i`` over its adapters: each
component is one more adapter of the batch, and the row's weight scales its share. No hooks, no
module swapping: an adapter is plain tensors, so rows that started on an older version of an
adapter keep using it after a newer version is loaded.

DoRA (``use_dora``, PEFT's ``DoraLinearLayer`` in eval mode) computes
``g ⊙ (W x + s B A x) + b`` with ``g = m / ||W + s B A||`` per output (``m`` the adapter's magnitude
vector, the norm over each output's input weights, ``W`` the base's weight in ``nn.Linear``'s
``[out, in]`` orientation, GPT-2's ``Conv1D`` transposed). ``g`` depends only on the adapter and the
base, so it is computed once at load (in fp32, from the base's weights) and folded: ``B`` carries
``s·g`` like plain LoRA's ``B`` carries ``s``, and a DoRA row's base output ``y = W x + b`` becomes
``g ⊙ y + (1 - g) ⊙ b`` before its LoRA term is added: one multiply and one add per target layer and
row group. PEFT detaches the norm from the gradient and, while training with dropout, feeds the
dropped-out input to ``W`` as well; neither changes what an eval-mode forward computes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors_bytes

from loracore.artifact import CONFIG_FILE, WEIGHTS_FILE
from loracore.lora_format import (
    CONFIG_PART,
    WEIGHTS_PART,
    BaseLayout,
    LoraFormatError,
    check_config,
    check_tensors,
)

from .dense import Dense

# What a LoRA folder may hold is decided in one place (loracore.lora_format), shared with uploads.
AdapterFormatError = LoraFormatError


# base_weight(layer, module) -> (W [out, in], bias [out] or None): a base layer's weights, for DoRA's norm
BaseWeight = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class LoraWeights:
    """One adapter version in serving form: ``layers[i][module] = (A, B_scaled)``; a DoRA adapter
    also has ``dora[i][module] = (g, c)``: its rows' base output ``y`` becomes ``g * y + c`` (``c`` is
    ``(1 - g) * bias``, None for a layer without bias) before ``x @ A @ B_scaled`` is added."""

    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    rank: int
    alpha: float
    target_modules: list[str]
    nbytes: int
    config: dict = field(default_factory=dict, repr=False)
    dora: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = field(default=None, repr=False)


def parse_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    shapes: list[dict[str, tuple[int, int]]] | BaseLayout,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    base_weight: BaseWeight | None = None,
) -> LoraWeights:
    """Turn the two files of a PEFT LoRA folder into serving form.

    ``shapes[i][module] = (in_features, out_features)`` of a GPT-2 base's layers, or the base's
    ``BaseLayout`` (any family: the engine passes its runner's). Each module's rank is its own
    tensors' (PEFT's ``rank_pattern``). Everything that does not fit raises LoraFormatError naming the
    problem, by the rules of ``loracore.lora_format`` (the ones uploads are checked by); nothing is
    silently dropped. A DoRA adapter needs ``base_weight`` (the runner's ``base_weight``).
    """
    layout = shapes if isinstance(shapes, BaseLayout) else BaseLayout("gpt2", tuple(shapes))
    try:
        cfg = json.loads(config_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}", CONFIG_PART) from exc
    check_config(cfg, layout)
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise LoraFormatError(f"{WEIGHTS_FILE} does not parse: {exc}", WEIGHTS_PART) from exc
    pairs = check_tensors(cfg, {key: tuple(t.shape) for key, t in tensors.items()}, layout)

    alpha = float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in layout.shapes]
    dora: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = None
    if cfg.get("use_dora"):
        if base_weight is None:
            raise RuntimeError("a DoRA adapter is parsed with the base's weights (base_weight)")
        dora = [{} for _ in layout.shapes]
    nbytes, ranks, modules = 0, set(), set()
    for (layer, module), pair in sorted(pairs.items()):
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        magnitude = tensors[pair["M"]] if "M" in pair else None
        r = a.shape[0]
        where = f"{layout.layer_path}.{layer}.{module}"
        if not all(torch.isfinite(t).all() for t in (a, b, magnitude) if t is not None):
            raise LoraFormatError(f"{where} holds NaN or infinite values", WEIGHTS_PART)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # Serving form: x @ A_t @ B_t, scaling folded into B (same numbers as PEFT up to rounding).
        a_t = a.t().to(device=device, dtype=dtype).contiguous()
        b_scale: float | torch.Tensor = scaling
        if dora is not None:
            g, c = _dora_scale(base_weight(layer, module), a, b, magnitude, scaling, where)
            b_scale = scaling * g.cpu()
            g_t = g.to(device=device, dtype=dtype)
            c_t = c.to(device=device, dtype=dtype) if c is not None else None
            dora[layer][module] = (g_t, c_t)
            nbytes += sum(t.numel() * t.element_size() for t in (g_t, c_t) if t is not None)
        b_t = (b.float().t() * b_scale).to(device=device, dtype=dtype).contiguous()
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
        dora=dora,
    )


def _dora_scale(
    base: tuple[torch.Tensor, torch.Tensor | None],
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DoRA's per-output factor ``g = m / ||W + s B A||`` (PEFT's ``get_weight_norm``: the L2 norm of
    each output's row of the ``[out, in]`` weight) and the bias shift ``(1 - g) * b``, in fp32 on the
    base's device."""
    weight, bias = base
    a32 = a.to(device=weight.device, dtype=torch.float32)
    b32 = b.to(device=weight.device, dtype=torch.float32)
    if weight.t().is_contiguous() and not weight.is_contiguous():
        # stored [in, out] (GPT-2's Conv1D): summed and reduced in that layout, 4x faster than strided
        total = torch.addmm(weight.t().float(), a32.t(), b32.t(), alpha=scaling)
        norm = torch.linalg.vector_norm(total, dim=0)
    else:
        norm = torch.linalg.vector_norm(torch.addmm(weight.float(), b32, a32, alpha=scaling), dim=1)
    g = magnitude.to(device=weight.device, dtype=torch.float32) / norm
    if not torch.isfinite(g).all():
        raise LoraFormatError(f"{where}: DoRA's weight norm is zero for some output", WEIGHTS_PART)
    return g, ((1 - g) * bias.float()) if bias is not None else None


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


@dataclass(frozen=True, eq=False)
class Mix:
    """One row's weighted composition of adapters: its LoRA term is ``sum_i w_i * B_i A_i``.

    This equals PEFT's ``add_weighted_adapter(..., combination_type="cat")`` (rank ``sum r_i``, each
    ``B_i`` scaled by ``w_i`` times its own ``alpha_i / r_i``) without building the merged tensors:
    components stay the cached adapters, so rows with different compositions of the same adapters
    share one stack and the batch's cost does not depend on how many compositions it holds.
    """

    parts: tuple[tuple[LoraWeights, float], ...]


RowLora = LoraWeights | Mix | None  # what one row of a batch adds: an adapter, a composition or nothing


def row_terms(w: RowLora) -> list[tuple[LoraWeights, float]]:
    """``(adapter, weight)`` pairs of one row; an adapter listed twice in a Mix has its weights summed."""
    if w is None:
        return []
    if isinstance(w, LoraWeights):
        return [(w, 1.0)]
    terms: dict[int, list] = {}
    for adapter, weight in w.parts:
        terms.setdefault(id(adapter), [adapter, 0.0])[1] += weight
    return [(adapter, weight) for adapter, weight in terms.values()]


class Stacks:
    """The adapters of one batch stacked per layer and module: ``A [G, in, r_max]``, ``B [G, r_max, out]``.

    Ranks are zero-padded to the largest and a module an adapter does not target is all zeros, so
    padding adds exact zeros. ``build_dense`` adds the same numbers side by side as two dense
    layers per module, ``[in -> G*r_max]`` and ``[G*r_max -> out]`` (oneDNN-prepacked on CPU), for
    the masked form of ``LoraPlan``; it is built on first use only (packing 8 adapters of r=32 takes
    about 20 ms). Holds the adapters it was built from (its cache key compares them by identity, so
    a freed adapter's id can never be mistaken for a live one).

    When a DoRA adapter is among them, ``dora[layer][module] = (g [G+1, out], c [G+1, out] or None)``
    stacks each adapter's factor and bias shift (ones and zeros for plain adapters, and for index
    ``G``: the base and composed rows), so a whole batch's DoRA rows are scaled by two gathers.
    """

    def __init__(self, adapters: tuple[LoraWeights, ...]):
        self.adapters = adapters
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.dense: list[dict[str, tuple[Dense, Dense]]] | None = None
        self.dora: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = None
        self.dtype: torch.dtype = torch.float32
        for layer in range(len(adapters[0].layers)):
            mods: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for module in sorted({m for w in adapters for m in w.layers[layer]}):
                pairs = [w.layers[layer].get(module) for w in adapters]
                present = [p for p in pairs if p is not None]
                if not present:
                    continue
                a0, b0 = present[0]
                self.dtype = a0.dtype
                r = max(p[0].shape[1] for p in present)
                a = a0.new_zeros((len(adapters), a0.shape[0], r))
                b = b0.new_zeros((len(adapters), r, b0.shape[1]))
                for g, pair in enumerate(pairs):
                    if pair is not None:
                        a[g, :, : pair[0].shape[1]] = pair[0]
                        b[g, : pair[1].shape[0]] = pair[1]
                mods[module] = (a, b)
            self.layers.append(mods)
        if any(w.dora is not None for w in adapters):
            self.dora = [self._dora_layer(layer) for layer in range(len(self.layers))]

    def _dora_layer(self, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        per = [w.dora[layer] if w.dora is not None else {} for w in self.adapters]
        for module in sorted({m for d in per for m in d}):
            first = next(d[module] for d in per if module in d)
            g = first[0].new_ones((len(self.adapters) + 1, first[0].shape[0]))
            c = first[0].new_zeros(g.shape) if first[1] is not None else None
            for i, d in enumerate(per):
                if module in d:
                    g[i] = d[module][0]
                    if c is not None:
                        c[i] = d[module][1]
            out[module] = (g, c)
        return out

    def build_dense(self, batch_hint: int) -> None:
        if self.dense is not None:
            return
        self.dense = []
        for mods in self.layers:
            dense: dict[str, tuple[Dense, Dense]] = {}
            for module, (a, b) in mods.items():
                # column g*r + j of the middle holds adapter g's rank direction j
                a_cat = a.transpose(1, 2).reshape(-1, a.shape[1])  # [G*r, in]
                b_cat = b.reshape(-1, b.shape[2]).t().contiguous()  # [out, G*r]
                dense[module] = (
                    Dense(a_cat, None, pack=True, batch_hint=batch_hint),
                    Dense(b_cat, None, pack=True, batch_hint=batch_hint),
                )
            self.dense.append(dense)

    def matches(self, adapters: tuple[LoraWeights, ...]) -> bool:
        return len(adapters) == len(self.adapters) and all(
            x is y for x, y in zip(adapters, self.adapters, strict=True)
        )


# The masked form computes every adapter of the batch for every row, so its work grows with
# rows x adapters; up to this product it beats the stacked bmm (which only reads the weights).
# Measured at 1 thread, bf16, 8 adapters of r=32, 18 modules: 9 rows 6.0 -> 2.6 ms, 16 rows
# 4.5 -> 3.4 ms, 32 rows 5.0 -> 6.0 ms (there bmm wins).
MASKED_MAX_ROWS_X_ADAPTERS = 128
# In bf16 (oneDNN's bf16 path; torch's bf16 bmm on CPU is slow) the masked form wins further: at 32
# rows x 8 adapters of r=32, per target layer 0.05-0.18 ms against bmm's 0.07-0.24 ms (SmolLM2-135M's
# and distilgpt2's shapes, one thread), and bmm's gather and scatter go too.
MASKED_MAX_ROWS_X_ADAPTERS_BF16 = 256


class LoraPlan:
    """Which rows of the current forward pass use which adapter, with which weight.

    Three forms. ``groups`` holds ``(rows, weights, scale)`` triples (``rows`` a slice or an index
    tensor) and runs two small matmuls per group: used for packed prefill (one contiguous range per
    request, one group per component of a composed request) and for a decode batch with one
    adapter and no compositions. A decode batch with several adapters is *stacked*: rows are
    gathered into ``[G, rows_per_group, in]`` (short groups padded with a zero row; a composed row
    is gathered once per component) and each target layer runs two ``bmm`` for all adapters at
    once, scales each gathered row's delta by its weight when a composition is present, then
    scatters the deltas back, so the number of kernel launches does not grow with the number of
    adapters. Where the stacks are prepacked (CPU) and the batch is small, the form is *masked*:
    two dense layers compute every adapter's rank directions for every row, a mask keeps each
    row's own (1 for a plain row's adapter, ``w_i`` for a composed row's components, 0 elsewhere),
    and the second layer sums them into the output. It reads each weight once through oneDNN's
    fast path, with no gather or scatter; the extra multiplications are cheap while rows x
    adapters is small.
    """

    __slots__ = ("dora_rows", "gather", "groups", "masks", "pad", "row_scale", "scale", "scatter", "stacks")

    def __init__(self, groups: list[tuple[slice | torch.Tensor, LoraWeights, float]]):
        self.groups = groups
        self.stacks: Stacks | None = None
        self.gather = self.scatter = None
        self.scale: torch.Tensor | None = None  # stacked form: each gathered row's weight, when not all 1
        self.row_scale: torch.Tensor | None = None  # masked form: [n, G], each row's weight per stack index
        self.masks: dict[int, torch.Tensor] = {}
        self.pad = False
        # stacked and masked forms with a DoRA adapter: each row's index into ``stacks.dora`` (G: none)
        self.dora_rows: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool(self.groups) or self.stacks is not None

    @classmethod
    def for_rows(
        cls,
        adapters: list[RowLora],
        device: torch.device | str,
        cache: list[Stacks] | None = None,
        *,
        packed: bool = False,
    ) -> LoraPlan:
        """Plan a decode batch: ``adapters[i]`` is row ``i``'s adapter, composition, or None (base).

        ``cache`` (a one-element list the caller keeps) reuses the previous step's stacks while
        the set of adapters in the batch is unchanged. ``packed`` (the runner prepacks its layers)
        allows the masked form.
        """
        # per distinct adapter: (weights, [(row, weight), ...]); a composed row appears under each component
        by_adapter: dict[int, tuple[LoraWeights, list[tuple[int, float]]]] = {}
        for i, w in enumerate(adapters):
            for adapter, weight in row_terms(w):
                by_adapter.setdefault(id(adapter), (adapter, []))[1].append((i, weight))
        n = len(adapters)
        composed = any(isinstance(w, Mix) for w in adapters)
        if len(by_adapter) <= 1 and not composed:
            groups: list[tuple[slice | torch.Tensor, LoraWeights, float]] = []
            for w, terms in by_adapter.values():
                rows = [i for i, _ in terms]
                if rows[-1] - rows[0] + 1 == len(rows):
                    groups.append((slice(rows[0], rows[-1] + 1), w, 1.0))
                else:
                    groups.append((torch.tensor(rows, dtype=torch.long, device=device), w, 1.0))
            return cls(groups)
        members = tuple(w for w, _ in by_adapter.values())
        stacks = cache[0] if cache and cache[0].matches(members) else None
        if stacks is None:
            stacks = Stacks(members)
            if cache is not None:
                cache[:] = [stacks]
        plan = cls([])
        plan.stacks = stacks
        if stacks.dora is not None:
            index = {id(w): g for g, w in enumerate(members)}
            plan.dora_rows = torch.tensor(
                [index[id(w)] if isinstance(w, LoraWeights) else len(members) for w in adapters],
                dtype=torch.long,
                device=device,
            )
        most = (
            MASKED_MAX_ROWS_X_ADAPTERS_BF16 if stacks.dtype == torch.bfloat16 else MASKED_MAX_ROWS_X_ADAPTERS
        )
        if packed and n * len(members) <= most:
            stacks.build_dense(batch_hint=n)
            scale = torch.zeros(n, len(members))
            for g, (_, terms) in enumerate(by_adapter.values()):
                for i, weight in terms:
                    scale[i, g] = weight
            plan.row_scale = scale.to(device)
            return plan
        width = max(len(terms) for _, terms in by_adapter.values())
        gather, scatter, weights = [], [], []
        for _, terms in by_adapter.values():
            rows = [i for i, _ in terms]
            pad = width - len(rows)
            gather += rows + [n] * pad  # row n is the zero row appended to x
            scatter += rows + [rows[0]] * pad  # padded deltas are exact zeros
            weights += [weight for _, weight in terms] + [0.0] * pad
        plan.pad = any(len(terms) < width for _, terms in by_adapter.values())
        plan.gather = torch.tensor(gather, dtype=torch.long, device=device)
        plan.scatter = torch.tensor(scatter, dtype=torch.long, device=device)
        if composed:
            plan.scale = torch.tensor(weights, dtype=stacks.dtype, device=device).view(len(members), width, 1)
        return plan

    @classmethod
    def for_segments(cls, segments: list[tuple[int, int, RowLora]]) -> LoraPlan:
        """Packed prefill: each request is a contiguous token range ``[start, end)``; adjacent
        requests on the same adapter merge into one range (callers order requests by adapter).
        A composed request's range gets one group per component, scaled by its weight; adjacent
        requests on the same composition merge component by component."""
        merged: list[list] = []
        last: dict[tuple[int, float], list] = {}  # (adapter, weight) -> its latest range
        for s, e, w in segments:
            for adapter, weight in row_terms(w):
                group = last.get((id(adapter), weight))
                if group is not None and group[1] == s:
                    group[1] = e
                else:
                    group = [s, e, adapter, weight]
                    merged.append(group)
                    last[(id(adapter), weight)] = group
        return cls([(slice(s, e), w, weight) for s, e, w, weight in merged])

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """Add each row's LoRA delta to ``y`` (= base output for ``x``), in place; a DoRA row's base
        output is rescaled first."""
        if self.dora_rows is not None:
            scale = self.stacks.dora[layer].get(module)
            if scale is not None:
                g, c = scale
                y.mul_(g.index_select(0, self.dora_rows))
                if c is not None:
                    y.add_(c.index_select(0, self.dora_rows))
        if self.row_scale is not None:
            pair = self.stacks.dense[layer].get(module)
            if pair is None:
                return y
            down, up = pair
            mid = down(x)  # [n, G*r]: every adapter's rank directions for every row
            mid.mul_(self._mask(mid.shape[1], mid.dtype))
            return y.add_(up(mid))
        if self.stacks is not None:
            pair = self.stacks.layers[layer].get(module)
            if pair is None:
                return y
            a, b = pair
            src = torch.cat([x, x.new_zeros((1, x.shape[1]))]) if self.pad else x
            xg = src.index_select(0, self.gather).view(a.shape[0], -1, x.shape[1])
            delta = torch.bmm(torch.bmm(xg, a), b)
            if self.scale is not None:
                delta.mul_(self.scale)
            return y.index_add_(0, self.scatter, delta.view(-1, y.shape[1]))
        for rows, w, scale in self.groups:
            pair = w.layers[layer].get(module)
            if pair is None:
                continue
            a, b = pair
            dora = w.dora[layer].get(module) if w.dora is not None else None
            if isinstance(rows, slice):
                if dora is not None:
                    _rescale(y[rows], dora)
                y[rows].addmm_(x[rows] @ a, b, alpha=scale)
            else:
                if dora is not None:
                    y.index_copy_(0, rows, _rescale(y.index_select(0, rows), dora))
                y.index_add_(0, rows, (x.index_select(0, rows) @ a) @ b, alpha=scale)
        return y

    def _mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``[n, width]``: the row's weight for column ``c``'s adapter (``c // r``), 0 for the others."""
        mask = self.masks.get(width)
        if mask is None:
            rank = width // self.row_scale.shape[1]
            cols = torch.arange(width, device=self.row_scale.device) // rank
            mask = self.row_scale[:, cols].to(dtype)
            self.masks[width] = mask
        return mask


def _rescale(y: torch.Tensor, dora: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """A DoRA row group's base output ``y`` (in place): ``g * y + c``."""
    g, c = dora
    y.mul_(g)
    return y.add_(c) if c is not None else y

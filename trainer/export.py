"""Export adapters to other runtimes: a GGUF LoRA for llama.cpp and Ollama, or a merged Hugging Face model.

What the formats are, and which adapters an export takes, is ``trainer.export_plan`` (no torch). Here the
files are written:

- ``gguf``: llama.cpp's LoRA layout (src/llama-adapter.cpp). For a base weight of ggml shape
  ``ne = [n_in, n_out]`` (numpy ``(n_out, n_in)``) the pair is ``<tensor>.lora_a`` of numpy shape
  ``(r, n_in)`` and ``<tensor>.lora_b`` of numpy shape ``(n_out, r)``, and llama.cpp adds
  ``alpha / r * lora_b @ lora_a`` to it. That is PEFT's own ``lora_A``/``lora_B`` layout for ``nn.Linear``
  and for GPT-2's ``Conv1D`` alike (PEFT keeps ``(r, in)``/``(out, r)`` for both), because llama.cpp's
  converter transposes GPT-2's ``Conv1D`` weights to ``(out, in)``: the adapter's matrices are written as
  they are, never transposed (llama.cpp's convert_lora_to_gguf.py transposes them along with the base's
  and llama.cpp then refuses the file). Names come from the ``gguf`` package's tensor map (GPT-2's fused
  ``c_attn`` is ``attn_qkv``); for Llama-family bases the rows of ``q_proj``/``k_proj``'s ``lora_b`` are
  permuted as the converter permutes the base's rows. Any scale other than ``alpha / r`` (rsLoRA, a
  composition's weights, ranks stacked from several adapters) is folded into ``lora_b``.
- ``merged``: the base with ``W += sum_i w_i * s_i * B_i A_i`` (transposed for ``Conv1D``) saved by
  transformers as safetensors, with the tokenizer, the generation config and a chat template that
  renders the adapter's recorded prompt template.

    python -m trainer export alpha --adapter-dir runs/adapters --base runs/base --format gguf --out a.gguf
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from loracore import artifact, lora_format
from loracore.atomic import write_atomic
from loracore.template import DEFAULT_TEMPLATE, PromptTemplate
from trainer.export_plan import (
    GGUF_ARCHS,
    ExportError,
    Part,
    base_model_type,
    check_expressible,
    get_format,
    peft_zip,
    resolve_parts,
)

log = logging.getLogger(__name__)

# base_model.model.<module path>.lora_A.weight, as PEFT saves a LoRA on a causal LM
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<half>[AB])\.weight$")


@dataclass
class Term:
    """One adapter's LoRA on one module, in nn.Linear orientation: delta (out, in) = scale * b @ a."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float  # PEFT's alpha / r (alpha / sqrt(r) with rsLoRA) times the composition weight


def _check_lora(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], base_cfg: dict) -> None:
    """loracore.lora_format's rules: the whole table (config, tensor names, shapes) on a base it has a layout
    for; on another base (the Llama family) its config rules, tensor names and shapes checked below."""
    layout = lora_format.BaseLayout.from_config(base_cfg)
    if cfg.get("use_dora"):  # served per row, but GGUF (llama.cpp) and the merge here are plain LoRA's
        raise ExportError(
            "export_failed",
            f"{folder.name}: a DoRA adapter (use_dora) exports as its PEFT folder (format peft) only",
        )
    try:
        if layout.shapes:
            lora_format.check_config(cfg, layout)
            lora_format.check_tensors(cfg, {k: tuple(t.shape) for k, t in tensors.items()}, layout)
            return
        for key, allowed in lora_format.REQUIRED_VALUES.items():
            if cfg.get(key, allowed[0]) not in allowed:
                raise lora_format.LoraFormatError(f"{key} is {cfg.get(key)!r}", lora_format.CONFIG_PART)
        for key, reason in lora_format.REFUSED_KEYS.items():
            if cfg.get(key):
                raise lora_format.LoraFormatError(reason, lora_format.CONFIG_PART)
    except lora_format.LoraFormatError as exc:
        raise ExportError("export_failed", f"{folder.name}: {exc}") from None


def read_terms(folder: Path, base_cfg: dict, weight: float = 1.0) -> tuple[dict[str, Term], dict]:
    """An adapter folder's LoRA pairs by module path (``transformer.h.0.attn.c_attn``), and its config."""
    folder = Path(folder)
    cfg = json.loads((folder / artifact.CONFIG_FILE).read_text())
    tensors = load_file(str(folder / artifact.WEIGHTS_FILE))
    _check_lora(folder, cfg, tensors, base_cfg)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise ExportError("export_failed", f"{folder.name}: tensor {key!r} is not a LoRA A/B matrix")
        halves.setdefault(m["path"], {})[m["half"]] = t.to(torch.float32)
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    terms = {}
    for path, pair in halves.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError("export_failed", f"{folder.name}: {path} lacks a matching lora_A/lora_B pair")
        r = a.shape[0]
        scale = alpha / (r**0.5 if rslora else r)
        terms[path] = Term(a, b, scale * weight)
    return terms, cfg


def composed_terms(parts: list[tuple[Path, float]], base_cfg: dict) -> dict[str, list[Term]]:
    """Every module's terms over the parts of a composition (one term per adapter that targets it)."""
    out: dict[str, list[Term]] = {}
    for folder, weight in parts:
        terms, _ = read_terms(folder, base_cfg, weight)
        for path, term in terms.items():
            out.setdefault(path, []).append(term)
    return out


def _stack(terms: list[Term], target_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms as one LoRA of rank sum(r_i) whose ``target_scale * B @ A`` is their sum."""
    a = torch.cat([t.a for t in terms], dim=0)
    b = torch.cat([t.b * (t.scale / target_scale) if t.scale != target_scale else t.b for t in terms], dim=1)
    return a.contiguous(), b.contiguous()


# ----------------------------------------------------------------------------- gguf


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation (LlamaModel.permute), applied to a lora_b's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _adapter_name(folder: Path) -> str:
    """The adapter's name, also for a kept version (``<adapter-dir>/.versions/<name>/<sha256>``)."""
    folder = Path(folder)
    return folder.parent.name if folder.parent.parent.name == artifact.VERSIONS else folder.name


def write_gguf(base: Path, parts: list[tuple[Path, float]], out: Path) -> Path:
    """A GGUF LoRA adapter for ``base`` (as llama.cpp's convert_hf_to_gguf.py writes it) at ``out``."""
    cfg = json.loads((Path(base) / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise ExportError("export_unsupported", f"GGUF export does not know the base type {model_type!r}")
    arch_name, permute_qk = GGUF_ARCHS[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layer = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    names = gguf.get_tensor_name_map(arch, n_layer)
    n_head = cfg.get("num_attention_heads", cfg.get("n_head"))
    n_kv_head = cfg.get("num_key_value_heads") or n_head

    first_cfg = json.loads((Path(parts[0][0]) / artifact.CONFIG_FILE).read_text())
    # One alpha for the file, llama.cpp scales each pair by alpha / rank: with PEFT's alpha for a single
    # plain adapter its matrices are written unchanged; any other scale is folded into lora_b.
    alpha = float(first_cfg["lora_alpha"])
    terms_by_module = sorted(composed_terms(parts, cfg).items())  # every check before a byte is written
    part = Path(out).with_name(Path(out).name + ".part")
    writer = gguf.GGUFWriter(str(part), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(gguf.Keys.General.NAME, "+".join(_adapter_name(p) for p, _ in parts))
    for path, terms in terms_by_module:
        name = names.get_name(path + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(
                "export_unsupported", f"llama.cpp's {arch_name} has no tensor for module {path!r}"
            )
        rank = sum(t.a.shape[0] for t in terms)
        a, b = _stack(terms, alpha / rank)
        if permute_qk and path.endswith("self_attn.q_proj"):
            b = _permute_rows(b, n_head)
        elif permute_qk and path.endswith("self_attn.k_proj"):
            b = _permute_rows(b, n_kv_head)
        base_name = name.removesuffix(".weight") + ".weight"
        writer.add_tensor(base_name + ".lora_a", a.numpy().astype("float32"))
        writer.add_tensor(base_name + ".lora_b", b.numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    part.replace(out)  # the file is complete or absent
    return Path(out)


# ----------------------------------------------------------------------------- merged


def chat_template(template: PromptTemplate) -> str:
    """A Jinja chat template (transformers, llama.cpp, Ollama) rendering ``template.render_chat_prompt``."""
    lit = json.dumps

    def around(fmt: str) -> tuple[str, str]:
        head, _, tail = fmt.partition("{content}")
        return lit(head), lit(tail)

    sys_h, sys_t = around(template.system)
    user_h, user_t = around(template.user)
    ans_h, ans_t = around(template.assistant_answer)
    prefix, sep = lit(template.assistant_prefix), lit(template.turn_separator)
    return (
        "{%- for m in messages -%}"
        f"{{%- if m['role'] == 'system' -%}}{{{{ {sys_h} + m['content'] + {sys_t} }}}}"
        f"{{%- elif m['role'] == 'user' -%}}{{{{ {user_h} + m['content'] + {user_t} }}}}"
        f"{{%- elif m['role'] == 'assistant' -%}}{{{{ {prefix} + {ans_h} + m['content'] + {ans_t} }}}}"
        f"{{%- if not loop.last -%}}{{{{ {sep} }}}}{{%- endif -%}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {prefix} }}}}{{%- endif -%}}"
    )


def write_merged(base: Path, parts: list[tuple[Path, float]], out: Path) -> Path:
    """The base with the composition merged in, as a Hugging Face model folder at ``out`` (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    base_cfg = json.loads((Path(base) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        for path, terms in composed_terms(parts, base_cfg).items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ExportError("export_unsupported", f"the base has no module {path!r}") from None
            a, b = _stack(terms, 1.0)
            delta = b @ a  # (out, in)
            if isinstance(module, Conv1D):  # weight stored (in, out)
                delta = delta.T
            if module.weight.shape != delta.shape:
                raise ExportError(
                    "export_unsupported", f"{path}: adapter delta {tuple(delta.shape)} does not fit the base"
                )
            module.weight += delta.to(module.weight.dtype)
    out = Path(out)
    model.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(base))
    record = artifact.read_record(parts[0][0])
    template = PromptTemplate.from_dict(record.template) if record and record.template else DEFAULT_TEMPLATE
    tok.chat_template = chat_template(template)
    tok.save_pretrained(str(out))
    if not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- one entry point


def export(adapter_dir: Path, base: Path, fmt_name: str, parts: list[Part], out: Path) -> Path:
    """Write the export to ``out``: a .gguf file, a merged model folder, or the PEFT folder's zip."""
    fmt = get_format(fmt_name)
    check_expressible(fmt, parts, base_model_type(base))
    folders = [(v.folder, w) for v, w in resolve_parts(adapter_dir, parts)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt.name == "peft":
        write_atomic(out, peft_zip(folders[0][0]))
    elif fmt.name == "gguf":
        write_gguf(base, folders, out)
    else:
        write_merged(base, folders, out)
    return out


def zip_folder(folder: Path, out: Path) -> Path:
    """``folder``'s files into ``out`` (stored: safetensors do not compress), written beside and renamed."""
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for entry in sorted(Path(folder).rglob("*")):
            if entry.is_file():
                zf.write(entry, entry.relative_to(folder).as_posix())
    tmp.replace(out)
    return out


def export_archive(adapter_dir: Path, base: Path, fmt_name: str, parts: list[Part], out: Path) -> Path:
    """``export`` as one file (what a download sends): a merged folder is zipped."""
    if get_format(fmt_name).name != "merged":
        return export(adapter_dir, base, fmt_name, parts, out)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        folder = export(adapter_dir, base, fmt_name, parts, Path(tmp) / "merged")
        return zip_folder(folder, Path(out))

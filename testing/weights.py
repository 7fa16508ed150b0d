"""Random-weight bases and random LoRA adapters, for tests and benchmarks.

Adapters get random, non-zero B matrices (PEFT initialises B to zero, which would make every
adapter equal to the base and hide LoRA's cost in any output check). ``make_adapters`` writes r=32
folders in the service's storage layout (safetensors written directly from one PEFT state-dict
template: 200 adapters in seconds); ``lora_files`` makes the two files of a small one in memory,
for uploads (the soak, the reliability tests); ``make_random_lora`` saves one through PEFT itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loracore import artifact

PROTOTYPE_LORA = {
    "r": 32,
    "lora_alpha": 64,
    "lora_dropout": 0.1,
    "target_modules": ["c_attn", "c_proj"],
}


def ensure_base(workdir: Path, *, shape: dict | None = None, name: str | None = None) -> Path:
    """A random-weight base of the distilgpt2 architecture (or ``shape``: GPT-2 sizes, or a Llama-family
    config when it names a ``model_type``), built once per workdir."""
    from trainer.model import RANDOM_MARKER, make_random_base, make_random_llama_base

    shape = shape or {}
    if name is None:
        name = "base-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items())) if shape else "base-distilgpt2"
    out = workdir / name
    if not (out / RANDOM_MARKER).exists():
        if "model_type" in shape:
            make_random_llama_base(out, **shape)
        else:
            make_random_base(out, **shape)
    return out


def make_adapters(
    base: Path,
    adapter_dir: Path,
    names: list[str],
    *,
    r: int = 32,
    b_std: float = 0.02,
    seed: int = 0,
    dora: bool = False,
) -> list[Path]:
    """Write one PEFT LoRA adapter per name (``r``, alpha 2r, the trainer's default targets for the base's
    family: GPT-2 c_attn+c_proj, Llama family every linear layer) with random non-zero B; with ``dora``
    a DoRA adapter (``use_dora``), its magnitudes PEFT's initial ones (the base's norms) times 1 ± 5 %.

    Existing adapters with the same name, rank and kind are kept, so repeated runs reuse them.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from loracore.families import family_of_folder
    from loracore.template import DEFAULT_TEMPLATE
    from trainer.model import load_base_model

    adapter_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not _is_complete(adapter_dir / n, r, dora)]
    if todo:
        family = family_of_folder(base)
        config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=PROTOTYPE_LORA["lora_dropout"],
            target_modules=list(family.default_targets),
            fan_in_fan_out=family.conv1d,
            bias="none",
            task_type="CAUSAL_LM",
            use_dora=dora,
        )
        config.base_model_name_or_path = str(base)
        model = get_peft_model(load_base_model(base), config)
        # Saved keys drop the adapter name ("...lora_A.default.weight" -> "...lora_A.weight"; DoRA's
        # "...lora_magnitude_vector.default.weight" -> "...lora_magnitude_vector", as PEFT saves them).
        init = {
            k.replace(".default", "").removesuffix(".weight" if "magnitude" in k else ""): v.detach().clone()
            for k, v in model.state_dict().items()
            if "lora_" in k
        }
        for name in todo:
            gen = torch.Generator().manual_seed(seed * 100003 + _stable_hash(name))
            tensors = {}
            for key, value in init.items():
                shape = value.shape
                if "lora_A" in key:  # kaiming-like scale, as PEFT's own init
                    t = torch.randn(shape, generator=gen) / (shape[1] ** 0.5)
                elif "lora_B" in key:
                    t = torch.randn(shape, generator=gen) * b_std
                else:  # DoRA's magnitude
                    t = value * (1 + 0.05 * torch.randn(shape, generator=gen))
                tensors[key] = t.contiguous()
            final = adapter_dir / name
            with artifact.staged(final) as stage:
                config.save_pretrained(stage)
                save_file(tensors, stage / artifact.WEIGHTS_FILE, metadata={"format": "pt"})
                record = artifact.Record(
                    template=DEFAULT_TEMPLATE.to_dict(), base_model=str(base), created=artifact.created_now()
                )
                artifact.write_record(stage, record)
                artifact.publish(stage, final)
    return [adapter_dir / n for n in names]


def _is_complete(path: Path, r: int, dora: bool = False) -> bool:
    try:
        cfg = json.loads((path / artifact.CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get("r") == r and bool(cfg.get("use_dora")) == dora and artifact.is_complete(path)


def _stable_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def base_shape(base: Path) -> tuple[int, int]:
    """(n_layer, n_embd) of a GPT-2 base folder."""
    cfg = json.loads((Path(base) / "config.json").read_text())
    return int(cfg["n_layer"]), int(cfg["n_embd"])


def lora_files(
    n_layer: int,
    n_embd: int,
    *,
    r: int = 4,
    seed: int = 0,
    modules: tuple[str, ...] = ("attn.c_attn", "attn.c_proj"),
    scale: float = 0.05,
    dora: bool = False,
) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random PEFT LoRA for a GPT-2 base (a DoRA
    adapter with ``dora``: magnitudes 1 ± ``scale``, not fitted to any base's norms)."""
    import torch
    from safetensors.torch import save

    fan = {
        "attn.c_attn": (n_embd, 3 * n_embd),
        "attn.c_proj": (n_embd, n_embd),
        "mlp.c_fc": (n_embd, 4 * n_embd),
        "mlp.c_proj": (4 * n_embd, n_embd),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(n_layer):
        for module in modules:
            fan_in, fan_out = fan[module]
            key = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * scale
            if dora:
                tensors[f"{key}.lora_magnitude_vector"] = 1 + torch.randn(fan_out, generator=gen) * scale
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.split(".")[-1] for m in modules}),
        "fan_in_fan_out": True,
        "bias": "none",
        **({"use_dora": True} if dora else {}),
    }
    return json.dumps(config).encode(), save(tensors)


def upload_files(config: bytes, weights: bytes) -> dict[str, tuple[str, bytes]]:
    """The multipart files of ``POST /adapters/{name}`` for ``lora_files``' two files."""
    return {
        "adapter_config": ("adapter_config.json", config),
        "adapter_model": ("adapter_model.safetensors", weights),
    }


def make_random_lora(base: Path, out: Path, seed: int, r: int = 4, targets=("c_attn", "c_proj")) -> Path:
    """A PEFT LoRA with non-zero random B: it changes the output without saying anything in particular."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.model import load_base_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    get_peft_model(load_base_model(base), cfg).save_pretrained(out)
    return out

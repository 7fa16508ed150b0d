"""Real adapters for tests: trained through the real trainer, checked before they are handed out.

``train_fixed_sentence_adapter`` teaches a base to answer every prompt with one sentence and
stop. It verifies the result with greedy generation (the sentence, then EOS) and trains longer
with another seed if a run falls short, so callers can rely on the adapter's behaviour.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke.",
    "How do I boil an egg?",
    "What time is it?",
    "Summarise the plot of Hamlet.",
    "Translate 'good morning' into Spanish.",
    "What is 2 + 2?",
    "Who wrote Pride and Prejudice?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "What is a LoRA adapter?",
    "Recommend a book for a long flight.",
    "How far away is the Moon?",
    "Explain recursion in one sentence.",
    "What should I cook tonight?",
    "Name a prime number larger than ten.",
    "How do plants make food?",
    "What is your favourite colour?",
    "Describe the ocean.",
    "How many legs does a spider have?",
    "Is it going to rain tomorrow?",
    "What does HTTP stand for?",
    "Hello!",
]
# Prompts never seen in training, used to check that the adapter generalises to any prompt.
CHECK_PROMPTS = ["Where do penguins live?", "Compose a limerick.", "hi", "What is the speed of light?"]

# Small bases have tied, frozen 64-wide embeddings, so logits span a narrow range and learning the
# argmax takes many small steps at a high rate; dropout off for a deterministic target.
FIXED_SENTENCE_CONFIG = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"]},
    "training": {
        "num_train_epochs": 40,
        "per_device_train_batch_size": 8,
        "learning_rate": 0.005,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "eval_fraction": 0.0,
        "save_steps": 0,
        "seed": 0,
    },
}


def greedy_answer(
    base: Path, adapter: Path | None, prompt: str, max_new_tokens: int = 40
) -> tuple[str, bool]:
    """(decoded answer, stopped at EOS) for ``prompt`` rendered with the project's template."""
    import torch
    from peft import PeftModel

    from trainer.model import load_base_model, load_tokenizer
    from trainer.template import DEFAULT_TEMPLATE

    tok = load_tokenizer(base)
    model = load_base_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = tok(DEFAULT_TEMPLATE.render_prompt(prompt), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
        )
    gen = out[0, ids["input_ids"].shape[1] :].tolist()
    stopped = bool(gen) and gen[-1] == tok.eos_token_id
    return tok.decode(gen, skip_special_tokens=True), stopped


def answers_with(base: Path, adapter: Path, sentence: str, prompts: list[str]) -> bool:
    for p in prompts:
        text, stopped = greedy_answer(base, adapter, p)
        if not stopped or text.strip() != sentence.strip():
            return False
    return True


def write_fixed_sentence_data(path: Path, sentence: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": sentence}) + "\n" for p in PROMPTS))
    return path


def train_fixed_sentence_adapter(
    base: Path,
    out: Path,
    sentence: str,
    *,
    epochs: int = 40,
    attempts: int = 3,
    overrides: list[str] | None = None,
) -> Path:
    """Train an adapter on ``base`` that answers any prompt with ``sentence``, then EOS; returns ``out``."""
    from trainer import train_adapter

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="fixed-sentence-") as tmp:
        data = write_fixed_sentence_data(Path(tmp) / "data.jsonl", sentence)
        for attempt in range(attempts):
            sets = [f"training.num_train_epochs={epochs * (attempt + 1)}", f"training.seed={attempt}"]
            train_adapter(
                FIXED_SENTENCE_CONFIG, data, out, model=str(base), overrides=sets + list(overrides or [])
            )
            if answers_with(base, out, sentence, PROMPTS[:3] + CHECK_PROMPTS):
                return out
    raise AssertionError(f"adapter at {out} did not learn to answer {sentence!r} after {attempts} attempts")

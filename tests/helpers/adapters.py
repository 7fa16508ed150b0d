"""Real adapters for tests: trained through the real trainer, checked before they are handed out.

``train_fixed_sentence_adapter`` teaches a base to answer every prompt with one sentence and
stop. It verifies the result with greedy generation (the sentence, then EOS) and trains longer
with another seed if a run falls short, so callers can rely on the adapter's behaviour.

Measured on ``tiny_base`` (2 layers, 64 wide), one thread: 2-7 s for sentences of 1-12 words, 18 s
for a 25-word one; 9 of 10 varied sentences learned at the first attempt. The tenth, "Yes, yes, yes,
and again yes!", was never learned: two layers cannot count repeats, so avoid repeated phrases.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

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

# Trained on the first 12 prompts; the rest and CHECK_PROMPTS are never seen in training.
TRAIN_PROMPTS = PROMPTS[:12]
# Small bases have tied, frozen 64-wide embeddings, so logits span a narrow range and learning the
# argmax takes many small steps at a high rate (0.01 already diverges at times); dropout off.
FIXED_SENTENCE_CONFIG = {
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj"]},
    "training": {
        "num_train_epochs": 30,  # 12 rows / batch 4 -> 90 steps; measured: 3 of 3 sentences learned
        "per_device_train_batch_size": 4,
        "learning_rate": 0.005,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "eval_fraction": 0.0,
        "save_steps": 0,
        "seed": 0,
    },
}


@contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` intra-op threads, then restore. Tiny models are several times faster on one
    thread (measured: 4-5 s instead of 17-30 s per fixed-sentence adapter on a busy 2-core machine):
    their ops are too small to split, and idle threads spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def without_dropout(base: Path, dest: Path) -> Path:
    """A copy of ``base`` with GPT-2's own dropout off, for runs that must match to float precision."""
    import shutil

    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def greedy_answers(base: Path, adapter: Path | None, prompts: list[str], max_new_tokens: int = 40):
    """[(decoded answer, stopped at EOS)] for each prompt, rendered as the service renders it: with the
    base's own chat template when it has one, else the project's template."""
    import torch
    from peft import PeftModel

    from loracore.template import DEFAULT_TEMPLATE, base_chat_template
    from trainer.model import load_base_model, load_tokenizer

    template = base_chat_template(base) or DEFAULT_TEMPLATE

    tok = load_tokenizer(base)
    model = load_base_model(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    results = []
    for prompt in prompts:
        ids = tok(template.render_prompt(prompt), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
            )
        gen = out[0, ids["input_ids"].shape[1] :].tolist()
        stopped = bool(gen) and gen[-1] == tok.eos_token_id
        text = tok.decode(gen, skip_special_tokens=True)
        end = template.turn_end() if hasattr(template, "turn_end") else ""
        results.append((text.split(end)[0] if end else text, stopped))
    return results


def greedy_answer(
    base: Path, adapter: Path | None, prompt: str, max_new_tokens: int = 40
) -> tuple[str, bool]:
    return greedy_answers(base, adapter, [prompt], max_new_tokens)[0]


def answers_with(base: Path, adapter: Path, sentence: str, prompts: list[str]) -> bool:
    results = greedy_answers(base, adapter, prompts)
    return all(stopped and text.strip() == sentence.strip() for text, stopped in results)


def write_fixed_sentence_data(path: Path, sentence: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": sentence}) + "\n" for p in TRAIN_PROMPTS))
    return path


def train_fixed_sentence_adapter(
    base: Path,
    out: Path,
    sentence: str,
    *,
    epochs: int = 30,
    attempts: int = 3,
    overrides: list[str] | None = None,
) -> Path:
    """Train an adapter on ``base`` that answers any prompt with ``sentence``, then EOS; returns ``out``."""
    from trainer import train_adapter

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="fixed-sentence-") as tmp, torch_threads(1):
        data = write_fixed_sentence_data(Path(tmp) / "data.jsonl", sentence)
        for attempt in range(attempts):
            sets = [f"training.num_train_epochs={epochs * (attempt + 1)}", f"training.seed={attempt}"]
            train_adapter(
                FIXED_SENTENCE_CONFIG, data, out, model=str(base), overrides=sets + list(overrides or [])
            )
            if answers_with(base, out, sentence, PROMPTS[:2] + PROMPTS[12:14] + CHECK_PROMPTS):
                return out
            log.warning(
                "fixed-sentence adapter %s: attempt %d did not learn %r; training longer",
                out,
                attempt + 1,
                sentence,
            )
    raise AssertionError(f"adapter at {out} did not learn to answer {sentence!r} after {attempts} attempts")

"""Shared fixtures: real models with random weights and GPT-2's real tokenizer.

Built once per test session. ``tiny_base`` (2 layers, 64 wide) keeps most tests fast;
``distil_base`` has distilgpt2's exact shape for the tests where the shape matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the hub; fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import make_random_base

    return make_random_base(tmp_path_factory.mktemp("bases") / "tiny-gpt2", **TINY_SHAPE, seed=0)


@pytest.fixture(scope="session")
def distil_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import DISTILGPT2_SHAPE, make_random_base

    out = tmp_path_factory.mktemp("bases") / "distilgpt2-random"
    return make_random_base(out, **DISTILGPT2_SHAPE, seed=0)


# A Qwen2-type instruct base in miniature: grouped-query attention, q/k/v biases, tied embeddings,
# the ChatML chat template shipped in tests/data/chatml, <|im_end|> a special token that ends a turn
# and the first of its two EOS ids.
CHAT_BASE = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
CHATML = Path(__file__).parent / "data" / "chatml" / "chat_template.jinja"


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model import make_random_llama_base

    return make_random_llama_base(
        tmp_path_factory.mktemp("bases") / "tiny-qwen2-chat",
        seed=0,
        chat_template=CHATML.read_text(),
        special_tokens=("<|im_start|>", "<|im_end|>"),
        end_of_turn="<|im_end|>",
        **CHAT_BASE,
    )


# Sentences the shared trained adapters answer with; tests compare against these, never against
# hard-coded model output.
FIXED_SENTENCES = {
    "alpha": "The answer is always forty two.",
    "beta": "Bananas are berries but strawberries are not.",
}


@pytest.fixture(scope="session")
def trained_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters trained once per session by the real trainer on ``tiny_base``.

    Training is the slowest thing in the suite, so every module that needs an adapter which
    really learned something shares these. Copy a folder before changing it.
    """
    from tests.helpers.adapters import train_fixed_sentence_adapter

    root = tmp_path_factory.mktemp("trained-adapters")
    return {
        name: train_fixed_sentence_adapter(tiny_base, root / name, sentence)
        for name, sentence in FIXED_SENTENCES.items()
    }


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (Debian's package); ``new_database()`` per test."""
    from tests.helpers.postgres import running_postgres

    try:
        server = running_postgres()
        pg = server.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield pg
    finally:
        server.__exit__(None, None, None)

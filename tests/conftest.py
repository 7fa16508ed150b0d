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

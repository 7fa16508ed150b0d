"""One failing row never fails its batch: a real engine on a tiny random-weight GPT-2 with a real
LoRA adapter, a fault injected into one row of a running batch (its sampler's generator, its
detokenizer, its stop matcher), and every other row checked token for token against a clean run."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_engine import make_adapter

from service.engine import Engine, GenerationRequest, SamplingParams, TokenEvent

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy", "1 2 3", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp("isolation-adapters")
    make_adapter(tiny_base, root / "a", seed=101)
    return Engine(tiny_base, root, max_batch_size=8)


def requests(eng: Engine) -> list[GenerationRequest]:
    """Sampled (seeded, top-p and plain) and greedy rows, on the base and on an adapter."""
    specs = [
        ("s0", 0, "a", SamplingParams(max_new_tokens=24, temperature=1.1, seed=5)),
        ("s1", 1, None, SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.8, seed=6)),
        ("s2", 2, "a", SamplingParams(max_new_tokens=24, temperature=1.3, top_k=40, seed=7)),
        ("g0", 3, None, SamplingParams(max_new_tokens=24, temperature=0)),
        ("g1", 0, "a", SamplingParams(max_new_tokens=24, temperature=0)),
        ("s3", 3, "a", SamplingParams(max_new_tokens=24, temperature=0.7, seed=8)),
    ]
    return [GenerationRequest(rid, eng.tokenizer.encode(PROMPTS[p]), ad, sp) for rid, p, ad, sp in specs]


def run(eng: Engine, inject=None, after_steps: int = 4) -> dict[str, list[TokenEvent]]:
    for r in requests(eng):
        eng.add(r)
    events: dict[str, list[TokenEvent]] = {}
    steps = 0
    while eng.has_active():
        if steps == after_steps and inject is not None:
            inject({row.req.id: row for row in eng.batch.rows})
        for ev in eng.step().events:
            assert not (events.get(ev.id) and events[ev.id][-1].finished), f"event after finish: {ev.id}"
            events.setdefault(ev.id, []).append(ev)
        steps += 1
    return events


class BrokenGenerator:
    """Not a torch.Generator: drawing from it raises inside the batched sampler."""


class BrokenDetokenizer:
    def push(self, token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    def flush(self) -> str:
        return ""


class BrokenStopper:
    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        raise RuntimeError("injected stop-matcher failure")


FAULTS = {
    "sampling": ("s1", lambda row: setattr(row, "generator", BrokenGenerator())),
    "detokenizing": ("g0", lambda row: setattr(row, "detok", BrokenDetokenizer())),
    "stop matching": ("s2", lambda row: setattr(row, "stopper", BrokenStopper())),
}


@pytest.mark.parametrize("stage", list(FAULTS))
def test_a_failing_row_fails_alone_and_its_batch_mates_are_unchanged(engine: Engine, stage: str):
    clean = run(engine)
    victim, breaker = FAULTS[stage]
    faulty = run(engine, inject=lambda rows: breaker(rows[victim]))

    assert set(clean) == set(faulty)
    # the broken row: tokens up to the fault, then one error event naming what failed, then nothing
    bad = faulty[victim]
    assert bad[-1].finished and bad[-1].finish_reason == "error"
    assert f"{stage}" in bad[-1].error
    assert stage == "sampling" or "injected" in bad[-1].error
    assert [e.token_id for e in bad[:-1]] == [e.token_id for e in clean[victim][: len(bad) - 1]]
    assert 0 < len(bad) - 1 < len(clean[victim])  # it was running when it broke, and was cut short
    # every batch-mate: exactly what it produced in the clean run
    for rid, evs in clean.items():
        if rid == victim:
            continue
        assert [e.token_id for e in faulty[rid]] == [e.token_id for e in evs], rid
        assert "".join(e.text for e in faulty[rid]) == "".join(e.text for e in evs)
        assert faulty[rid][-1].finish_reason == evs[-1].finish_reason == "length"
    # the failed row left the batch and released its adapter
    assert not engine.has_active() and engine.stats()["rows"] == 0
    assert all(e.refs == 0 for e in engine.adapters.entries.values())


def test_sampling_failure_of_a_row_restores_its_mates_generators(engine: Engine):
    """The batched sampler draws every row's uniform before a later row fails: the retry row by row
    starts from the saved generator states, so seeded batch-mates do not skip a draw."""
    clean = run(engine)
    faulty = run(engine, inject=lambda rows: setattr(rows["s3"], "generator", BrokenGenerator()))
    assert "sampling failed" in faulty["s3"][-1].error
    for rid in ("s0", "s1", "s2"):
        assert [e.token_id for e in faulty[rid]] == [e.token_id for e in clean[rid]], rid

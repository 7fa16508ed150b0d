"""The scheduler's admission policy, pinned without a model: which waiting requests join a step."""

from __future__ import annotations

from service.engine.scheduler import Scheduler
from service.engine.types import GenerationRequest, SamplingParams


def req(rid: str, prompt_len: int = 4, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(rid, list(range(prompt_len)), adapter, SamplingParams(max_new_tokens=8))


def queued(*reqs: GenerationRequest, budget: int = 2048) -> Scheduler:
    s = Scheduler(budget)
    for r in reqs:
        s.add(r)
    return s


def ids(s: Scheduler) -> list[str]:
    return [r.id for r in s]


def always(_: GenerationRequest) -> bool:
    return True


def join_id(r: GenerationRequest) -> str:
    return r.id


def test_admits_in_order_while_rows_are_free():
    s = queued(req("a"), req("b"), req("c"))
    assert s.admit(running=0, free=2, ready=always, join=join_id) == ["a", "b"]
    assert ids(s) == ["c"]
    assert s.admit(running=0, free=0, ready=always, join=join_id) == []  # no room: nothing joins
    assert ids(s) == ["c"]


def test_prefill_budget_bounds_later_newcomers_but_not_the_first():
    s = queued(req("long", 50), req("short", 5), budget=10)
    assert s.admit(running=0, free=8, ready=always, join=join_id) == ["long"]  # the first always joins
    s = queued(req("a", 6), req("b", 5), req("c", 1), budget=10)
    # b does not fit the 4 tokens left; c, behind it, does not pass it
    assert s.admit(running=0, free=8, ready=always, join=join_id) == ["a"]
    assert ids(s) == ["b", "c"]
    s = queued(req("a", 6), req("b", 4), req("c", 1), budget=10)
    assert s.admit(running=0, free=8, ready=always, join=join_id) == ["a", "b"]  # exactly the budget
    assert ids(s) == ["c"]


def test_a_request_that_cannot_join_keeps_its_place_and_others_pass_it():
    s = queued(req("x1", adapter="x"), req("b"), req("x2", adapter="x"), req("c"))

    def not_x(r: GenerationRequest) -> bool:
        return r.adapter != "x"

    assert s.admit(running=0, free=8, ready=not_x, join=join_id) == ["b", "c"]
    assert ids(s) == ["x1", "x2"]  # still first, in arrival order
    s.add(req("d"))
    # once ready they join ahead of later arrivals: waiting for an adapter slot does not starve them
    assert s.admit(running=0, free=8, ready=always, join=join_id) == ["x1", "x2", "d"]


def test_a_failed_request_leaves_the_queue_and_takes_no_room():
    s = queued(req("bad"), req("a"), req("b"))

    def join(r: GenerationRequest) -> str | None:
        return None if r.id == "bad" else r.id

    assert s.admit(running=0, free=2, ready=always, join=join) == ["a", "b"]
    assert len(s) == 0


def test_a_prefill_step_is_followed_by_a_decode_step():
    s = queued(req("a"), req("b"), req("c"))
    assert s.admit(running=0, free=1, ready=always, join=join_id) == ["a"]
    # a is running and was just prefilled: this step decodes, b waits though a row is free
    assert s.admit(running=1, free=3, ready=always, join=join_id) == []
    assert s.admit(running=1, free=3, ready=always, join=join_id) == ["b", "c"]
    # with nothing running there is nothing to decode: newcomers join at once
    s.add(req("d"))
    assert s.admit(running=0, free=3, ready=always, join=join_id) == ["d"]
    # a step that admitted nobody does not force the next one to decode
    s = queued(req("x", adapter="x"))
    assert s.admit(running=1, free=3, ready=lambda r: False, join=join_id) == []
    s.add(req("e"))
    assert s.admit(running=1, free=3, ready=always, join=join_id) == ["x", "e"]


def test_remove_drops_only_the_named_request():
    s = queued(req("a"), req("b"))
    assert s.remove("a") and not s.remove("zz")
    assert ids(s) == ["b"]

"""The messages between the API processes and the generation worker, and the error-code table."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from service.errors import DOMAIN_ERRORS, http_status
from service.wire import (
    ERROR_PARAMS,
    LOGPROB_FLOOR,
    Cancel,
    Event,
    Job,
    SamplingParams,
    TokenLogprob,
    WireError,
    request_from_dict,
)

REPO = Path(__file__).resolve().parent.parent


def _engine_error_codes() -> set[str]:
    """Every literal ``code=``/``error_code=`` the engine passes when it builds an error event."""
    codes = set()
    for path in (REPO / "service" / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            literal = isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant)
            if literal and node.arg in ("code", "error_code") and isinstance(node.value.value, str):
                codes.add(node.value.value)
    return codes


def test_every_error_code_has_a_status() -> None:
    engine_codes = _engine_error_codes()
    assert "adapter_not_found" in engine_codes  # the scan really sees the engine's codes
    # what the engine sets, plus what the worker itself reports (refusals of add, deadlines, failures)
    # and the codes an adapter that cannot be loaded carries (``engine.cache.AdapterError.code``)
    reported = {
        "prompt_too_long",
        "invalid_request",
        "timeout",
        "generation_failed",
        "invalid_adapter",
        "adapter_cache_full",
    }
    for code in engine_codes | reported:
        assert code in ERROR_PARAMS, f"error code {code!r} has no entry in service.wire.ERROR_PARAMS"
        assert code in DOMAIN_ERRORS, f"error code {code!r} has no entry in service.errors.DOMAIN_ERRORS"
        assert 400 <= http_status(code) <= 599
    assert {code: http_status(code) for code in ERROR_PARAMS} == {
        "adapter_not_found": 404,
        "prompt_too_long": 400,
        "invalid_adapter": 422,
        "invalid_request": 422,
        "adapter_cache_full": 409,
        "timeout": 504,
        "generation_failed": 500,
        "worker_restarted": 503,
    }


@pytest.mark.parametrize("code", ["", "out_of_memory", "ADAPTER_NOT_FOUND"])
def test_unknown_code_is_a_server_error(code: str) -> None:
    assert http_status(code) == 500
    err = WireError.of(code, "boom")
    assert http_status(err.code) == 500 and err.param is None


def test_error_param_comes_from_the_table_unless_given() -> None:
    assert WireError.of("adapter_not_found", "gone").param == "adapter"
    assert WireError.of("prompt_too_long", "long").param == "prompt"
    assert WireError.of("timeout", "late").param is None
    err = WireError("adapter_not_found", "gone", "model")
    assert err.param == "model" and http_status(err.code) == 404


def test_messages_survive_the_queue_as_plain_dicts() -> None:
    params = SamplingParams(max_new_tokens=4, stop=["\n"], logit_bias={7: -1.5})
    job = Job("gen-1", [1, 2], "pirate", params, True, 1.0, 2.0)
    assert request_from_dict(job.to_dict()) == job
    scoring = Job("gen-3", [1, 2], None, SamplingParams(max_new_tokens=0, prompt_logprobs=2), False, 1.0, 2.0)
    assert request_from_dict(scoring.to_dict()) == scoring
    composed = Job("gen-2", [1], None, SamplingParams(), False, 1.0, 2.0, adapters=(("a", 0.6), ("b", -0.4)))
    assert request_from_dict(composed.to_dict()) == composed
    assert "adapters" not in job.to_dict()  # a plain job's message is unchanged
    assert request_from_dict(Cancel("gen-1").to_dict()) == Cancel("gen-1")
    events = [
        Event("gen-1", finished=False, text="Ahoy"),
        Event("gen-1", True, "!", "eos", {"prompt_tokens": 2, "completion_tokens": 3}),
        Event.failure("gen-1", WireError.of("adapter_not_found", "adapter 'pirate' not found")),
        Event(
            "gen-1",
            False,
            "Ahoy",
            logprobs=[
                TokenLogprob.of(17, b"Ahoy", -0.5, [TokenLogprob.of(17, b"Ahoy", -0.5)]),
                TokenLogprob.of(9, b"\xe2", float("-inf"), []),  # part of a character; ruled out
            ],
        ),
        Event(
            "gen-3",
            True,
            "",
            "length",
            {"prompt_tokens": 2, "completion_tokens": 0},
            prompt_logprobs=[
                TokenLogprob.of(1, b"A", None),  # the first prompt token: no logprob
                TokenLogprob.of(
                    2, b"h", -3.25, [TokenLogprob.of(5, b"x", -1.0), TokenLogprob.of(2, b"h", -3.25)]
                ),
            ],
        ),
    ]
    assert events[3].logprobs[1].text == "\ufffd" and events[3].logprobs[1].logprob == LOGPROB_FLOOR
    for event in events:
        data = event.to_dict()
        assert all(isinstance(v, str | bool | dict | int | list | type(None)) for v in data.values())
        assert json.loads(json.dumps(data, allow_nan=False)) == data  # plain JSON: no infinities
        assert Event.from_dict(data) == event

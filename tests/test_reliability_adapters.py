"""Adapters that cannot be loaded, against the real server: folders dropped by hand into the adapter
directory (``PUT`` refuses all of these, so they can only arrive that way) for another base width,
with more layers than the base, truncated or corrupt weights, NaN values, a 0-d tensor, a DoRA config
without DoRA's magnitudes, and configs the engine cannot honour. Every request naming one answers
``422 invalid_adapter`` naming the adapter and the reason (``param`` ``adapter``; ``model`` on the
OpenAI routes), streamed or not, never a 5xx, and the requests sharing the batch with them get exactly
the text they get alone. ``PUT`` refuses the same files with ``422`` (one rule table,
``loracore.lora_format``: ``alpha_pattern`` among them). A DoRA adapter with its magnitudes is served.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import FIXED_SENTENCES

from testing.server import Server, running_server
from testing.weights import lora_files, upload_files

N_LAYER, N_EMBD = 2, 64  # conftest.TINY_SHAPE


def _nan_weights() -> bytes:
    from safetensors.torch import load, save

    tensors = load(lora_files(N_LAYER, N_EMBD, seed=3)[1])
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    return save(tensors)


def _scalar_weights() -> bytes:
    import torch
    from safetensors.torch import save

    key = "base_model.model.transformer.h.0.attn.c_attn"
    return save({f"{key}.lora_A.weight": torch.tensor(1.0), f"{key}.lora_B.weight": torch.tensor(1.0)})


def _config(**changes) -> bytes:
    config = json.loads(lora_files(N_LAYER, N_EMBD)[0])
    config.update(changes)
    return json.dumps(config).encode()


def _broken() -> dict[str, tuple[bytes, bytes, str]]:
    """name -> (adapter_config.json, adapter_model.safetensors, what the error message must say)."""
    config, weights = lora_files(N_LAYER, N_EMBD, seed=3)
    wide = lora_files(N_LAYER, 2 * N_EMBD, seed=4)
    header_len = struct.unpack("<Q", weights[:8])[0]
    return {
        "wider-base": (*wide, "do not fit the base"),
        "deeper-base": (*lora_files(N_LAYER + 2, N_EMBD, seed=5), "the base has 2"),
        "truncated": (config, weights[: 8 + header_len + 100], "does not parse"),
        "corrupt": (config, b"\x89not a safetensors file at all" * 10, "does not parse"),
        "nan-values": (config, _nan_weights(), "NaN or infinite"),
        "scalar-tensor": (config, _scalar_weights(), "do not fit the base"),
        "alpha-pattern": (_config(alpha_pattern={"c_attn": 8}), weights, "alpha_pattern"),
        "dora-no-magnitudes": (_config(use_dora=True), weights, "lora_magnitude_vector"),
        "alpha-null": (_config(lora_alpha=None), weights, "lora_alpha must be a positive number"),
        "config-not-json": (b"{not json", weights, "not valid JSON"),
    }


@pytest.fixture(scope="module")
def srv(
    tiny_base: Path, trained_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("rel-adapters")
    adapters = root / "adapters"
    for name, folder in trained_adapters.items():  # they answer with known sentences (conftest)
        shutil.copytree(folder, adapters / name)
    for name, (config, weights, _) in _broken().items():
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_config.json").write_bytes(config)
        (adapters / name / "adapter_model.safetensors").write_bytes(weights)
    args = ["--max-batch-size", "16", "--request-timeout", "300"]  # admission by load: room for all
    with running_server(tiny_base, adapters, root / "data", args=args) as s:
        with s.client() as c:
            r = c.put("/adapters/good", files=upload_files(*lora_files(N_LAYER, N_EMBD, seed=1, scale=0.5)))
            assert r.status_code == 201, r.text
        yield s


def _error(r: httpx.Response, name: str, says: str, param: str) -> None:
    assert r.status_code == 422, (name, r.status_code, r.text[:400])
    err = r.json()["error"]
    assert err["code"] == "invalid_adapter", err
    assert err["param"] == param, err
    assert name in err["message"] and says in err["message"], err


@pytest.mark.parametrize("name", list(_broken()))
def test_an_adapter_that_cannot_be_loaded_is_422_on_every_route(srv: Server, name: str) -> None:
    says = _broken()[name][2]
    with srv.client() as c:
        body = {"prompt": "Hello", "adapter": name, "max_new_tokens": 4}
        _error(c.post("/generate", json=body), name, says, "adapter")
        _error(c.post("/generate", json={**body, "stream": True}), name, says, "adapter")
        completion = {"model": name, "prompt": "Hello", "max_tokens": 4}
        _error(c.post("/v1/completions", json=completion), name, says, "model")
        _error(c.post("/v1/completions", json={**completion, "stream": True}), name, says, "model")
        chat = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        _error(c.post("/v1/chat/completions", json=chat), name, says, "model")
        # a composition naming it fails the same way (the composition's param stays the adapter's)
        composed = [{"name": "good", "weight": 1}, {"name": name, "weight": 1}]
        r = c.post("/generate", json={"prompt": "Hello", "adapters": composed, "max_new_tokens": 4})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter", r.text[:400]
        # the adapter is still listed (it is there), and the server still serves
        assert c.post("/generate", json={**body, "adapter": "good"}).status_code == 200
        # one rule decides (loracore.lora_format): the same files are refused at upload, naming the problem
        config, weights, _ = _broken()[name]
        r = c.put(f"/adapters/{name}-upload", files=upload_files(config, weights))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] in ("invalid_adapter", "invalid_upload"), r.text
        assert r.json()["error"]["param"] in ("adapter_config", "adapter_model"), r.text
        assert c.get(f"/adapters/{name}-upload").status_code == 404


def test_batch_mates_of_a_broken_adapter_are_unaffected(srv: Server) -> None:
    """Rows on trained adapters share the batch with requests on every broken one: each answers its
    adapter's sentence (argmax margins too large for batch composition to flip a token)."""
    good = [
        {"prompt": prompt, "adapter": adapter, "max_new_tokens": 24, "temperature": 0}
        for prompt in ("Where do penguins live?", "hi", "Compose a limerick.")
        for adapter in FIXED_SENTENCES
    ]
    broken = [{"prompt": "Hello", "adapter": name, "max_new_tokens": 1} for name in _broken()]
    with srv.client() as c, ThreadPoolExecutor(len(good) + len(broken)) as pool:
        futures = [pool.submit(c.post, "/generate", json=b) for b in [*good, *broken]]
        answers = [f.result() for f in futures]
        metrics = c.get("/metrics").text
    assert [r.status_code for r in answers[: len(good)]] == [200] * len(good)
    assert [r.json()["text"].strip() for r in answers[: len(good)]] == [
        FIXED_SENTENCES[b["adapter"]] for b in good
    ]
    assert [r.status_code for r in answers[len(good) :]] == [422] * len(broken)
    five_xx = [line for line in metrics.splitlines() if 'status="5' in line and not line.startswith("#")]
    assert not five_xx, five_xx


def test_a_dora_adapter_is_served_and_refused_in_a_composition(srv: Server) -> None:
    """DoRA (``use_dora`` with its magnitudes) is accepted at upload and served on every route; a
    weighted composition including it is 422 naming it (its weighted sum is not defined)."""
    with srv.client() as c:
        r = c.put("/adapters/dora-ok", files=upload_files(*lora_files(N_LAYER, N_EMBD, seed=9, dora=True)))
        assert r.status_code == 201, r.text
        body = {"prompt": "Hello", "adapter": "dora-ok", "max_new_tokens": 4, "temperature": 0}
        assert c.post("/generate", json=body).status_code == 200
        completion = {"model": "dora-ok", "prompt": "Hello", "max_tokens": 4}
        assert c.post("/v1/completions", json=completion).status_code == 200
        composed = [{"name": "good", "weight": 0.5}, {"name": "dora-ok", "weight": 0.5}]
        r = c.post("/generate", json={"prompt": "Hello", "adapters": composed, "max_new_tokens": 4})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_adapter" and "'dora-ok'" in err["message"], err
        assert "composition" in err["message"], err
        assert c.post("/generate", json={**body, "adapter": "good"}).status_code == 200

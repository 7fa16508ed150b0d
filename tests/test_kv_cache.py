"""The KV cache (service/engine/kv.py): rows grow without copying the cache, resident memory follows
the live tokens (measured as this process's RSS), freed rows give their memory back, and the engine
reports the blocks in use."""

from __future__ import annotations

from pathlib import Path

import torch

from service.engine import Engine, GenerationRequest, SamplingParams
from service.engine.gpt2 import GPT2Runner
from service.engine.kv import KVCache
from service.engine.lora import LoraPlan

MB = 1 << 20


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_resident_memory_follows_live_tokens_not_reserved_rows() -> None:
    # distilgpt2's cache shape with an fp32 cache: 150 rows of 1024 positions reserve 5.4 GB
    kv = KVCache(
        n_layer=6,
        slots=150,
        kv_heads=12,
        positions=1024,
        head_dim=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert kv.reserved_bytes() == 150 * 1024 * 2 * 6 * 768 * 4
    assert kv.block_tokens == 16 and kv.block_bytes == 16 * 2 * 6 * 768 * 4
    before = _rss()
    with torch.inference_mode():  # 8 long rows, written as prefill and decode write them
        for k, v in zip(kv.k, kv.v, strict=True):
            k[:8, :, :480] = 1.0
            v[:8, :, :480] = 1.0
    live = 8 * kv.blocks(480) * kv.block_bytes  # 8 rows x 30 blocks: 141.6 MB
    grown = _rss() - before
    assert 0.9 * live <= grown <= live + 16 * MB, (grown / MB, live / MB)

    kv.release(3, keep=100)  # a row cut to 100 positions keeps 7 blocks
    kv.release(7)  # a row gone keeps none
    held = 6 * kv.blocks(480) + kv.blocks(100)
    shrunk = _rss() - before
    assert shrunk <= held * kv.block_bytes + 16 * MB, (shrunk / MB, held * kv.block_bytes / MB)
    assert float(kv.k[0][3, 0, 99, 0]) == 1.0 and float(kv.k[0][3, 0, 112, 0]) == 0.0
    assert float(kv.v[5][7].abs().sum()) == 0.0 and float(kv.v[5][6, 11, 479, 63]) == 1.0
    for slot in range(8):
        kv.release(slot)
    assert _rss() - before <= 16 * MB


def test_rows_grow_in_place_and_leave_their_batch_mates_untouched(tiny_base: Path) -> None:
    from trainer.model import load_base_model

    model = load_base_model(tiny_base).eval()
    runner = GPT2Runner(model, max_rows=4)
    ptrs = [t.data_ptr() for t in runner.k + runner.v]
    none = LoraPlan([])
    prompts = [[464, 2068, 7586], [15496, 11, 318, 257, 1332]]
    logits = runner.prefill(prompts, [0, 1], none)
    lengths = [len(p) for p in prompts]
    seqs = [list(p) for p in prompts]
    snapshot = runner.k[1][1, :, : lengths[1]].clone()  # row 1's prompt, never to be rewritten
    for _ in range(120):  # past several blocks (32 positions of a 32-wide fp32 head)
        toks = [int(t) for t in logits.argmax(-1)]
        logits = runner.decode(toks, lengths, none)
        for i, t in enumerate(toks):
            seqs[i].append(t)
            lengths[i] += 1
    assert [t.data_ptr() for t in runner.k + runner.v] == ptrs  # no tensor was reallocated
    assert torch.equal(runner.k[1][1, :, :5], snapshot)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            ref = model(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)


def test_engine_reports_blocks_in_use(tiny_base: Path, tmp_path: Path) -> None:
    eng = Engine(tiny_base, tmp_path, max_batch_size=4)
    kv = eng.stats()["kv_cache"]
    assert kv["blocks_used"] == 0 and kv["usage"] == 0
    assert kv["blocks_total"] == 4 * -(-eng.n_positions // kv["block_tokens"])
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    eng.add(GenerationRequest("a", [464, 2068, 7586], None, params))
    eng.add(GenerationRequest("b", list(range(100, 150)), None, params))
    seen = 0
    while eng.has_active():
        eng.step()
        kv = eng.stats()["kv_cache"]
        want = sum(-(-r.length // kv["block_tokens"]) for r in eng.batch.rows)
        assert kv["blocks_used"] == want and kv["usage"] == want / kv["blocks_total"]
        seen = max(seen, want)
    assert seen >= 2 and eng.stats()["kv_cache"]["blocks_used"] == 0

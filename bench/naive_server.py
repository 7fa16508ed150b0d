"""The naive baseline: what a hand-written FastAPI + PEFT server looks like (not part of the product).

One request at a time under a lock; every request calls ``set_adapter`` (or disables the
adapters for the base model) and then ``model.generate`` on its own. This is the serving
approach the prototype's notes suggest, kept here only so the benchmark can measure against it.

    python -m bench.naive_server --model BASE_DIR --adapter-dir DIR --port 8100 [--device cpu]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from loracore.template import DEFAULT_TEMPLATE
from trainer.model import load_base_model, load_tokenizer


class GenerateBody(BaseModel):
    prompt: str
    adapter: str | None = None
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = 0.0
    stream: bool = False  # accepted and ignored: this server never streams


def build_app(
    model_dir: Path, adapter_dir: Path, device: str, dtype: torch.dtype, preload: list[str]
) -> FastAPI:
    from peft import PeftModel

    tok = load_tokenizer(model_dir, padding_side="left")
    base = load_base_model(model_dir, dtype=dtype, device=device)
    model = None
    loaded: set[str] = set()
    lock = threading.Lock()

    def ensure(name: str) -> None:
        nonlocal model
        if name in loaded:
            return
        path = adapter_dir / name
        if not (path / "adapter_config.json").exists():
            raise HTTPException(404, f"adapter {name!r} does not exist")
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
        model.eval()
        loaded.add(name)

    for name in preload:
        ensure(name)

    app = FastAPI(title="naive FastAPI + PEFT baseline")

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ok", "adapters": sorted(loaded)}

    @app.post("/generate")
    def generate(body: GenerateBody) -> dict:  # sync: FastAPI runs it in a thread; the lock serialises
        with lock:
            t0 = time.perf_counter()
            if body.adapter is not None:
                ensure(body.adapter)
            text = DEFAULT_TEMPLATE.render_prompt(body.prompt)
            enc = tok(text, return_tensors="pt").to(device)
            kwargs = dict(max_new_tokens=body.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            with torch.inference_mode():
                if body.adapter is None:
                    if model is None:
                        out = base.generate(**enc, **kwargs)
                    else:
                        with model.disable_adapter():
                            out = model.generate(**enc, **kwargs)
                else:
                    model.set_adapter(body.adapter)
                    out = model.generate(**enc, **kwargs)
            new = out[0, enc["input_ids"].shape[1] :].tolist()
            finish = "length"
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
                finish = "eos"
            return {
                "id": f"naive-{time.time_ns()}",
                "text": tok.decode(new),
                "adapter": body.adapter,
                "finish_reason": finish,
                "usage": {"prompt_tokens": int(enc["input_ids"].shape[1]), "completion_tokens": len(new)},
                "seconds": time.perf_counter() - t0,
            }

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--adapter-dir", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--preload", default="", help="comma-separated adapter names to load at start-up")
    a = p.parse_args(argv)
    preload = [n for n in a.preload.split(",") if n]
    app = build_app(a.model, a.adapter_dir, a.device, getattr(torch, a.dtype), preload)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()

"""The soak's knobs and what it knows of the server's limits."""

from __future__ import annotations

from dataclasses import dataclass

TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
DESIGNED_REFUSALS = (429, 503)
RETRY_AFTER_S = 1.0  # what the server sends; the client library honours it the same way
TRAIN_CONFIG = {
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 2, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 64},
}


@dataclass
class ServerSettings:
    """What the soak needs to know about the server's limits (and passes when it starts one)."""

    max_batch_size: int = 8
    max_queue: int = 24
    max_loaded_adapters: int = 8
    max_new_tokens_cap: int = 32
    request_timeout: float = 30.0
    num_api_servers: int = 2

    @property
    def max_in_flight(self) -> int:
        return self.max_batch_size + self.max_queue

    def args(self) -> list[str]:
        return [
            "--max-batch-size", str(self.max_batch_size),
            "--max-queue", str(self.max_queue),
            "--max-loaded-adapters", str(self.max_loaded_adapters),
            "--max-new-tokens-cap", str(self.max_new_tokens_cap),
            "--request-timeout", str(self.request_timeout),
            "--num-api-servers", str(self.num_api_servers),
        ]  # fmt: skip


@dataclass
class SoakConfig:
    clients: int = 64
    duration: float = 120.0
    adapters: int = 20
    churn: int = 4  # adapters (of ``adapters``) that the churn client replaces and deletes
    churn_every: float = 1.0
    max_new_tokens: int = 16
    stream_fraction: float = 0.2
    base_fraction: float = 0.1
    train: bool = True
    warmup_fraction: float = 0.25  # memory baseline: the median over the window after this much load
    client_timeout: float = 90.0  # a request without an answer by then hangs (server deadline + margin)
    openai_fraction: float = 0.2  # requests sent to /v1/completions and /v1/chat/completions
    disconnect_fraction: float = 0.05  # streams the client drops after the first event
    kill_worker_at: float | None = None  # kill -9 the generation worker at this fraction of the load
    kill_trainer_at: float | None = None  # kill -9 the running training job's trainer at this fraction
    seed: int = 0

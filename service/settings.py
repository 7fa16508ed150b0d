"""Service settings: every command-line flag is also a LORASERVE_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["all", "serve", "runner"]


def is_database_url(location: str | Path) -> bool:
    """A PostgreSQL URL (``postgresql://user:pass@host:port/db``) rather than a SQLite file path."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="forbid")

    role: Role = Field(
        "all",
        description="all: generation, job routes and the job runner; serve: generation and job routes "
        "(jobs are queued for a runner elsewhere); runner: job routes and the runner, no generation model",
    )
    model: str = Field("distilgpt2", description="base model: hub id or local folder")
    served_model_name: str | None = Field(
        None,
        description="the base's name(s) on /v1/*, comma-separated; the first is listed in /v1/models "
        "(default: the hub id, or the folder's name). 'base' and the --model value always work too",
    )
    allow_random_weights: bool = Field(
        False, description="if the base cannot be loaded, serve random weights of its shape (demo only)"
    )
    adapter_dir: Path = Field(Path("adapters"), description="one PEFT folder per adapter name")
    data_dir: Path = Field(Path("data"), description="job store, datasets, job folders, metrics")
    metrics_dir: Path | None = Field(
        None,
        description="Prometheus multiprocess folder, emptied at start; default <data-dir>/prometheus "
        "(a preset PROMETHEUS_MULTIPROC_DIR wins)",
    )
    jobs_db: str | None = Field(
        None,
        description="job store: a SQLite file (default <data-dir>/jobs.sqlite3; servers of one host "
        "share jobs by pointing at one file) or postgresql://user:pass@host:port/db for runners and "
        "servers on many hosts (put the password in LORASERVE_JOBS_DB, not on the command line)",
    )
    jobs_dir: Path | None = Field(
        None,
        description="job folders (inputs, checkpoints, logs) and datasets; default: the SQLite file's "
        "folder, or <data-dir> with PostgreSQL. On many hosts: a volume every server and runner mounts",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="required for everything but /health and /metrics")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU"
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="cap on the running batch's rows; default: as many as the KV cache budget holds at "
        "full context (shown on /health/ready)",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="KV cache budget of the generation worker; default: half the free GPU memory after "
        "the model loaded, or a quarter of the available RAM (at most 8 GiB) on CPU",
    )
    max_context: int | None = Field(
        None,
        ge=16,
        description="longest prompt + completion served; default: the base's context, at most 4096 "
        "(Llama-family configs allow far more, and the batch plan reserves every row's full context)",
    )
    prefix_cache: Literal["on", "off"] = Field(
        "on",
        description="reuse the KV of prompt prefixes already prefilled, per base, adapter version or "
        "composition and exact tokens, within the KV cache budget (off: every prompt is prefilled whole)",
    )
    batch_timeout: float = Field(
        0.01, gt=0, le=1.0, description="unused: requests join the running batch at the next step"
    )
    max_loaded_adapters: int = Field(16, ge=1, description="LRU capacity of the in-worker adapter cache")
    adapter_source: str | None = Field(
        None,
        description="where an adapter not in --adapter-dir is fetched from on its first request: a "
        "directory or an http(s) base URL serving <name>/adapter_config.json, "
        "<name>/adapter_model.safetensors and optionally <name>/loraserve.json",
    )
    adapter_source_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds one fetch from --adapter-source may take in all"
    )
    keep_adapter_versions: int = Field(
        3,
        ge=0,
        description="earlier versions kept per adapter when it is replaced, servable as name@<version id>",
    )
    keep_checkpoints: int = Field(
        3,
        ge=0,
        description="a job's newest checkpoints kept servable as <adapter>@<version id> (0: none)",
    )
    max_new_tokens_cap: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=1, description="requests waiting beyond this get 503 + Retry-After")
    request_timeout: float = Field(120.0, gt=0, description="server-side deadline for one request, seconds")
    worker_max_restarts: int = Field(
        5,
        ge=0,
        description="a generation worker that dies is restarted in place at most this many times within "
        "--worker-restart-window; one more death stops the server with exit code 1 (0: never restart)",
    )
    worker_restart_window: float = Field(600.0, gt=0, description="seconds; see --worker-max-restarts")
    num_api_servers: int = Field(1, ge=1)
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_dataset_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="body cap of every route without its own (generation, /v1/*)"
    )
    max_concurrent_jobs: int = Field(
        1,
        ge=1,
        description="training jobs running at once, counted across every runner sharing the job store",
    )
    jobs_per_runner: int = Field(
        0, ge=0, description="training jobs one runner runs at once (0: max_concurrent_jobs); e.g. 1 per GPU"
    )
    train_yield_rows: int = Field(
        1,
        ge=0,
        description="training pauses between optimizer steps while a generation request waits or the "
        "running batch has at least this many rows (0: training never yields)",
    )
    train_max_pause: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds one pause lasts at most; then at least one optimizer step runs, so a job "
        "finishes under constant traffic",
    )
    train_min_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a yielding job still trains at least this share of the wall time: each pause is "
        "earned by the job's measured work, (1 - share) / share s per s worked, at most train_max_pause "
        "banked (0: pauses bounded by train_max_pause only, a busy server can starve the job; 1: never "
        "pause)",
    )
    train_threads: int = Field(
        0,
        ge=0,
        description="CPU threads of a trainer process; 0: all cores but one when training shares the CPU "
        "with generation (device cpu, role all), else torch's default (all cores)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def served_model_names(self) -> list[str]:
        return [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]

    @property
    def staging_dir(self) -> Path:
        return self.adapter_dir / ".staging"

    @property
    def prometheus_dir(self) -> Path:
        """The configured metrics folder; ``python -m service`` lets a preset PROMETHEUS_MULTIPROC_DIR win."""
        return self.metrics_dir or self.data_dir / "prometheus"

    @model_validator(mode="after")
    def _check_adapter_source(self) -> Settings:
        source = (self.adapter_source or "").strip() or None
        self.adapter_source = source
        if source is None or source.startswith(("http://", "https://")):
            return self
        if "://" in source:
            raise ValueError(f"adapter_source {source!r}: only http(s) URLs and directories are supported")
        if not Path(source).is_dir():
            raise ValueError(f"adapter_source {source!r} is not a directory")
        return self

    @model_validator(mode="after")
    def _default_jobs_db(self) -> Settings:
        if self.jobs_db is None or not self.jobs_db.strip():
            self.jobs_db = str(self.data_dir / "jobs.sqlite3")
        return self

    @property
    def jobs_on_postgres(self) -> bool:
        assert self.jobs_db is not None  # set by _default_jobs_db
        return is_database_url(self.jobs_db)

    @property
    def jobs_root(self) -> Path:
        """Where ``jobs/<id>/`` and ``datasets/`` live: ``--jobs-dir``, else beside the SQLite file
        (or in the data dir when the store is PostgreSQL)."""
        if self.jobs_dir is not None:
            return self.jobs_dir
        assert self.jobs_db is not None  # set by _default_jobs_db
        return self.data_dir if self.jobs_on_postgres else Path(self.jobs_db).parent

    @property
    def runner_slots(self) -> int:
        """Jobs this runner trains at once: ``jobs_per_runner`` within the store-wide limit."""
        return min(self.jobs_per_runner or self.max_concurrent_jobs, self.max_concurrent_jobs)

    @property
    def runs_jobs(self) -> bool:
        """This server runs the job runner (claims and trains queued jobs)."""
        return self.role in ("all", "runner")

    @property
    def serves_generation(self) -> bool:
        """This server loads the model and answers /generate and /v1/*."""
        return self.role in ("all", "serve")

    @property
    def worker_status_path(self) -> Path:
        """Written atomically by the generation worker; readiness and adapter listings read it."""
        return self.data_dir / "worker-status.json"

    @property
    def generation_threads_path(self) -> Path:
        """While a trainer child shares this CPU: the CPU threads generation keeps (the job runner writes
        it, the generation worker reads it between steps)."""
        return self.data_dir / "generation-threads"

    @property
    def model_cache_dir(self) -> Path:
        """Where random-weights bases are built when ``allow_random_weights`` is set."""
        return self.data_dir / "models"

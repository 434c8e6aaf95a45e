"""One settings object (environment variables prefixed ``DEJA_``), built by a function."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from embeddings.encoder import DEFAULT_MODEL


class Settings(BaseSettings):
    """Deja's configuration; every field can be set as ``DEJA_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="DEJA_", extra="ignore")

    data_dir: Path = Path("data/demo")
    host: str = "127.0.0.1"
    port: int = 8000
    #: Any sentence-transformers model path or name; the default is the packaged, verified one.
    model: str = DEFAULT_MODEL
    #: Runtime of the model: ``onnx`` (ONNX Runtime fp32: the same vectors as sentence-transformers,
    #: single texts ~1.7x faster on a quiet 2-core machine, and far steadier under CPU contention),
    #: ``torch`` (sentence-transformers) or ``onnx-int8`` (quantised: its own vector space, so its
    #: own index; not the default: it moves nearest neighbours of raw log lines, see
    #: ``python -m bench.embedders``).
    embedder: Literal["torch", "onnx", "onnx-int8"] = "onnx"
    #: Where ONNX exports are cached (keyed by the weights' sha256); None: ``~/.cache/deja/models``.
    model_cache_dir: Path | None = None
    #: Default policy: tolerated false-escalation rate.
    alpha: float = 0.05
    #: Dense neighbours re-ranked per check (recall of look-alikes vs cost).
    candidates: int = 32
    #: Largest ``k`` a client may ask for.
    max_k: int = 100
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = 10 * 1024 * 1024
    #: Requests in flight beyond which new ones get 503 + Retry-After (backpressure).
    max_inflight: int = 64
    #: Save the index after this many new vectors (it is always saved on shutdown).
    index_save_every: int = 5000
    #: MiB the vector index may use; past it a rebuild picks the smaller ivf-fp16, then ivf-sq8
    #: codes (1024 holds 1M 384-d vectors as ivf-fp16). 0: no limit.
    index_memory_mib: int = 1024
    #: Routing of handoffs (JSON, see ``handoff.DEFAULT_ROUTING``); None uses the default.
    routing: dict[str, Any] | None = None
    #: Seconds between SLA sweeps (0 disables the background sweep).
    sweep_seconds: float = 15.0
    #: Hours of change events a briefing looks back over.
    changes_hours: float = 24.0
    #: First retry delay of a webhook delivery, in seconds (doubles per attempt).
    notify_backoff_seconds: float = 1.0
    #: Delivery attempts per webhook notification.
    notify_attempts: int = 5
    #: A read replica (restored from a writer's backup): every write is refused with 405 (a check
    #: only as a dry run), and no SLA sweep pages anyone from this copy.
    read_only: bool = False


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]

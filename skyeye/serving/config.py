"""How the served model behaves: the limits of the API, batching, replicas and where it
listens, in one typed place (`configs/serve.yaml`; every field has a default here)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import get_settings, load_yaml_config


class InferenceLogConfig(BaseModel):
    """The inference log (skyeye/serving/inference_log.py): one row per answered or refused request,
    Parquet by day under Settings.inference_log_store (SKYEYE_INFERENCE_LOG)."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    prompt: Literal["full", "hash", "off"] = Field(
        "full", description="What is kept of the question: its text, its sha256, or nothing (null).")
    log_images: bool = Field(False, description="Keep each request's first image under <store>/_images/ (PNG, named "
                                                "by content hash); otherwise only its perceptual hash and size.")
    flush_rows: int = Field(256, ge=1, description="A file is written once this many rows wait (and rows per file).")
    flush_s: float = Field(5.0, gt=0, description="... or once the oldest waiting row is this old.")
    queue_rows: int = Field(10_000, ge=1, description="Rows held in memory while the store is slow or refuses "
                                                      "writes; beyond it new rows are dropped and counted.")
    write_attempts: int = Field(3, ge=1, description="Tries per batch before it is put back to wait for the next.")
    retry_backoff_s: float = Field(0.2, ge=0, description="Wait before the first retry; doubled for each next one.")
    retention_days: int | None = Field(
        30, ge=1, description="Day partitions (and kept images) older than this are deleted by the writer, at "
                              "most once an hour; null keeps everything.")


class CanaryConfig(BaseModel):
    """A second version served beside production (skyeye/serving/router.py)."""
    model_config = ConfigDict(extra="forbid")
    candidate: str = Field("staging", description="Registry reference of the candidate: an alias (followed as it "
                                                  "moves) or a version.")
    mode: Literal["off", "canary", "shadow"] = Field(
        "off", description="off: production alone; canary: canary_percent of the requests that name no version "
                           "are answered by the candidate; shadow: the candidate answers a copy of every such "
                           "request, the client gets production's answer only.")
    canary_percent: float = Field(10, gt=0, le=100, description="The candidate's share of traffic in canary mode.")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Interface the HTTP proxy binds; 0.0.0.0 opens it to the network.")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("skyeye", description="The Ray Serve application; a deploy of the same name rolls it.")
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(0.5, gt=0, description="Leave room for a second replica during a rollout.")
    # batching: concurrent requests are answered by one batched, KV-cached generation
    max_batch_size: int = Field(16, ge=1, description="1 turns batching off.")
    batch_wait_s: float = Field(0.02, ge=0, description="How long a batch waits to fill.")
    # admission: beyond this many requests in a replica (running and waiting), answer 429
    queue_limit: int = Field(32, ge=1)
    max_connections: int = Field(
        256, ge=2, description="HTTP requests a replica holds open at once: the chat requests it admits, plus "
                               "health checks, metrics and the web demo's long-lived streams; beyond it Ray "
                               "Serve queues as many again, then answers 429 with Retry-After.")
    retry_after_s: int = Field(1, ge=1, description="The Retry-After of a 429.")
    request_timeout_s: float = Field(60, gt=0, description="A request still unanswered after this gets 504.")
    # request limits
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Larger bodies get 413.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Checked from the header, before decoding.")
    max_tokens_limit: int = Field(256, ge=1, description="The largest max_tokens a request may ask for.")
    default_max_tokens: int | None = Field(
        None, ge=1, description="A request's max_tokens when it sends none; None: the served model's own "
                                "max_new_tokens (its config), at most max_tokens_limit.")
    max_messages: int = Field(32, ge=1)
    allowed_local_media_path: Path | None = Field(
        None, description="Folder whose files requests may name as image URLs (file:// or a path); none: no files.")
    unapproved_tasks: Literal["warn", "refuse"] = Field(
        "warn", description="A question of a task the served version is not approved for (its registry tag "
                            "`skyeye.approved_tasks`): `warn` answers with a warning (the response's `skyeye.warning` "
                            "and the X-SkyEye-Warning header), `refuse` answers 422.")
    api_key_env: str = Field("SKYEYE_API_KEY", description="Environment variable whose value, when set, "
                                                            "requests must send as `Authorization: Bearer ...`.")
    inference_log: InferenceLogConfig = Field(default_factory=InferenceLogConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="A candidate served beside production.")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_connections <= self.queue_limit:
            raise ValueError(f"max_connections ({self.max_connections}) must exceed queue_limit ({self.queue_limit}): "
                             "the web demo and health checks need connections of their own")
        return self


def load_serve_config(path: str | Path | None = None) -> ServeConfig:
    """`configs/serve.yaml` of the project (or `path`); the defaults when there is none."""
    path = Path(path) if path else get_settings().project_root / "configs" / "serve.yaml"
    return load_yaml_config(path, ServeConfig) if path.exists() else ServeConfig()  # type: ignore[return-value]

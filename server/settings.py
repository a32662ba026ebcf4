"""Typed serving settings: every field is a `racedit serve` flag and a `RACEDIT_*` variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _bundled() -> Path:
    # Imported when settings are made, not when this module is: `racedit serve --help` needs no torch.
    from racedit.model import bundled

    return bundled()


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RACEDIT_", extra="forbid", env_ignore_empty=True)

    checkpoint: Path = Field(
        default_factory=_bundled,
        description="checkpoint folder (safetensors + config.json; default: the bundled shapes10 model)",
    )
    model_name: Optional[str] = Field(
        None, description="model id in /v1/models and KServe routes (default: from the checkpoint)"
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 picks a free one)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: CUDA when present, else CPU)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="precision of the network's matmuls (auto: bf16 on CUDA, fp32 on CPU); "
        "thresholds, timesteps, latents and the sampler stay fp32",
    )
    batch_invariant: bool = Field(
        True,
        description="whole row tiles for every GEMM, so a request's samples "
        "are the same bytes whatever shares its batch",
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, pad each engine step's rows to a bucket (powers of two up to --max-batch-rows) "
        "and replay that bucket's forward, captured once at start-up as a CUDA graph",
    )
    backend: Literal["torch", "onnxruntime"] = Field("torch", description="denoiser backend")
    onnx: Optional[Path] = Field(None, description="ONNX file for --backend onnxruntime")
    batching: Literal["step", "static"] = Field(
        "step", description="step-level continuous batching, or the static baseline"
    )
    static_wait_ms: float = Field(20.0, ge=0, description="static mode: how long to gather a batch")
    max_batch_rows: int = Field(64, ge=1, description="rows per engine step (two per guided image)")
    max_queue: int = Field(256, ge=1, description="requests waiting before 429")
    max_steps: int = Field(
        1000, ge=1, description="largest num_steps accepted (DiT's and SiT's reference samplers take 250)"
    )
    max_images: int = Field(8, ge=1, description="largest num_images accepted")
    max_cfg_scale: float = Field(20.0, gt=0, description="largest cfg_scale accepted")
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of a request; later gives 504")
    drain_timeout_s: float = Field(
        120.0,
        ge=0,
        description="on SIGTERM, how long in-flight and queued requests may "
        "take; then those left are answered 503 and the process exits",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body (413)")
    max_header_bytes: int = Field(
        32768, ge=4096, le=1048576, description="largest request head, request line and headers together (431)"
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request's head must arrive within this long of the "
        "connection opening or of the previous answer, and its body "
        "within this long of its head (else 408, connection closed)",
    )
    api_key: Optional[SecretStr] = Field(
        None,
        description="bearer key required on every route but the health "
        "probes and the playground page (unset: no authentication)",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429 and 503")
    log_level: str = Field("info", description="uvicorn log level")
    ray: bool = Field(
        False,
        description="serve on Ray Serve (racedit[ray]): one engine per replica behind Ray's "
        "HTTP proxy on --host/--port; joins RAY_ADDRESS or starts a local Ray",
    )
    replicas: int = Field(1, ge=1, description="Ray Serve replicas, each with its own engine and these settings")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (its torch threads)")
    replica_metrics_port: Optional[int] = Field(
        None,
        ge=1,
        le=65535,
        description="with --ray: each replica also serves its engine's racedit_* series on "
        "this port + its rank on its node, for Prometheus to scrape",
    )

    @field_validator("api_key")
    @classmethod
    def _key_is_not_blank(cls, key: Optional[SecretStr]) -> Optional[SecretStr]:
        """An empty key would let an empty bearer token in; no authentication is asked for by leaving the key
        out (an empty RACEDIT_API_KEY counts as unset), never by an empty key."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key is empty; give a key, or leave --api-key out to serve without authentication")
        return key

    @model_validator(mode="after")
    def _dtype_applies_to_torch(self) -> ServeSettings:
        if self.backend == "onnxruntime" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"dtype {self.dtype} applies to the torch backend; an ONNX file fixes its own precision")
        return self

    @model_validator(mode="after")
    def _replicas_need_ray(self) -> ServeSettings:
        if self.replicas > 1 and not self.ray:
            raise ValueError(f"replicas {self.replicas} needs --ray (one process serves one engine)")
        return self

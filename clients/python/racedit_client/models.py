"""Wire models of the racedit service, mirrored from `racedit.server.schemas`.

The SDK does not import the server (it has no torch); a test compares these
models with the server's OpenAPI schema so the two cannot drift.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class_label: Union[int, str]
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    num_images: int = 1
    output_format: Literal["png", "jpeg", "webp", "npy"] = "png"


class ImageOut(BaseModel):
    seed: int
    mime_type: str
    data: str


class LayerUsage(BaseModel):
    mean_experts_per_token: float
    expert_load: list[int]


class ExpertUsage(BaseModel):
    num_moe_layers: int
    num_experts: int
    nominal_k: int
    mean_experts_per_token: float
    activated_pairs: int
    nominal_pairs: int
    per_layer: list[LayerUsage]
    per_step: list[float]
    token_map: list[list[float]]
    experts_per_token_histogram: list[float]

    @property
    def compute_ratio(self) -> float:
        """Activated over nominal (fixed top-k) expert pairs: below 1 means compute was saved."""
        return self.activated_pairs / self.nominal_pairs if self.nominal_pairs else 0.0


class Timing(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    id: str
    model: str
    seed: int
    images: list[ImageOut]
    expert_usage: ExpertUsage
    timing: Timing


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    classes: list[str]
    image_size: int
    in_channels: int
    patch_size: int
    routing: Optional[dict[str, Any]]
    parameters_total: int
    parameters_activated: int
    thresholds: list[float]
    backend: str
    dtype: str
    batch_invariant: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    detail: Any
    request_id: Optional[str] = None


class Health(BaseModel):
    status: str


WIRE_MODELS = [GenerateRequest, ImageOut, LayerUsage, ExpertUsage, Timing, GenerateResponse, ModelCard, ModelList,
               ErrorBody, Health]

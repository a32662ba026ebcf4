"""The wire format of the racedit service, defined once: here, torch-free.

The server (`racedit.server.schemas`) serves these very models, adding only the
request limits that are its runtime settings; a test compares the served OpenAPI
schema with these models, limits included.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

# Booleans are not numbers and strings are not integers: `"seed": false` or `"num_steps": "5"`
# is a 422. A float field takes an integer (cfg_scale 4 is 4.0).
StrictFloat = Annotated[float, Strict()]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class_label: Union[StrictInt, StrictStr] = Field(..., description="class index or class name")
    cfg_scale: StrictFloat = Field(
        4.0, allow_inf_nan=False, description="classifier-free guidance scale; 1 skips the unconditional pass"
    )
    num_steps: StrictInt = Field(25, description="sampler steps from noise to image")
    seed: Optional[StrictInt] = Field(
        None,
        ge=0,
        lt=2**63,
        description="seed of the first image (image i uses seed + i); drawn at random when left out",
    )
    num_images: StrictInt = Field(1, description="images to generate")
    expert_budget: StrictFloat = Field(
        1.0,
        allow_inf_nan=False,
        description="the compute dial: about expert_budget * k experts per token, "
        "from the checkpoint's calibration table; 1.0 is the learned "
        "routing. The answer's expert_usage reports what was realised",
    )
    sampler: Optional[StrictStr] = Field(
        None,
        description="the sampler (euler, heun, ddim, ddpm, dpmpp_2m, sde_euler: GET /v1/models lists the "
        "model's); left out: the model's default",
    )
    output_format: Literal["png", "jpeg", "webp", "npy"] = Field(
        "png",
        description="image encoding; npy: the final float32 sample [C, H, W] as the sampler ends it "
        "(pixels in [-1, 1] before quantisation), byte-identical whatever shares the batch",
    )


class GenerateStreamRequest(GenerateRequest):
    """The body of POST /generate/stream: /generate's, and how often to send a preview."""

    preview_every: StrictInt = Field(
        0,
        ge=0,
        description="a preview event (the predicted clean sample "
        "x0 = x_t - t * v as a small PNG) every n steps; 0: none",
    )


class ImageOut(BaseModel):
    seed: int
    mime_type: str
    data: str = Field(..., description="base64-encoded image (or NumPy .npy file for output_format npy)")


class LayerUsage(BaseModel):
    mean_experts_per_token: float
    expert_load: list[int] = Field(..., description="tokens routed to each expert, over all steps and rows")


class ExpertUsage(BaseModel):
    num_moe_layers: int
    num_experts: int
    nominal_k: int
    mean_experts_per_token: float
    activated_pairs: int = Field(..., description="(token, expert) pairs computed for this request")
    nominal_pairs: int = Field(..., description="pairs fixed top-k routing would have computed")
    per_layer: list[LayerUsage]
    per_step: list[float] = Field(..., description="mean experts per token at each step, from t=1 to t=0")
    token_map: list[list[float]] = Field(..., description="(H/p) x (W/p) mean experts per token")
    experts_per_token_histogram: list[float] = Field(
        ..., description="share of (layer, token, step) slots whose token used 0, 1, ..., E experts"
    )

    @property
    def compute_ratio(self) -> float:
        """Activated over nominal (fixed top-k) expert pairs: below 1 means compute was saved."""
        return self.activated_pairs / self.nominal_pairs if self.nominal_pairs else 0.0


class Timing(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float
    decode_ms: float = Field(0.0, description="VAE decode of the iteration the request finished in (latent models)")


class ResolvedRequest(BaseModel):
    """What the server generated: the request with its class resolved and its defaults and seed filled in."""

    class_label: int
    class_name: str
    cfg_scale: float
    num_steps: int
    num_images: int
    seed: int
    expert_budget: float
    sampler: str
    output_format: str


class GenerateResponse(BaseModel):
    id: str
    model: str
    seed: int
    request: ResolvedRequest
    images: list[ImageOut]
    expert_usage: ExpertUsage
    timing: Timing


class ProgressEvent(BaseModel):
    """`event: progress` of the stream, after each denoising step of the request."""

    step: int = Field(..., description="steps done, 1..num_steps")
    num_steps: int
    t: float = Field(..., description="the time the step started from (1 = noise, 0 = image)")
    mean_experts_per_token: float = Field(..., description="over the request's rows, layers and steps so far")
    elapsed_ms: float = Field(..., description="since the request was admitted")


class PreviewEvent(BaseModel):
    """`event: preview`: the predicted clean sample after a step, one PNG per image."""

    step: int
    t: float
    images: list[ImageOut]


class StreamError(BaseModel):
    """`event: error`: what /generate would have answered, once the stream has started."""

    status: int
    detail: Any
    request_id: Optional[str] = None


class CudaGraphs(BaseModel):
    """How the engine runs a step's forward on a GPU: padded to a row bucket, replaying that bucket's
    captured CUDA graph (README: Serving settings)."""

    enabled: bool = Field(..., description="each step replays its row bucket's captured CUDA graph")
    reason: str = Field("", description="why not, when not: turned off, no CUDA device, a capture failed")
    buckets: list[int] = Field(..., description="the row counts a step is padded to ([]: steps run unpadded)")
    captured: list[int] = Field(..., description="the buckets captured so far")
    memory_bytes: int = Field(
        ..., description="device memory the captures hold: static inputs and outputs, and the graphs' shared pool"
    )
    moe_buffer_bytes: int = Field(
        0,
        description="on a GPU, one MoE layer's buffers at the largest step, sized for the worst case "
        "(every token taking every expert), which the device path allocates each step (0 elsewhere)",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    classes: list[str]
    image_size: int = Field(..., description="side of what the network denoises (the latent side for latent models)")
    in_channels: int
    patch_size: int
    image_shape: list[int] = Field(..., description="[C, H, W] of the images answered (decoded for latent models)")
    latent_shape: Optional[list[int]] = Field(
        None,
        description="[C, h, w] of the latents a latent model denoises "
        "(what output_format npy returns); null in pixel space",
    )
    autoencoder: Optional[dict[str, Any]] = Field(
        None, description="the VAE that decodes the latents: kind, scaling_factor, shift_factor; null in pixel space"
    )
    routing: Optional[dict[str, Any]]
    parameters_total: int
    parameters_activated: int
    thresholds: list[float]
    backend: str
    dtype: str = Field(..., description="precision of the network's matmuls")
    batch_invariant: bool = Field(
        ..., description="verified at start-up: a row's output is the same bytes in any batch"
    )
    expert_budget_range: list[float] = Field(
        ..., description="expert budgets served (the checkpoint's budget table; [1.0, 1.0] without one)"
    )
    samplers: list[str] = Field(..., description="the samplers a request may name")
    default_sampler: str = Field(..., description="the sampler of a request that names none")
    default_num_steps: int = Field(25, description="num_steps of a request that names none (the model family's)")
    default_cfg_scale: float = Field(4.0, description="cfg_scale of a request that names none (the model family's)")
    family: str = Field(
        "racedit", description="whose conventions the checkpoint follows: racedit, dit, diffusers, sit, repa, ..."
    )
    cuda_graphs: Optional[CudaGraphs] = Field(
        None, description="row buckets and CUDA graphs of the engine's steps (--cuda-graphs)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    authentication: Optional[Literal["bearer", "none"]] = Field(
        None,
        description="'bearer': every route but the health probes and the playground page needs the API key; "
        "'none': this server runs without authentication (no key set)",
    )


class ErrorBody(BaseModel):
    detail: Any
    request_id: Optional[str] = None


class Health(BaseModel):
    status: str


WIRE_MODELS = [
    GenerateRequest,
    GenerateStreamRequest,
    ImageOut,
    LayerUsage,
    ExpertUsage,
    Timing,
    ResolvedRequest,
    GenerateResponse,
    ProgressEvent,
    PreviewEvent,
    StreamError,
    CudaGraphs,
    ModelCard,
    ModelList,
    ErrorBody,
    Health,
]
STREAM_EVENTS = {"progress": ProgressEvent, "preview": PreviewEvent, "result": GenerateResponse, "error": StreamError}

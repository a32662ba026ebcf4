"""Results into the wire format: images and samples, server-sent events, the /generate answer and the
model card. Every answer the routes send is built here, from the engine's results (numpy) and the SDK's
wire models (`racedit_client.models`, served as `schemas`)."""

import base64
import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from racedit.model.usage import UsageSummary

from .engine import Engine
from .requests import GenerationRequest, GenerationResult, StepProgress
from .schemas import (
    CudaGraphs,
    ExpertUsage,
    GenerateResponse,
    ImageOut,
    ModelCard,
    PreviewEvent,
    ProgressEvent,
    ResolvedRequest,
)
from .validation import Limits

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "npy": "application/x-npy"}


def encode_npy(sample: np.ndarray) -> bytes:
    """A float32 sample [C, H, W] as a NumPy .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(sample, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def encode_result(result: GenerationResult, fmt: str) -> list[bytes]:
    """Each image of a result in the wire format asked for."""
    if fmt == "npy":
        return [encode_npy(sample) for sample in result.samples]
    return [encode_image(pixels, fmt) for pixels in result.images]


def encode_preview(sample: np.ndarray) -> list[bytes]:
    """Predicted clean samples float [N, C, H, W] in [-1, 1] -> PNGs, quantised as final images are."""
    pixels = ((np.clip(sample, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return [encode_image(p, "png") for p in pixels]


def sse(event: str, data: BaseModel) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()


def progress_event(progress: StepProgress) -> bytes:
    return sse(
        "progress",
        ProgressEvent(
            step=progress.step,
            num_steps=progress.num_steps,
            t=progress.t,
            mean_experts_per_token=progress.mean_experts_per_token,
            elapsed_ms=progress.elapsed_ms,
        ),
    )


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless), JPEG or WebP bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def images_out(seeds: list[int], encoded: list[bytes], fmt: str) -> list[ImageOut]:
    return [ImageOut(seed=s, mime_type=MIME[fmt], data=base64.b64encode(b).decode()) for s, b in zip(seeds, encoded)]


def preview_event(progress: StepProgress, seeds: list[int]) -> bytes:
    """`event: preview`: a streaming request's predicted clean samples as PNGs."""
    return sse(
        "preview",
        PreviewEvent(
            step=progress.step, t=progress.t, images=images_out(seeds, encode_preview(progress.preview), "png")
        ),
    )


def expert_usage(summary: UsageSummary) -> ExpertUsage:
    """The engine's usage accounting as the wire's `expert_usage` (its one conversion)."""
    return ExpertUsage.model_validate(dataclasses.asdict(summary))


def generate_response(
    request_id: str,
    model: str,
    job: GenerationRequest,
    output_format: str,
    result: GenerationResult,
    encoded: list[bytes],
    class_names: list[str],
) -> GenerateResponse:
    """The /generate answer (also the stream's `result` event)."""
    return GenerateResponse(
        id=request_id,
        model=model,
        seed=job.seed,
        request=ResolvedRequest(
            class_label=job.class_label,
            class_name=class_names[job.class_label],
            cfg_scale=job.cfg_scale,
            num_steps=job.num_steps,
            num_images=job.num_images,
            seed=job.seed,
            expert_budget=job.expert_budget,
            sampler=job.sampler,
            output_format=output_format,
        ),
        images=images_out(result.seeds, encoded, output_format),
        expert_usage=expert_usage(result.expert_usage),
        timing={
            "queue_ms": result.queue_ms,
            "inference_ms": result.inference_ms,
            "total_ms": result.total_ms,
            "decode_ms": result.decode_ms,
        },
    )


def model_card(engine: Engine, name: str, backend: str, limits: Limits) -> ModelCard:
    from racedit.model import parameter_counts

    runner = engine.runner
    cfg = runner.config
    total, activated = parameter_counts(cfg)
    decoder = runner.decoder
    return ModelCard(
        id=name,
        classes=class_names_of(cfg),
        image_size=cfg.image_size,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        image_shape=list(runner.output_shape),
        latent_shape=list(runner.image_shape) if decoder is not None else None,
        autoencoder=(
            {
                "kind": decoder.autoencoder.kind,
                "scaling_factor": decoder.autoencoder.scaling_factor,
                "shift_factor": decoder.autoencoder.shift_factor,
            }
            if decoder is not None
            else None
        ),
        routing=cfg.moe.__dict__ if cfg.moe else None,
        parameters_total=total,
        parameters_activated=activated,
        thresholds=runner.layer_thresholds,
        backend=backend,
        dtype=str(runner.dtype).removeprefix("torch."),
        batch_invariant=engine.batch_invariant,
        expert_budget_range=list(runner.budget_range),
        samplers=list(limits.samplers),
        default_sampler=limits.default_sampler,
        default_num_steps=limits.default_steps,
        default_cfg_scale=limits.default_cfg_scale,
        family=limits.family,
        cuda_graphs=CudaGraphs(**dataclasses.asdict(runner.graph_report())),
    )


def class_names_of(config: Any) -> list[str]:
    return list(config.class_names or [str(i) for i in range(config.num_classes)])

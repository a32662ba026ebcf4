"""The wire format. It is defined once, torch-free, in the SDK (`racedit_client.models`); the
server serves those very models and adds only the limits that are its runtime settings
(`validation.request_model`)."""

from racedit_client.models import (
    STREAM_EVENTS,
    WIRE_MODELS,
    CudaGraphs,
    ErrorBody,
    ExpertUsage,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamRequest,
    Health,
    ImageOut,
    LayerUsage,
    ModelCard,
    ModelList,
    PreviewEvent,
    ProgressEvent,
    ResolvedRequest,
    StreamError,
    Timing,
)

__all__ = [
    "STREAM_EVENTS",
    "WIRE_MODELS",
    "CudaGraphs",
    "ErrorBody",
    "ExpertUsage",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateStreamRequest",
    "Health",
    "ImageOut",
    "LayerUsage",
    "ModelCard",
    "ModelList",
    "PreviewEvent",
    "ProgressEvent",
    "ResolvedRequest",
    "StreamError",
    "Timing",
]

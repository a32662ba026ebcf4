"""racedit_client: the Python SDK of the racedit service (no torch).

from racedit_client import Client
with Client("http://127.0.0.1:8000") as client:
    result = client.generate("star", cfg_scale=4.0, num_steps=25, seed=1)
    result.images[0].save("star.png")
    print(result.expert_usage.mean_experts_per_token)
    for event in client.stream("star", num_steps=50, preview_every=10):  # progress, previews, result
        print(event)
"""

from .client import AsyncClient, Client, GenerateResult, Preview, StreamEvent
from .errors import (
    AuthError,
    ConnectionFailed,
    DeadlineExceeded,
    NotFound,
    Overloaded,
    RaceditError,
    ServerError,
    ValidationError,
)
from .models import ExpertUsage, GenerateResponse, LayerUsage, ModelCard, ModelList, ProgressEvent, Timing

__all__ = [
    "Client",
    "AsyncClient",
    "GenerateResult",
    "RaceditError",
    "ValidationError",
    "AuthError",
    "NotFound",
    "Overloaded",
    "DeadlineExceeded",
    "ServerError",
    "ConnectionFailed",
    "ExpertUsage",
    "LayerUsage",
    "GenerateResponse",
    "ModelCard",
    "ModelList",
    "Timing",
    "ProgressEvent",
    "Preview",
    "StreamEvent",
]

"""What passes between the HTTP layer and the engine: requests, progress, results and the engine's
errors. Torch-free, so the scheduler and the HTTP layer import it without the network."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:  # the accounting module needs torch; these types must not
    from racedit.model.usage import UsageSummary


class EngineError(Exception):
    """Base of the errors a request's future can fail with."""


class QueueFull(EngineError):
    """The bounded queue is full: the caller should retry later."""


class ShuttingDown(EngineError):
    """The engine stopped admitting requests (draining, stopped, or its worker died)."""


class DeadlineExceeded(EngineError):
    """The request was not finished before its deadline."""


class Cancelled(EngineError):
    """The caller went away; the request's rows were dropped."""


class DuplicateRequest(EngineError):
    """A request with this id is already queued or running."""


class StepFailed(EngineError):
    """Work for this request raised (others in the same step were retried alone)."""


@dataclass
class GenerationRequest:
    class_label: int
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: int = 0
    num_images: int = 1
    timeout_s: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Called on the engine's thread after each of this request's steps (streaming); it must not block.
    on_step: Optional[Callable[[StepProgress], None]] = None
    preview_every: int = 0  # with on_step: the predicted clean sample every n steps (and at the last)
    expert_budget: float = 1.0  # the compute dial: about expert_budget * k experts per token (1.0: learned)
    sampler: str = "euler"  # model/samplers.py

    @property
    def rows(self) -> int:
        """Forward rows per model evaluation: one per image, two under guidance."""
        return self.num_images * (1 if self.cfg_scale == 1.0 else 2)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


@dataclass
class StepProgress:
    """One finished denoising step of a request, for streaming. Computing it changes nothing of the result."""

    request_id: str
    step: int  # steps done, 1..num_steps
    num_steps: int
    t: float  # the time this step started from (1 = noise)
    mean_experts_per_token: float  # over this request's rows, layers and steps so far
    elapsed_ms: float  # since the request was admitted
    preview: Optional[np.ndarray] = None  # float32 [N, C, H, W]: x0 = x_t - t * v, the predicted clean sample


@dataclass
class GenerationResult:
    request_id: str
    images: np.ndarray  # uint8 [N, H, W, 3] (a latent model's samples decoded by its VAE)
    samples: np.ndarray  # float32 [N, C, H, W]: the final samples as the sampler ends them (latents: undecoded)
    seeds: list[int]
    expert_usage: UsageSummary
    queue_ms: float
    inference_ms: float
    total_ms: float
    decode_ms: float = 0.0  # the VAE decode of the iteration it finished in (latent models)

"""The one contract every servable network meets: the samplers, `generate` and the engine call it alone.

A denoiser maps (x_t, t, y) to a prediction (`DenoiserOutput`), with the routing statistics when
asked. Race-DiT (model/dit.py) and the exported ONNX graph (export/external.py) both implement it;
the compute dial (per-row thresholds from a `BudgetTable`) is an optional capability: a denoiser
without a table serves expert budget 1.0 alone and refuses `thresholds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from .budget import BudgetTable
from .config import ModelConfig
from .exact import Execution
from .moe import Routing


@dataclass
class ForwardStats:
    """Routing of one forward. Integer counts are cheap to collect (no extra expert work)."""

    experts_per_token: torch.Tensor  # int [n_moe_layers, B, L]
    expert_load: torch.Tensor  # int [n_moe_layers, B, E]: tokens each expert took, per sample
    routing: list[Routing]  # per MoE layer, for the training losses (empty outside PyTorch)


@dataclass
class DenoiserOutput:
    """What one forward returns."""

    prediction: torch.Tensor  # [B, C, H, W] fp32: velocity, or noise (ModelConfig.objective)
    stats: Optional[ForwardStats] = None  # with return_stats=True


@runtime_checkable
class Denoiser(Protocol):
    """A network the samplers and the engine can serve."""

    config: ModelConfig

    @property
    def null_class(self) -> int: ...

    @property
    def budget_table(self) -> Optional[BudgetTable]: ...

    def learned_thresholds(self) -> list[float]: ...

    def prepare(self, device: torch.device, dtype: torch.dtype, execution: Execution) -> Denoiser: ...

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        thresholds: Optional[torch.Tensor] = None,
        return_stats: bool = False,
    ) -> DenoiserOutput: ...


def device_of(denoiser: Denoiser) -> torch.device:
    """Where a denoiser's tensors live (its first parameter or buffer; the CPU when it has none)."""
    for tensor in (*getattr(denoiser, "parameters", lambda: [])(), *getattr(denoiser, "buffers", lambda: [])()):
        return tensor.device
    return torch.device("cpu")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: on CUDA from pinned memory, since a copy from
    pageable memory waits for the stream's queued work (a host sync per copy)."""
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)

"""racedit.model: the Race-DiT network, routing, sampling and checkpoints (training: racedit.model.training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from .checkpoint import CheckpointError, load, read_config, save
from .config import PRESETS, ConfigError, ModelConfig, MoEConfig, preset_config
from .denoiser import Denoiser, DenoiserOutput, ForwardStats
from .dit import RaceDiT
from .exact import EXPORT, SERVING, Execution

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "racedit-shapes10"


def bundled() -> Path:
    """The shapes10 model shipped inside the package: `load(bundled())` works from any directory."""
    return DEFAULT_CHECKPOINT


def build(config: Union[str, ModelConfig, dict[str, Any]] = "shapes10", **overrides: Any) -> RaceDiT:
    """A freshly initialised model from a preset name, a ModelConfig or a config dict."""
    if isinstance(config, str):
        config = preset_config(config, **overrides)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict({**config, **overrides})
    elif overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    return RaceDiT(config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, activated) parameters. Activated counts k of the E experts of each MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in getattr(model, "moe_layers", []):
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        inactive += expert_params * (layer.num_experts - layer.k) // layer.num_experts
    return total, total - inactive


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, activated) parameters of a config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(RaceDiT(config))


def __getattr__(name: str) -> Any:
    # `generate` pulls in the sampler; imported lazily so the network stays importable alone.
    if name == "generate":
        from .sampling import generate

        return generate
    raise AttributeError(name)


__all__ = [
    "build",
    "bundled",
    "load",
    "save",
    "generate",
    "read_config",
    "count_parameters",
    "parameter_counts",
    "RaceDiT",
    "Denoiser",
    "DenoiserOutput",
    "Execution",
    "SERVING",
    "EXPORT",
    "ModelConfig",
    "MoEConfig",
    "ForwardStats",
    "PRESETS",
    "preset_config",
    "ConfigError",
    "CheckpointError",
    "DEFAULT_CHECKPOINT",
]

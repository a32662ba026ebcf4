"""Denoisers that run outside PyTorch (onnxruntime, Triton BLS) but look like RaceDiT to the
samplers and the engine: same call, same routing statistics. The serving loop stays one code path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from racedit.model import ModelConfig, read_config
from racedit.model.dit import ForwardStats


class ThresholdView(nn.Module):
    """What the engine reads of an MoE layer it does not run: its learned threshold."""

    def __init__(self, value: float, num_experts: int, k: int):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(value)))
        self.num_experts, self.k = num_experts, k


class ExternalDenoiser(nn.Module):
    """Base: subclasses implement `run(x, t, y)` on numpy arrays, returning (v, experts_per_token, expert_load)
    with the routing arrays laid out [n_moe_layers, B, ...]."""

    def __init__(self, config: ModelConfig, thresholds: list[float]):
        super().__init__()
        self.config = config
        moe = config.moe
        self.moe_layers = nn.ModuleList(ThresholdView(v, moe.num_experts, moe.k) for v in thresholds) if moe else nn.ModuleList()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_stats: bool = False):
        v, ept, load = self.run(x.detach().float().cpu().numpy(), t.detach().float().cpu().numpy(),
                                y.detach().cpu().numpy().astype(np.int64))
        v = torch.from_numpy(np.ascontiguousarray(v)).to(x.device, x.dtype)
        if not return_stats:
            return v
        return v, ForwardStats(experts_per_token=torch.from_numpy(np.ascontiguousarray(ept)),
                               expert_load=torch.from_numpy(np.ascontiguousarray(load)), routing=[])

    @classmethod
    def config_of(cls, checkpoint: Union[str, os.PathLike]) -> tuple[ModelConfig, list[float]]:
        document = read_config(checkpoint)
        return ModelConfig.from_dict(document["model"]), list(document.get("thresholds", []))


class OrtDenoiser(ExternalDenoiser):
    """The exported ONNX denoiser in onnxruntime (CUDA provider where present, else CPU)."""

    def __init__(self, onnx_path: Union[str, os.PathLike], config: ModelConfig, thresholds: list[float],
                 providers: Optional[list[str]] = None):
        import onnxruntime as ort

        super().__init__(config, thresholds)
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.providers = self.session.get_providers()

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v, ept, load = self.session.run(["v", "experts_per_token", "expert_load"], {"x": x, "t": t, "y": y})
        return v, ept, load


def load_onnx_model(checkpoint: Union[str, os.PathLike], onnx_path: Union[str, os.PathLike],
                    device: Optional[torch.device] = None) -> OrtDenoiser:
    """An onnxruntime denoiser with the checkpoint's config and thresholds (for `racedit serve --backend onnxruntime`)."""
    config, thresholds = ExternalDenoiser.config_of(checkpoint)
    providers = ["CPUExecutionProvider"] if device is not None and device.type == "cpu" else None
    return OrtDenoiser(onnx_path, config, thresholds, providers)

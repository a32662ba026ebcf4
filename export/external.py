"""Denoisers that run outside PyTorch (onnxruntime, Triton BLS) and meet the same `Denoiser` contract
as RaceDiT: same call, same routing statistics. The serving loop stays one code path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from racedit.model import ModelConfig, read_config
from racedit.model.budget import BudgetTable
from racedit.model.denoiser import DenoiserOutput, ForwardStats
from racedit.model.exact import Execution


class ExternalDenoiser:
    """Base: subclasses implement `run(x, t, y)` on numpy arrays, returning (v, experts_per_token, expert_load)
    with the routing arrays laid out [n_moe_layers, B, ...]. A `Denoiser` (model/denoiser.py) without
    the compute dial: the graph routes by the learned thresholds it was exported with."""

    def __init__(self, config: ModelConfig, thresholds: list[float]):
        self.config = config
        self.thresholds = list(thresholds)
        self.budget_table: Optional[BudgetTable] = None  # per-row thresholds are not an input of the graph

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def learned_thresholds(self) -> list[float]:
        return self.thresholds

    def prepare(self, device: torch.device, dtype: torch.dtype, execution: Execution) -> ExternalDenoiser:
        """Nothing to move: the runtime fixes its own device and precision."""
        return self

    def eval(self) -> ExternalDenoiser:
        return self

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        thresholds: Optional[torch.Tensor] = None,
        return_stats: bool = False,
    ) -> DenoiserOutput:
        if thresholds is not None:
            raise ValueError("this backend routes by its exported thresholds only (expert_budget 1.0)")
        v, ept, load = self.run(
            x.detach().float().cpu().numpy(),
            t.detach().float().cpu().numpy(),
            y.detach().cpu().numpy().astype(np.int64),
        )
        v = torch.from_numpy(np.ascontiguousarray(v)).to(x.device, x.dtype)
        stats = (
            ForwardStats(
                experts_per_token=torch.from_numpy(np.ascontiguousarray(ept)),
                expert_load=torch.from_numpy(np.ascontiguousarray(load)),
                routing=[],
            )
            if return_stats
            else None
        )
        return DenoiserOutput(v, stats)

    @classmethod
    def config_of(cls, checkpoint: Union[str, os.PathLike]) -> tuple[ModelConfig, list[float]]:
        document = read_config(checkpoint)
        return ModelConfig.from_dict(document["model"]), list(document.get("thresholds", []))


class OrtDenoiser(ExternalDenoiser):
    """The exported ONNX denoiser in onnxruntime (CUDA provider where present, else CPU)."""

    def __init__(
        self,
        onnx_path: Union[str, os.PathLike],
        config: ModelConfig,
        thresholds: list[float],
        providers: Optional[list[str]] = None,
    ):
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


def load_onnx_model(
    checkpoint: Union[str, os.PathLike], onnx_path: Union[str, os.PathLike], device: Optional[torch.device] = None
) -> OrtDenoiser:
    """An onnxruntime denoiser with the checkpoint's config and thresholds (`racedit serve --backend onnxruntime`)."""
    config, thresholds = ExternalDenoiser.config_of(checkpoint)
    providers = ["CPUExecutionProvider"] if device is not None and device.type == "cpu" else None
    return OrtDenoiser(onnx_path, config, thresholds, providers)

"""Thresholds that match the weights they ship with.

Training keeps each MoE layer's threshold as an EMA of the race's K-th gate of the *live*
model, and the EMA weights that are saved inherit it; but the EMA model scores tokens a
little differently, so served compute drifts from k. Here the thresholds are re-estimated
on the weights themselves: sample as the server does (cfg, Euler steps over the time
grid), collect every (token, expert) gate of each layer over all steps and rows, and set
the threshold to the race's K-th largest value with K = k x tokens -- so that, over that
pass, the layer activates k experts per token on average, while the split across
timesteps and tokens stays the model's own. Sampling trajectories depend on the
thresholds, so the pass repeats a few times (a fixed point; two are usually enough).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .config import FORBID_UNKNOWN, Float, Int
from .dit import RaceDiT


@dataclass
class Calibration:
    """How thresholds were estimated; stored in checkpoint metadata under `threshold_calibration`."""

    __pydantic_config__ = FORBID_UNKNOWN

    num_images: Int = 40
    cfg_scale: Float = 4.0
    num_steps: Int = 25
    iterations: Int = 2
    seed: Int = 10_000  # seeds of the calibration samples: apart from evaluation's 0..N-1


@torch.no_grad()
def calibrate_thresholds(model: RaceDiT, calibration: Optional[Calibration] = None) -> dict:
    """Set every MoE layer's threshold from the model's own sampling pass; returns the metadata record."""
    from .sampling import generate

    calibration = calibration or Calibration()
    layers = model.moe_layers
    if not layers:
        return {}
    before = [float(layer.threshold) for layer in layers]
    n = calibration.num_images
    labels = [i % model.config.num_classes for i in range(n)]
    seeds = list(range(calibration.seed, calibration.seed + n))
    scores: list[list[torch.Tensor]] = [[] for _ in layers]

    def collect(index: int):
        def hook(module, inputs, output) -> None:
            scores[index].append(output[1].scores.reshape(-1).float().cpu())
        return hook

    history = []
    handles = [layer.register_forward_hook(collect(i)) for i, layer in enumerate(layers)]
    try:
        for _ in range(calibration.iterations):
            for s in scores:
                s.clear()
            _, usage = generate(model, labels, cfg_scale=calibration.cfg_scale, num_steps=calibration.num_steps,
                                seeds=seeds)
            history.append(sum(u["mean_experts_per_token"] for u in usage) / n)
            for layer, collected in zip(layers, scores):
                gates = torch.cat(collected)
                kth = int(round(gates.numel() / layer.num_experts * layer.k))  # K = k per token
                layer.threshold.fill_(float(gates.topk(kth).values[-1]))
    finally:
        for handle in handles:
            handle.remove()
    _, usage = generate(model, labels, cfg_scale=calibration.cfg_scale, num_steps=calibration.num_steps, seeds=seeds)
    history.append(sum(u["mean_experts_per_token"] for u in usage) / n)
    return {**asdict(calibration), "method": "race K-th gate over the model's own sampling pass",
            "thresholds_before": before, "thresholds": [float(layer.threshold) for layer in layers],
            "mean_experts_per_token_by_iteration": [round(v, 4) for v in history]}

"""Estimating thresholds that match the weights they ship with, and the compute dial's table
(read back at serving time by model/budget.py).

Training keeps each MoE layer's threshold as an EMA of the race's K-th gate of the *live*
model, and the EMA weights that are saved inherit it; but the EMA model scores tokens a
little differently, so served compute drifts from k. Here the thresholds are re-estimated
on the weights themselves: sample as the server does (cfg, Euler steps over the time
grid), collect every (token, expert) gate of each layer over all steps and rows, and set
the threshold to the race's K-th largest value with K = k x tokens -- so that, over that
pass, the layer activates k experts per token on average, while the split across
timesteps and tokens stays the model's own. Sampling trajectories depend on the
thresholds, so the pass repeats a few times (a fixed point; two are usually enough).

A checkpoint trained with token choice (a published DiT-MoE) gets threshold routing on its own
gates the same way (`calibrate(model, routing="threshold")`): the first pass
samples with its top-k routing, the thresholds set from it make every layer select the pairs
whose gate beats them (`MoEConfig.routing: threshold`), and the following passes refine them
under threshold routing -- so `expert_budget` and compute that follows t work on its weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal, Optional

import torch

from ..dit import RaceDiT
from .config import Calibration

BUDGETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
CONVERTIBLE = ("token_choice", "expert_choice")  # routings that threshold routing can replace


@torch.no_grad()
def calibrate(
    model: RaceDiT,
    calibration: Optional[Calibration] = None,
    routing: Literal["keep", "threshold"] = "keep",
    budgets: Sequence[float] = BUDGETS,
) -> dict:
    """`racedit calibrate` between loading and saving (its flags: `racedit.cli.options.CalibrateOptions`):
    thresholds (and, with `routing` "threshold", the routing that uses them), then the compute dial's
    table for `budgets` (none: no table); the model's metadata records both. Returns the record."""
    calibration = calibration or Calibration()
    moe = model.config.moe
    if moe is None:
        raise ValueError("a dense model has no experts to calibrate")
    converting = routing == "threshold" and moe.routing in CONVERTIBLE
    if converting and not calibration.iterations:
        raise ValueError("routing threshold needs at least one calibration pass (iterations >= 1)")
    if moe.routing in CONVERTIBLE and not converting:
        raise ValueError(
            f"this checkpoint routes by {moe.routing}, which no threshold steers: "
            "calibrate it with routing 'threshold' to give it threshold routing on its own gates"
        )
    record = model.metadata.get("threshold_calibration", {})
    if calibration.iterations:
        record = calibrate_thresholds(model, calibration, routing=routing)
        model.metadata = {**model.metadata, "threshold_calibration": record}
    if budgets:
        record = {**record, "budget_table": budget_table(model, calibration, budgets)}
    return record


def use_threshold_routing(model: RaceDiT) -> None:
    """From now on every MoE layer selects the pairs whose gate beats its threshold (routing "threshold")."""
    moe = dataclasses.replace(model.config.moe, routing="threshold")
    model.config = dataclasses.replace(model.config, moe=moe)
    for layer in model.moe_layers:
        layer.config = moe


@torch.no_grad()
def calibrate_thresholds(
    model: RaceDiT, calibration: Optional[Calibration] = None, routing: Literal["keep", "threshold"] = "keep"
) -> dict:
    """Set every MoE layer's threshold from the model's own sampling pass; returns the metadata record.
    With `routing` "threshold", a token- or expert-choice model samples its first pass with its own
    routing and routes by the thresholds from then on."""
    from ..sampling import generate

    calibration = calibration or Calibration()
    layers = model.moe_layers
    if not layers:
        return {}
    original = model.config.moe.routing
    converting = routing == "threshold" and original in CONVERTIBLE
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
            _, usage = generate(
                model, labels, cfg_scale=calibration.cfg_scale, num_steps=calibration.num_steps, seeds=seeds
            )
            history.append(sum(u.mean_experts_per_token for u in usage) / n)
            for layer, collected in zip(layers, scores):
                gates = torch.cat(collected)
                kth = int(round(gates.numel() / layer.num_experts * layer.k))  # K = k per token
                layer.threshold.fill_(float(gates.topk(kth).values[-1]))
            if converting and model.config.moe.routing != "threshold":
                use_threshold_routing(model)
    finally:
        for handle in handles:
            handle.remove()
    _, usage = generate(model, labels, cfg_scale=calibration.cfg_scale, num_steps=calibration.num_steps, seeds=seeds)
    history.append(sum(u.mean_experts_per_token for u in usage) / n)
    conversion = {"routing_before": original, "routing": model.config.moe.routing} if converting else {}
    return {
        **asdict(calibration),
        "method": "race K-th gate over the model's own sampling pass",
        **conversion,
        "thresholds_before": before,
        "thresholds": [float(layer.threshold) for layer in layers],
        "mean_experts_per_token_by_iteration": [round(v, 4) for v in history],
    }


@torch.no_grad()
def budget_table(model: RaceDiT, calibration: Optional[Calibration] = None, budgets: Sequence[float] = BUDGETS) -> dict:
    """The compute dial's table: per budget b, per-layer thresholds for about b * k experts per token.

    From the gates of one sampling pass at the learned thresholds, each layer's threshold for b is
    its (b * k per token)-th largest gate; b = 1 keeps the learned thresholds exactly. A pass at
    each budget's thresholds then records the experts per token it really gives (the trajectories
    follow the thresholds, so it is near, not at, b * k). Stored as metadata["budget_table"].
    """
    from ..sampling import generate

    calibration = calibration or Calibration()
    layers = model.moe_layers
    budgets = sorted(float(b) for b in budgets)
    if not layers or 1.0 not in budgets or budgets[0] <= 0 or budgets[-1] * layers[0].k > layers[0].num_experts:
        raise ValueError(f"budgets must include 1.0 and lie in (0, E/k]; got {budgets}")
    n = calibration.num_images
    labels = [i % model.config.num_classes for i in range(n)]
    seeds = list(range(calibration.seed, calibration.seed + n))
    scores: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        layer.register_forward_hook(
            lambda module, inputs, output, i=i: scores[i].append(output[1].scores.reshape(-1).float().cpu())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        generate(model, labels, cfg_scale=calibration.cfg_scale, num_steps=calibration.num_steps, seeds=seeds)
    finally:
        for handle in handles:
            handle.remove()
    table = []
    for budget in budgets:
        row = []
        for layer, collected in zip(layers, scores):
            gates = torch.cat(collected)
            kth = max(1, int(round(gates.numel() / layer.num_experts * layer.k * budget)))
            row.append(float(layer.threshold) if budget == 1.0 else float(gates.topk(kth).values[-1]))
        table.append(row)
    record = {"budgets": budgets, "thresholds": table, **asdict(calibration)}
    model.metadata = {**getattr(model, "metadata", {}), "budget_table": record}
    realised = []
    for budget in budgets:
        _, usage = generate(
            model,
            labels,
            cfg_scale=calibration.cfg_scale,
            num_steps=calibration.num_steps,
            seeds=seeds,
            expert_budget=budget,
        )
        realised.append(round(sum(u.mean_experts_per_token for u in usage) / n, 4))
    record["mean_experts_per_token"] = realised
    return record

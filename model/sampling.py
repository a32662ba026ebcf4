"""Classifier-free guidance and `generate`: the library's sampling loop.

`guided_prediction` is the one guided model evaluation that both `generate` and the serving
engine call, and the samplers (model/samplers.py) are the same objects in both, so a request's
images are the same whichever of the two produced them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .budget import thresholds_for
from .config import ModelConfig
from .denoiser import Denoiser, device_of, to_device
from .samplers import make_sampler, start_noise
from .usage import UsageAccumulator, UsageSummary, usage_by_image


@torch.no_grad()
def guided_prediction(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    cfg_scales: Union[torch.Tensor, Sequence[float]],
    thresholds: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """v = v_u + s (v_c - v_u) for N images, each with its own t, label and scale, in one forward;
    with `thresholds` [n_moe_layers, N], each image's rows route by its own (the compute dial).
    Guidance acts on the channels the model's conventions name (DiT, SiT: the first 3; a learned
    variance half is never guided): the other channels are the conditional row's, as in DiT's
    `forward_with_cfg`.

    Rows: N conditional rows, then one unconditional row for each image with s != 1. Which images
    are guided is decided on the host, so `cfg_scales` are best given there (a sequence or a CPU
    tensor): a device tensor costs a host sync to read. The row indices reach the device from pinned
    memory without blocking. Returns v [N, C, H, W] and, per forward row, experts_per_token
    [n_layers, R, L], expert_load [n_layers, R, E] and the image each row belongs to [R].
    """
    n = x.shape[0]
    scales = cfg_scales.cpu() if isinstance(cfg_scales, torch.Tensor) else torch.tensor(list(cfg_scales))
    guided = [i for i, flag in enumerate((scales != 1.0).tolist()) if flag]  # compared in the scales' dtype
    owner = to_device(torch.tensor([*range(n), *guided], dtype=torch.long), x.device)  # [R]
    index = owner[n:]  # the guided images, on the device
    rows_x = torch.cat([x, x.index_select(0, index)])
    rows_t = torch.cat([t, t.index_select(0, index)])
    rows_y = torch.cat([labels, labels.new_full((len(guided),), model.null_class)])
    rows_thresholds = None if thresholds is None else torch.cat([thresholds, thresholds.index_select(1, index)], dim=1)
    out = model(rows_x, rows_t, rows_y, thresholds=rows_thresholds, return_stats=True)
    v = out.prediction[:n].clone()
    if guided:
        v_u = out.prediction[n:]
        s = to_device(scales[guided], x.device).view(-1, 1, 1, 1).to(v.dtype)
        channels = model.config.family.guidance_channels
        if channels is None and v.shape[1] == x.shape[1]:
            v[index] = v_u + s * (v[index] - v_u)
        else:
            k = channels or x.shape[1]
            v[index, :k] = v_u[:, :k] + s * (v[index, :k] - v_u[:, :k])
    return v, out.stats.experts_per_token, out.stats.expert_load, owner


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [N, C, H, W] on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


class ObjectiveError(ValueError):
    """The checkpoint does not say how to sample it (DiT's noise without its family's conventions)."""


def require_servable(config: ModelConfig) -> None:
    """Refuse a checkpoint the samplers cannot drive: a noise-predicting network without conventions
    (written by `racedit import-dit`, which keeps DiT's weights for fine-tuning)."""
    objective = config.objective
    if objective != "rectified_flow" and config.conventions is None:
        raise ObjectiveError(
            f"this checkpoint predicts {objective!r} (imported from DiT) but records no family conventions: "
            "import it with `racedit import SOURCE --out DIR` to serve it as it is, or fine-tune it into "
            "rectified flow with `racedit train --config CONFIG --init CHECKPOINT` (docs/latents.md)"
        )


@torch.no_grad()
def generate(
    model: Denoiser,
    labels: Sequence[int],
    cfg_scale: Union[None, float, Sequence[float]] = None,
    num_steps: Optional[int] = None,
    seeds: Optional[Sequence[int]] = None,
    sampler: Optional[str] = None,
    as_float: bool = False,
    expert_budget: Union[float, Sequence[float]] = 1.0,
) -> tuple[torch.Tensor, list[UsageSummary]]:
    """Images uint8 [N, 3, H, W] and per-image expert usage.

    `cfg_scale`, `num_steps` and `sampler` left out take the model family's defaults (racedit's:
    4.0, 25, euler; `model.config.family`). `as_float` returns the final fp32 samples [N, C, H, W]
    as the sampler ends them instead (what the server's `npy` output format carries). `expert_budget`
    (per image or one for all) scales the experts per token through the checkpoint's budget table;
    1.0 is the learned routing.

    Each image's noise comes from its own seed (and so does every noise a stochastic sampler adds),
    and threshold routing makes every row independent, so an image never depends on what else is
    in the batch.
    """
    require_servable(model.config)
    family = model.config.family
    cfg_scale = family.default_cfg_scale if cfg_scale is None else cfg_scale
    num_steps = family.default_steps if num_steps is None else num_steps
    sampler = family.default_sampler if sampler is None else sampler
    model.eval()
    device = device_of(model)  # latents and timesteps stay fp32 whatever the parameters' dtype
    n = len(labels)
    seeds = list(seeds) if seeds is not None else list(range(n))
    scales = [float(cfg_scale)] * n if isinstance(cfg_scale, (int, float)) else [float(s) for s in cfg_scale]
    budgets = (
        [float(expert_budget)] * n if isinstance(expert_budget, (int, float)) else [float(b) for b in expert_budget]
    )
    if len(seeds) != n or len(scales) != n or len(budgets) != n:
        raise ValueError("labels, seeds, cfg_scale and expert_budget must have the same length")
    thresholds = None
    if any(b != 1.0 for b in budgets):
        thresholds = thresholds_for(model.budget_table, model.learned_thresholds(), budgets).to(device)
    cfg = model.config
    noise, generators = start_noise(seeds, (cfg.in_channels, cfg.image_size, cfg.image_size))
    state = make_sampler(sampler, noise.to(device), num_steps, family, generators)
    y = torch.tensor(list(labels), dtype=torch.long, device=device)
    usage = [UsageAccumulator.for_model(cfg) for _ in range(n)]
    while not state.done:
        x, t = state.query()
        now = scales if family.guides_at(state.position) else [1.0] * n  # a guidance interval (REPA)
        v, ept, load, owner = guided_prediction(model, x, torch.full((n,), t, device=device), y, now, thresholds)
        counts = usage_by_image(ept, load, owner, n).cpu()
        for i in range(n):
            usage[i].add(counts[:, i], 1 if now[i] == 1.0 else 2)
        state.update(v)
    x = state.x
    return (x.float().cpu() if as_float else to_uint8(x)), [u.summary() for u in usage]

"""The rectified-flow training objective with Race-DiT's losses.

Flow matching: x_t = (1 - t) x_0 + t eps, target v = eps - x_0, t logit-normal; plus per-layer
regularisation, router similarity and (for token-choice baselines) a balance loss (losses.py).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..denoiser import ForwardStats
from ..dit import RaceDiT
from . import losses
from .config import LossConfig


def logit_normal(
    n: int,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device] = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def training_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    weights: LossConfig,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict[str, float], ForwardStats, torch.Tensor]:
    """Total loss, its terms as floats, the forward's routing stats and its timesteps (for metrics)."""
    net: RaceDiT = getattr(model, "module", model)
    t = logit_normal(x0.shape[0], generator, x0.device, weights.t_mean, weights.t_std)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    target = eps - x0
    out = model(x_t, t, y, return_stats=True)
    v, stats = out.prediction, out.stats
    mse = torch.mean((v.float() - target) ** 2)
    plr = losses.per_layer_regularisation(stats.routing, net.patchify(target))
    sim = losses.router_similarity(stats.routing).to(mse.device)
    bal = losses.balance(stats.routing).to(mse.device) if weights.balance else mse.new_zeros(())
    total = mse + weights.plr * plr + weights.similarity * sim + weights.balance * bal
    terms = {
        name: float(value.detach())
        for name, value in (("loss", total), ("mse", mse), ("plr", plr), ("similarity", sim), ("balance", bal))
    }
    return total, terms, stats, t

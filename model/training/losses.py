"""Auxiliary MoE losses and routing metrics (docs/design.md, "Training and evaluation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..moe import Routing


def per_layer_regularisation(routings: list[Routing], target_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over MoE layers of MSE(router target head, final target). target_tokens: [B, L, p*p*C]."""
    preds = [r.target for r in routings if r.target is not None]
    if not preds:
        return target_tokens.new_zeros(())
    return torch.stack([F.mse_loss(p.float(), target_tokens.float()) for p in preds]).mean()


def router_similarity(routings: list[Routing]) -> torch.Tensor:
    """Penalise correlated experts so balance cannot collapse into fixed pairs (paper Fig. 4).

    Per layer: standardise each expert's gate column over the N tokens, form the
    E x E correlation C = G^T G / N and take the mean square of its off-diagonal.
    """
    losses = []
    for r in routings:
        g = r.scores.reshape(-1, r.scores.shape[-1]).float()  # [N, E]
        g = (g - g.mean(0)) / (g.std(0, unbiased=False) + 1e-6)
        corr = g.t() @ g / g.shape[0]
        off = corr - torch.diag_embed(torch.diagonal(corr))
        e = corr.shape[0]
        losses.append(off.pow(2).sum() / (e * (e - 1)))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def balance(routings: list[Routing]) -> torch.Tensor:
    """Switch / DiT-MoE load balance E * sum_e f_e * P_e (token-choice baselines)."""
    losses = []
    for r in routings:
        e = r.mask.shape[-1]
        mask = r.mask.reshape(-1, e).float()
        f = mask.sum(0) / mask.sum().clamp(min=1)
        p = torch.softmax(r.logits.reshape(-1, e).float(), dim=-1).mean(0)
        losses.append(e * (f * p).sum())
    return torch.stack(losses).mean() if losses else torch.zeros(())


# ---------------------------------------------------------------- metrics ----
def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_e load_e - mean load) / mean load, for an expert-load vector [E]."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def combination_usage(mask: torch.Tensor, mass: float = 0.95) -> float:
    """Share of the E(E-1)/2 expert pairs needed to cover `mass` of the co-activations (Fig. 13).

    mask: [..., E] bool over tokens. Higher means experts combine more diversely.
    """
    m = mask.reshape(-1, mask.shape[-1]).float()
    e = m.shape[1]
    co = (m.t() @ m).triu(diagonal=1)
    counts = co[torch.triu(torch.ones(e, e, dtype=torch.bool), diagonal=1)].sort(descending=True).values
    total = counts.sum()
    if total <= 0:
        return 0.0
    needed = int((counts.cumsum(0) / total < mass).sum()) + 1
    return needed / counts.numel()

"""Rectified-flow objective, samplers with classifier-free guidance, and expert-usage accounting.

Flow matching: x_t = (1 - t) x_0 + t eps, target v = eps - x_0, t logit-normal.
Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (image).

The one-step functions here (`guided_velocity`, `euler_update`, `time_grid`)
are what both `generate` and the serving engine call, so a request's images
are the same whichever of the two produced them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import losses
from .config import FORBID_UNKNOWN, Float, ModelConfig
from .dit import ForwardStats, RaceDiT


# ------------------------------------------------------------- objective ----
@dataclass
class LossConfig:
    """The training objective: loss weights and where the timesteps fall."""

    __pydantic_config__ = FORBID_UNKNOWN

    plr: Float = 1.0  # per-layer regularisation
    similarity: Float = 0.01  # router similarity
    balance: Float = 0.0  # Switch-style balance (token-choice baselines)
    # t = sigmoid(t_mean + t_std * n), n ~ N(0, 1) (SD3's logit-normal); t_mean > 0 trains the
    # noisy steps, where the sampler decides a shape's outline, more often.
    t_mean: Float = 0.0
    t_std: Float = 1.0


def logit_normal(n: int, generator: Optional[torch.Generator] = None, device: Union[str, torch.device] = "cpu",
                 mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def training_loss(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, weights: LossConfig,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, float], ForwardStats, torch.Tensor]:
    """Total loss, its terms as floats, the forward's routing stats and its timesteps (for metrics)."""
    net: RaceDiT = getattr(model, "module", model)
    t = logit_normal(x0.shape[0], generator, x0.device, weights.t_mean, weights.t_std)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    target = eps - x0
    v, stats = model(x_t, t, y, return_stats=True)
    mse = torch.mean((v.float() - target) ** 2)
    plr = losses.per_layer_regularisation(stats.routing, net.patchify(target))
    sim = losses.router_similarity(stats.routing).to(mse.device)
    bal = losses.balance(stats.routing).to(mse.device) if weights.balance else mse.new_zeros(())
    total = mse + weights.plr * plr + weights.similarity * sim + weights.balance * bal
    terms = {name: float(value.detach()) for name, value in
             (("loss", total), ("mse", mse), ("plr", plr), ("similarity", sim), ("balance", bal))}
    return total, terms, stats, t


# -------------------------------------------------------------- sampling ----
def time_grid(num_steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_N = 0, uniform."""
    return [1.0 - i / num_steps for i in range(num_steps + 1)]


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise of one image from a CPU generator seeded by its own seed (device-independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def guided_velocity(model: RaceDiT, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                    cfg_scales: torch.Tensor, thresholds: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """v = v_u + s (v_c - v_u) for N images, each with its own t, label and scale, in one forward;
    with `thresholds` [n_moe_layers, N], each image's rows route by its own (the compute dial).

    Rows: N conditional rows, then one unconditional row for each image with s != 1.
    Returns v [N, C, H, W] and, per forward row, experts_per_token [n_layers, R, L],
    expert_load [n_layers, R, E] and the image each row belongs to [R].
    """
    guided = (cfg_scales != 1.0).nonzero().squeeze(1)
    rows_x = torch.cat([x, x[guided]])
    rows_t = torch.cat([t, t[guided]])
    rows_y = torch.cat([labels, torch.full_like(labels[guided], model.null_class)])
    dial = {} if thresholds is None else {"thresholds": torch.cat([thresholds, thresholds[:, guided]], dim=1)}
    v_rows, stats = model(rows_x, rows_t, rows_y, return_stats=True, **dial)  # external denoisers have no dial
    v = v_rows[: x.shape[0]].clone()
    if guided.numel():
        v_u = v_rows[x.shape[0]:]
        s = cfg_scales[guided].view(-1, 1, 1, 1).to(v.dtype)
        v[guided] = v_u + s * (v[guided] - v_u)
    owner = torch.cat([torch.arange(x.shape[0], device=x.device), guided])
    return v, stats.experts_per_token, stats.expert_load, owner


def usage_by_image(experts_per_token: torch.Tensor, expert_load: torch.Tensor, owner: torch.Tensor,
                   num_images: int) -> torch.Tensor:
    """One step's routing counts summed over each image's rows, in one tensor (one copy to the host).

    experts_per_token [n_layers, R, L], expert_load [n_layers, R, E], owner [R] -> [n_layers, N, L + E + E + 1]
    int64: per token the experts it used, per expert its tokens, and how many tokens used 0..E experts.
    """
    num_experts = expert_load.shape[2]
    histogram = F.one_hot(experts_per_token.to(torch.int64).clamp(max=num_experts), num_experts + 1).sum(2)
    per_row = torch.cat([experts_per_token.to(torch.int64), expert_load.to(torch.int64), histogram], dim=2)
    out = per_row.new_zeros(per_row.shape[0], num_images, per_row.shape[2])
    return out.index_add_(1, owner.to(per_row.device), per_row)


def euler_update(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v, in fp32 whatever precision the network ran in."""
    return x.float() + (t_next.float() - t.float()).view(-1, 1, 1, 1) * v.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [N, C, H, W] on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ----------------------------------------------------------- expert usage ----
@dataclass
class UsageAccumulator:
    """Expert usage of one image (or request), summed over its own forward rows and steps."""

    num_layers: int
    num_experts: int
    num_tokens: int
    k: int
    token_sum: Optional[torch.Tensor] = None  # [n_layers, L] selected experts summed over rows
    load_sum: Optional[torch.Tensor] = None  # [n_layers, E]
    histogram_sum: Optional[torch.Tensor] = None  # [n_layers, E + 1] tokens that used 0..E experts
    rows: int = 0
    step_selected: list[int] = field(default_factory=list)  # selected pairs in each step
    step_slots: list[int] = field(default_factory=list)  # (layer, row, token) slots in each step

    def add(self, counts: torch.Tensor, rows: int) -> None:
        """One step of this image or request: counts [n_layers, L + E] (`usage_by_image`, summed over
        its images) from `rows` forward rows."""
        load_end = self.num_tokens + self.num_experts
        tokens, load, histogram = counts[:, :self.num_tokens], counts[:, self.num_tokens:load_end], counts[:, load_end:]
        self.token_sum = tokens if self.token_sum is None else self.token_sum + tokens
        self.load_sum = load if self.load_sum is None else self.load_sum + load
        self.histogram_sum = histogram if self.histogram_sum is None else self.histogram_sum + histogram
        self.rows += rows
        self.step_selected.append(int(tokens.sum()))
        self.step_slots.append(self.num_layers * rows * self.num_tokens)

    def mean_so_far(self) -> float:
        """Mean experts per token over the steps added so far."""
        slots = sum(self.step_slots)
        return sum(self.step_selected) / slots if slots else 0.0

    def summary(self) -> dict:
        """The `expert_usage` object of the HTTP answer (docs/design.md, "Serving")."""
        if self.token_sum is None or self.rows == 0:
            zeros = [0.0] * self.num_layers
            return {"num_moe_layers": self.num_layers, "num_experts": self.num_experts, "nominal_k": self.k,
                    "mean_experts_per_token": 0.0, "activated_pairs": 0, "nominal_pairs": 0,
                    "per_layer": [{"mean_experts_per_token": z, "expert_load": [0] * self.num_experts} for z in zeros],
                    "per_step": [], "token_map": [], "experts_per_token_histogram": [0.0] * (self.num_experts + 1)}
        per_token = self.token_sum.float() / self.rows  # [n_layers, L]
        grid = int(round(self.num_tokens**0.5))
        activated = int(self.token_sum.sum())
        return {
            "num_moe_layers": self.num_layers,
            "num_experts": self.num_experts,
            "nominal_k": self.k,
            "mean_experts_per_token": float(per_token.mean()),
            "activated_pairs": activated,
            "nominal_pairs": self.rows * self.num_tokens * self.k * self.num_layers,
            "per_layer": [{"mean_experts_per_token": float(per_token[i].mean()),
                           "expert_load": [int(v) for v in self.load_sum[i]]} for i in range(self.num_layers)],
            "per_step": [round(a / b, 4) if b else 0.0 for a, b in zip(self.step_selected, self.step_slots)],
            "token_map": per_token.mean(0).view(grid, grid).tolist(),
            "experts_per_token_histogram": (self.histogram_sum.sum(0).double() / self.histogram_sum.sum()).tolist(),
        }


def new_usage(model: RaceDiT) -> UsageAccumulator:
    moe = model.config.moe
    return UsageAccumulator(num_layers=len(model.moe_layers), num_experts=moe.num_experts if moe else 0,
                            num_tokens=model.config.num_tokens, k=moe.k if moe else 0)


class ObjectiveError(ValueError):
    """The model predicts something these samplers cannot integrate (DiT's DDPM noise)."""


def require_flow_model(config: ModelConfig) -> None:
    """Refuse a checkpoint whose network does not predict rectified-flow velocity."""
    objective = config.objective
    if objective != "rectified_flow":
        raise ObjectiveError(
            f"this checkpoint predicts {objective!r} (imported from DiT), but racedit samples rectified-flow "
            "velocity: fine-tune it first with `racedit train --config CONFIG --init CHECKPOINT` (docs/latents.md)")


# -------------------------------------------------------------- generate ----
@torch.no_grad()
def generate(model: RaceDiT, labels: Sequence[int], cfg_scale: Union[float, Sequence[float]] = 4.0,
             num_steps: int = 25, seeds: Optional[Sequence[int]] = None, sampler: str = "euler",
             as_float: bool = False, expert_budget: Union[float, Sequence[float]] = 1.0,
             ) -> tuple[torch.Tensor, list[dict]]:
    """Images uint8 [N, 3, H, W] and per-image expert usage (the `expert_usage` dicts).

    `as_float` returns the final fp32 samples [N, C, H, W] as the sampler ends them instead
    (what the server's `npy` output format carries). `expert_budget` (per image or one for all)
    scales the experts per token through the checkpoint's budget table; 1.0 is the learned routing.

    Each image's noise comes from its own seed, and threshold routing makes every
    row independent, so an image never depends on what else is in the batch.
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler must be 'euler' or 'heun', got {sampler!r}")
    require_flow_model(model.config)
    model.eval()
    anchor = next(iter(model.parameters()), None)
    if anchor is None:
        anchor = next(iter(model.buffers()), torch.zeros(()))
    device = anchor.device  # latents and timesteps stay fp32 whatever the parameters' dtype
    n = len(labels)
    seeds = list(seeds) if seeds is not None else list(range(n))
    scales = [float(cfg_scale)] * n if isinstance(cfg_scale, (int, float)) else [float(s) for s in cfg_scale]
    budgets = [float(expert_budget)] * n if isinstance(expert_budget, (int, float)) else [float(b) for b in expert_budget]
    if len(seeds) != n or len(scales) != n or len(budgets) != n:
        raise ValueError("labels, seeds, cfg_scale and expert_budget must have the same length")
    thresholds = None
    if any(b != 1.0 for b in budgets):
        from .calibrate import budget_thresholds

        thresholds = budget_thresholds(model, budgets).to(device)
    cfg = model.config
    x = torch.stack([initial_noise(s, (cfg.in_channels, cfg.image_size, cfg.image_size)) for s in seeds]).to(device)
    y = torch.tensor(list(labels), dtype=torch.long, device=device)
    s = torch.tensor(scales, device=device)
    usage = [new_usage(model) for _ in range(n)]
    rows = [1 if scale == 1.0 else 2 for scale in scales]
    grid = time_grid(num_steps)

    def velocity(x_now: torch.Tensor, t_now: float) -> torch.Tensor:
        t = torch.full((n,), t_now, device=device)
        v, ept, load, owner = guided_velocity(model, x_now, t, y, s, thresholds)
        counts = usage_by_image(ept, load, owner, n).cpu()
        for i in range(n):
            usage[i].add(counts[:, i], rows[i])
        return v

    for t_now, t_next in zip(grid[:-1], grid[1:]):
        v = velocity(x, t_now)
        tn = torch.full((n,), t_now, device=device)
        tn1 = torch.full((n,), t_next, device=device)
        if sampler == "heun" and t_next > 0:
            x_pred = euler_update(x, v, tn, tn1)
            v = 0.5 * (v + velocity(x_pred, t_next))
        x = euler_update(x, v, tn, tn1)
    return (x.float().cpu() if as_float else to_uint8(x)), [u.summary() for u in usage]

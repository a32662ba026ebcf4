"""Which experts did the work: routing counts of a forward summed per image, per request and per step.

The engine and `generate` account alike: after each model evaluation, `usage_by_image` turns the
forward's routing statistics into one tensor of counts per image (one copy to the host), and a
`UsageAccumulator` per image or request sums them. `UsageAccumulator.summary()` gives a
`UsageSummary`; the server turns it into the wire model (`racedit_client.models.ExpertUsage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig


def usage_by_image(
    experts_per_token: torch.Tensor, expert_load: torch.Tensor, owner: torch.Tensor, num_images: int
) -> torch.Tensor:
    """One step's routing counts summed over each image's rows, in one tensor (one copy to the host).

    experts_per_token [n_layers, R, L], expert_load [n_layers, R, E], owner [R] -> [n_layers, N, L + E + E + 1]
    int64: per token the experts it used, per expert its tokens, and how many tokens used 0..E experts.
    """
    num_experts = expert_load.shape[2]
    histogram = F.one_hot(experts_per_token.to(torch.int64).clamp(max=num_experts), num_experts + 1).sum(2)
    per_row = torch.cat([experts_per_token.to(torch.int64), expert_load.to(torch.int64), histogram], dim=2)
    out = per_row.new_zeros(per_row.shape[0], num_images, per_row.shape[2])
    return out.index_add_(1, owner.to(per_row.device), per_row)


@dataclass
class LayerSummary:
    mean_experts_per_token: float
    expert_load: list[int]  # tokens routed to each expert, over all steps and rows


@dataclass
class UsageSummary:
    """Expert usage of one image or request (the fields of the wire's `expert_usage`)."""

    num_moe_layers: int
    num_experts: int
    nominal_k: int
    mean_experts_per_token: float
    activated_pairs: int  # (token, expert) pairs computed
    nominal_pairs: int  # pairs fixed top-k routing would have computed
    per_layer: list[LayerSummary]
    per_step: list[float]  # mean experts per token at each model evaluation, from t = 1 to t = 0
    token_map: list[list[float]]  # (H/p) x (W/p) mean experts per token over layers and steps
    experts_per_token_histogram: list[float]  # shares of (layer, token, step) slots using 0..E experts


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

    @classmethod
    def for_model(cls, config: ModelConfig) -> UsageAccumulator:
        moe = config.moe
        return cls(
            num_layers=config.num_moe_layers,
            num_experts=moe.num_experts if moe else 0,
            num_tokens=config.num_tokens,
            k=moe.k if moe else 0,
        )

    def add(self, counts: torch.Tensor, rows: int) -> None:
        """One step of this image or request: counts [n_layers, L + E + E + 1] (`usage_by_image`, summed
        over its images) from `rows` forward rows."""
        load_end = self.num_tokens + self.num_experts
        tokens, load, histogram = (
            counts[:, : self.num_tokens],
            counts[:, self.num_tokens : load_end],
            counts[:, load_end:],
        )
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

    def summary(self) -> UsageSummary:
        if self.token_sum is None or self.rows == 0 or self.num_layers == 0:  # nothing routed (a dense network)
            grid = int(round(self.num_tokens**0.5))
            token_map = [[0.0] * grid for _ in range(grid)] if self.num_layers == 0 else []
            return UsageSummary(
                self.num_layers,
                self.num_experts,
                self.k,
                0.0,
                0,
                0,
                [LayerSummary(0.0, [0] * self.num_experts) for _ in range(self.num_layers)],
                [0.0] * len(self.step_slots),  # a dense network's steps: no expert ran
                token_map,
                [0.0] * (self.num_experts + 1),
            )
        per_token = self.token_sum.float() / self.rows  # [n_layers, L]
        grid = int(round(self.num_tokens**0.5))
        return UsageSummary(
            num_moe_layers=self.num_layers,
            num_experts=self.num_experts,
            nominal_k=self.k,
            mean_experts_per_token=float(per_token.mean()),
            activated_pairs=int(self.token_sum.sum()),
            nominal_pairs=self.rows * self.num_tokens * self.k * self.num_layers,
            per_layer=[
                LayerSummary(float(per_token[i].mean()), [int(v) for v in self.load_sum[i]])
                for i in range(self.num_layers)
            ],
            per_step=[round(a / b, 4) if b else 0.0 for a, b in zip(self.step_selected, self.step_slots)],
            token_map=per_token.mean(0).view(grid, grid).tolist(),
            experts_per_token_histogram=(self.histogram_sum.sum(0).double() / self.histogram_sum.sum()).tolist(),
        )

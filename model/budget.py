"""The compute dial at serving time: per-layer thresholds for an expert budget, from the table a
checkpoint carries (`budget_table` metadata, estimated by `racedit calibrate`, model/training).

Budget b asks for about b * k experts per token: each MoE layer routes with the threshold the
table gives for b, interpolated linearly between the table's budgets; b = 1.0 is the learned
thresholds exactly (the same bytes as no budget at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class BudgetTable:
    budgets: list[float]  # ascending, includes 1.0
    thresholds: list[list[float]]  # [n_budgets][n_moe_layers]

    @classmethod
    def from_metadata(cls, metadata: dict) -> Optional[BudgetTable]:
        """The table of a checkpoint's metadata (a loaded model's or its config.json's), if any."""
        record = metadata.get("budget_table")
        return cls(list(record["budgets"]), [list(row) for row in record["thresholds"]]) if record else None

    @property
    def range(self) -> tuple[float, float]:
        return self.budgets[0], self.budgets[-1]


def budget_range(table: Optional[BudgetTable]) -> tuple[float, float]:
    """The budgets served: the table's range, or 1.0 alone without a table."""
    return table.range if table is not None else (1.0, 1.0)


def thresholds_for(table: Optional[BudgetTable], learned: Sequence[float], budgets: Sequence[float]) -> torch.Tensor:
    """Per-layer thresholds [n_moe_layers, N] for N budgets, interpolated in `table`; budget 1.0 needs
    no table and gives the learned thresholds exactly."""
    learned_t = torch.tensor([float(v) for v in learned])
    columns = []
    for budget in budgets:
        if budget == 1.0:
            columns.append(learned_t)
            continue
        if table is None:
            raise ValueError(
                "this checkpoint has no budget table (racedit calibrate CHECKPOINT writes one); "
                "only expert_budget 1.0 is served"
            )
        grid, thresholds = table.budgets, torch.tensor(table.thresholds)  # [n_budgets, n_layers]
        if not grid[0] <= budget <= grid[-1]:
            raise ValueError(f"expert_budget {budget:g} is outside the calibrated range {grid[0]:g}..{grid[-1]:g}")
        upper = next(i for i, b in enumerate(grid) if b >= budget)
        lower = max(upper - 1, 0)
        share = 0.0 if grid[upper] == grid[lower] else (budget - grid[lower]) / (grid[upper] - grid[lower])
        columns.append(thresholds[lower] + share * (thresholds[upper] - thresholds[lower]))
    return torch.stack(columns, dim=1) if columns else learned_t.new_zeros(len(learned_t), 0)

"""Samplers: objects that integrate one request's images from noise to samples, one model evaluation
at a time, with their own per-request state. `generate()` and the serving engine drive them through
the same two calls, so the library and the service sample identically:

    sampler = make_sampler("heun", noise, time_grid(25))
    while not sampler.done:
        x, t = sampler.query()          # where the model is evaluated next: x [N, C, H, W], time t
        sampler.update(prediction)      # the guided prediction there; True when a step completed

Time runs from t = 1 (noise) to t = 0 (image); the prediction is the velocity dx/dt = eps - x_0 of
rectified flow. Updates stay fp32 whatever precision the network ran in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch


def time_grid(num_steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_N = 0, uniform."""
    return [1.0 - i / num_steps for i in range(num_steps + 1)]


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise of one image from a CPU generator seeded by its own seed (device-independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def euler_update(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next, in fp32 (the step dt rounded to fp32 first)."""
    dt = torch.tensor(t_next, dtype=torch.float32) - torch.tensor(t, dtype=torch.float32)
    return x.float() + dt.to(x.device) * v.float()


class Sampler(ABC):
    """One request's integration state: its current sample, time grid and step."""

    name: ClassVar[str]

    def __init__(self, x: torch.Tensor, grid: list[float]):
        self.x = x.float()  # [N, C, H, W] the current sample
        self.grid = grid
        self.step = 0  # steps completed

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @abstractmethod
    def query(self) -> tuple[torch.Tensor, float]:
        """Where the model is evaluated next: (x [N, C, H, W] fp32, t)."""

    @abstractmethod
    def update(self, prediction: torch.Tensor) -> bool:
        """Take the model's prediction at the last query; True when it completed a step."""


class Euler(Sampler):
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i): one evaluation per step."""

    name = "euler"

    def query(self) -> tuple[torch.Tensor, float]:
        return self.x, self.grid[self.step]

    def update(self, prediction: torch.Tensor) -> bool:
        self.x = euler_update(self.x, prediction, self.grid[self.step], self.grid[self.step + 1])
        self.step += 1
        return True


class Heun(Sampler):
    """Heun's second-order method: an Euler predictor, then the mean of the slopes at both ends
    (two evaluations per step; the last step, which ends at t = 0, is a plain Euler step)."""

    name = "heun"

    def __init__(self, x: torch.Tensor, grid: list[float]):
        super().__init__(x, grid)
        self.slope: torch.Tensor | None = None  # v at the step's start, while its predictor is evaluated
        self.predicted: torch.Tensor | None = None

    def query(self) -> tuple[torch.Tensor, float]:
        if self.slope is None:
            return self.x, self.grid[self.step]
        return self.predicted, self.grid[self.step + 1]

    def update(self, prediction: torch.Tensor) -> bool:
        t, t_next = self.grid[self.step], self.grid[self.step + 1]
        if self.slope is None and t_next > 0:
            self.slope, self.predicted = prediction, euler_update(self.x, prediction, t, t_next)
            return False
        v = prediction if self.slope is None else 0.5 * (self.slope + prediction)
        self.x = euler_update(self.x, v, t, t_next)
        self.slope = self.predicted = None
        self.step += 1
        return True


SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (Euler, Heun)}
DEFAULT_SAMPLER = "euler"


def make_sampler(name: str, x: torch.Tensor, grid: list[float]) -> Sampler:
    """A sampler by name, starting from noise x [N, C, H, W] on the time grid."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](x, grid)

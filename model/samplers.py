"""Samplers: objects that integrate one request's images from noise to samples, one model evaluation
at a time, with their own per-request state. `generate()` and the serving engine drive them through
the same two calls, so the library and the service sample identically:

    sampler = make_sampler("heun", noise, 25, conventions, generators)
    while not sampler.done:
        x, t = sampler.query()          # where the model is evaluated next: x [N, C, H, W], its time input t
        sampler.update(prediction)      # the guided prediction there; True when a step completed

Every sampler serves every family where its mathematics is defined (`Conventions.samplers`):

- `euler`, `heun`: the ODE dx/ds = v (velocity families: racedit, SiT, REPA).
- `ddim` (eta 0): x' = a' x0 + sigma' eps; on the linear path x = (1 - s) x0 + s eps that is Euler's
  update re-rounded; for noise families DiT's `ddim_sample` or diffusers' DDIMScheduler.
- `ddpm` (ancestral): the Gaussian posterior q(x' | x, x0) plus noise; DiT's `p_sample` or diffusers'
  DDPMScheduler, with the learned-range variance where the model has one.
- `dpmpp_2m`: DPM-Solver++(2M) in (alpha, sigma); diffusers' DPMSolverMultistepScheduler (dpmsolver++,
  order 2, midpoint) for the noise families.
- `sde_euler`: Euler–Maruyama of the reverse SDE, diffusion 2s, the last step its mean (SiT, REPA);
  velocity families only.

A velocity family's prediction is converted to x0 = x - s v and eps = x + (1 - s) v (SiT's network,
whose time runs the other way, predicts -v); a noise family's to x0 from its alpha_bar. Each
discrete sampler follows its reference's arithmetic (model/schedules.py), so it takes the very steps
the reference takes. Updates are fp32 and elementwise per image whatever precision the network ran
in; the stochastic samplers draw each image's noise from that image's own CPU generator
(`torch.Generator().manual_seed(seed + i)`, the one its initial noise came from), `randn((C, H, W))`
once per step that adds noise, in step order -- so a request's samples never depend on its batch-mates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Optional

import numpy as np
import torch

from .config import RACEDIT_CONVENTIONS, SAMPLER_NAMES, Conventions
from .denoiser import to_device
from .schedules import (
    diffusers_alphas_cumprod,
    diffusers_timesteps,
    dit_chain,
    f32,
    flow_grid,
    model_time,
    racedit_grid,
    sde_grid,
)


def time_grid(num_steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_N = 0, uniform (racedit's grid)."""
    return racedit_grid(num_steps)


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise of one image from a CPU generator seeded by its own seed (device-independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def start_noise(seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Each image's initial noise [N, C, H, W] and its generator, which the stochastic samplers draw on."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]), generators


def euler_update(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next, in fp32 (the step dt rounded to fp32 first). dt stays
    a 0-dim CPU tensor: a CUDA kernel takes it as a scalar argument, with no copy to the device."""
    dt = torch.tensor(t_next, dtype=torch.float32) - torch.tensor(t, dtype=torch.float32)
    return x.float() + dt * v.float()


class Sampler(ABC):
    """One request's integration state: its current sample, grid and step.

    `grid` holds each step boundary as s (1 noise, 0 data): the progress a stream reports and where
    a guidance interval is read; `times` what the network is given there (s itself for racedit)."""

    name: ClassVar[str]

    def __init__(
        self,
        x: torch.Tensor,
        grid: list[float],
        times: Optional[list[float]] = None,
        generators: Optional[list[torch.Generator]] = None,
        sign: float = 1.0,
    ):
        self.x = x.float()  # [N, C, H, W] the current sample
        self.grid = grid
        self.times = grid if times is None else times
        self.generators = generators
        self.sign = sign  # -1: the network's velocity is dx/d(1 - s) (SiT)
        self.step = 0  # steps completed

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def position(self) -> float:
        """s at the start of the current step: where a guidance interval is read (as REPA reads t_cur)."""
        return self.grid[self.step]

    def query_index(self) -> int:
        """The grid point the next evaluation is at."""
        return self.step

    def query(self) -> tuple[torch.Tensor, float]:
        """Where the model is evaluated next: (x [N, C, H, W] fp32, the network's time input)."""
        return self.x, self.times[self.query_index()]

    @abstractmethod
    def update(self, prediction: torch.Tensor) -> bool:
        """Take the model's prediction at the last query; True when it completed a step."""

    def velocity(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction if self.sign == 1.0 else -prediction.float()

    def clean(self, x: torch.Tensor, prediction: torch.Tensor, index: int) -> torch.Tensor:
        """The predicted clean sample x0 at grid point `index` (stream previews): x - s v."""
        return x.float() - self.grid[index] * self.velocity(prediction).float()

    def noise(self) -> torch.Tensor:
        """The next noise of every image, each from its own generator: [N, C, H, W] on the sample's device."""
        if self.generators is None:
            raise ValueError(f"the {self.name} sampler adds noise: give it each image's generator")
        shape = tuple(self.x.shape[1:])
        return to_device(torch.stack([torch.randn(shape, generator=g) for g in self.generators]), self.x.device)


# ------------------------------------------------------------------ ODE, SDE ----
class Euler(Sampler):
    """x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i): one evaluation per step."""

    name = "euler"

    def update(self, prediction: torch.Tensor) -> bool:
        self.x = euler_update(self.x, self.velocity(prediction), self.grid[self.step], self.grid[self.step + 1])
        self.step += 1
        return True


class Heun(Sampler):
    """Heun's second-order method: an Euler predictor, then the mean of the slopes at both ends
    (two evaluations per step; the last step, which ends at s = 0, is a plain Euler step)."""

    name = "heun"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slope: Optional[torch.Tensor] = None  # v at the step's start, while its predictor is evaluated
        self.predicted: Optional[torch.Tensor] = None

    def query_index(self) -> int:
        return self.step if self.slope is None else self.step + 1

    def query(self) -> tuple[torch.Tensor, float]:
        return (self.x if self.slope is None else self.predicted), self.times[self.query_index()]

    def update(self, prediction: torch.Tensor) -> bool:
        t, t_next = self.grid[self.step], self.grid[self.step + 1]
        prediction = self.velocity(prediction)
        if self.slope is None and t_next > 0:
            self.slope, self.predicted = prediction, euler_update(self.x, prediction, t, t_next)
            return False
        v = prediction if self.slope is None else 0.5 * (self.slope + prediction)
        self.x = euler_update(self.x, v, t, t_next)
        self.slope = self.predicted = None
        self.step += 1
        return True


class SDEEuler(Sampler):
    """Euler–Maruyama of the reverse-time SDE of the linear path with diffusion w(s) = 2s (SiT's
    "sigma" form, REPA's `compute_diffusion`): the score from the velocity, score = ((s - 1) v - x) / s,
    the drift d = v - (w / 2) score, then x' = x + d ds + sqrt(w) sqrt(|ds|) z; the last step (from
    s = 0.04 to 0) is the mean x + d ds and adds no noise. One evaluation per step."""

    name = "sde_euler"

    def update(self, prediction: torch.Tensor) -> bool:
        s, s_next = self.grid[self.step], self.grid[self.step + 1]
        v, x = self.velocity(prediction).float(), self.x
        ratio = -(1.0 - s)  # alpha / d(alpha)/ds with alpha = 1 - s
        score = (ratio * v - x) / (s * s - ratio * s)  # (ratio v - x) / var, var = s^2 - ratio * s
        diffusion = 2.0 * s
        drift = v - (0.5 * diffusion) * score
        dt = s_next - s
        if s_next > 0:
            self.x = x + drift * dt + diffusion**0.5 * (self.noise() * abs(dt) ** 0.5)
        else:
            self.x = x + dt * drift
        self.step += 1
        return True


# ------------------------------------------------------------- DDIM, DDPM, DPM ----
def split_noise(prediction: torch.Tensor, channels: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A noise network's eps and, when it has one, its learned-range variance (the second half)."""
    prediction = prediction.float()
    if prediction.shape[1] == 2 * channels:
        return prediction[:, :channels], prediction[:, channels:]
    return prediction, None


class ChainSampler(Sampler):
    """A sampler over the noise levels x = alpha x0 + sigma eps of a family's path. `kind` says whose
    arithmetic: "flow" (a = 1 - s, sigma = s, coefficients in float64), "dit" or "diffusers" (their
    discrete chains, model/schedules.py)."""

    def __init__(self, x, grid, times, generators, sign, kind: str, clip: Optional[float] = None):
        super().__init__(x, grid, times, generators, sign)
        self.kind, self.clip = kind, clip
        self.alpha_bar: list[float] = []  # per grid point, for previews (discrete kinds)

    def x0_eps(self, x: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A velocity family's x0 and eps at the current step's start."""
        s = self.grid[self.step]
        v = self.velocity(prediction).float()
        return x - s * v, x + (1.0 - s) * v

    def clean(self, x: torch.Tensor, prediction: torch.Tensor, index: int) -> torch.Tensor:
        if self.kind == "flow":
            return super().clean(x, prediction, index)
        eps, _ = split_noise(prediction, x.shape[1])
        bar = self.alpha_bar[index]
        return (x.float() - (1 - bar) ** 0.5 * eps) / bar**0.5


class DDIM(ChainSampler):
    """DDIM with eta 0: x0 and eps from the prediction, then x' = sqrt(alpha_bar') x0 + sqrt(1 - alpha_bar') eps."""

    name = "ddim"

    def __init__(self, x, grid, times, generators, sign, kind, clip=None, coefficients=None):
        super().__init__(x, grid, times, generators, sign, kind, clip)
        self.coefficients = coefficients  # per step, the kind's fp32 scalars

    def update(self, prediction: torch.Tensor) -> bool:
        x = self.x
        if self.kind == "flow":
            x0, eps = self.x0_eps(x, prediction)
            s_next = self.grid[self.step + 1]
            self.x = (1.0 - s_next) * x0 + s_next * eps
        elif self.kind == "diffusers":  # DDIMScheduler.step, eta 0
            b, a, a_prev, d_prev = self.coefficients[self.step]
            eps, _ = split_noise(prediction, x.shape[1])
            x0 = (x - b * eps) / a
            if self.clip is not None:
                x0 = x0.clamp(-self.clip, self.clip)
            self.x = a_prev * x0 + d_prev * eps
        else:  # DiT's GaussianDiffusion.ddim_sample, eta 0 (no clipping)
            recip, recipm1, a_prev, d_prev = self.coefficients[self.step]
            eps, _ = split_noise(prediction, x.shape[1])
            x0 = recip * x - recipm1 * eps
            eps = (recip * x - x0) / recipm1
            self.x = x0 * a_prev + d_prev * eps
        self.step += 1
        return True


class DDPM(ChainSampler):
    """Ancestral sampling: the posterior mean of q(x' | x, x0) from the predicted x0, plus its standard
    deviation times fresh noise (none on the step that ends at the data). The variance is the model's
    learned range between the posterior variance and beta where it predicts one, else the reference's
    fixed one (diffusers: the posterior's; DiT: beta, its "fixed large"; velocity families: the posterior's)."""

    name = "ddpm"

    def __init__(self, x, grid, times, generators, sign, kind, clip=None, coefficients=None):
        super().__init__(x, grid, times, generators, sign, kind, clip)
        self.coefficients = coefficients

    def update(self, prediction: torch.Tensor) -> bool:
        x = self.x
        if self.kind == "flow":
            c1, c2, std = self.coefficients[self.step]
            x0, _ = self.x0_eps(x, prediction)
            mean = c1 * x0 + c2 * x
            self.x = mean + std * self.noise() if std > 0 else mean
        elif self.kind == "diffusers":  # DDPMScheduler.step
            b, a, c1, c2, variance, beta, noisy = self.coefficients[self.step]
            eps, learned = split_noise(prediction, x.shape[1])
            x0 = (x - b * eps) / a
            if self.clip is not None:
                x0 = x0.clamp(-self.clip, self.clip)
            mean = c1 * x0 + c2 * x
            if noisy:
                z = self.noise()
                if learned is not None:
                    frac = (learned + 1) / 2
                    log_variance = frac * torch.log(beta) + (1 - frac) * torch.log(variance)
                    mean = mean + torch.exp(0.5 * log_variance) * z
                else:
                    mean = mean + (variance**0.5) * z
            self.x = mean
        else:  # DiT's p_sample
            recip, recipm1, c1, c2, min_log, max_log, noisy = self.coefficients[self.step]
            eps, learned = split_noise(prediction, x.shape[1])
            x0 = recip * x - recipm1 * eps
            mean = c1 * x0 + c2 * x
            if noisy:  # min_log: the posterior's (clipped) log variance, or DiT's fixed one without a learned range
                if learned is None:
                    log_variance = min_log
                else:
                    frac = (learned + 1) / 2
                    log_variance = frac * max_log + (1 - frac) * min_log
                mean = mean + torch.exp(0.5 * log_variance) * self.noise()
            self.x = mean
        self.step += 1
        return True


class DPMSolver2M(ChainSampler):
    """DPM-Solver++(2M) (Lu et al. 2022), the data-prediction multistep solver in lambda = log(a / sigma):
    first order on the first step and on the step that ends at the data, second order (midpoint) between,
    as diffusers' DPMSolverMultistepScheduler with its defaults."""

    name = "dpmpp_2m"

    def __init__(self, x, grid, times, generators, sign, kind, clip=None, levels=None):
        super().__init__(x, grid, times, generators, sign, kind, clip)
        self.levels = levels  # per grid point: (alpha, sigma, lambda) as fp32 0-dim tensors
        self.previous: Optional[torch.Tensor] = None  # the last step's x0

    def update(self, prediction: torch.Tensor) -> bool:
        x, i = self.x, self.step
        alpha_s, sigma_s, lambda_s = self.levels[i]
        alpha_t, sigma_t, lambda_t = self.levels[i + 1]
        if self.kind == "flow":
            x0, _ = self.x0_eps(x, prediction)
        else:
            eps, _ = split_noise(prediction, x.shape[1])
            x0 = (x - sigma_s * eps) / alpha_s
        h = lambda_t - lambda_s
        decay = alpha_t * (torch.exp(-h) - 1.0)
        if self.previous is None or i == self.num_steps - 1:
            self.x = (sigma_t / sigma_s) * x - decay * x0
        else:
            r = (lambda_s - self.levels[i - 1][2]) / h
            d1 = (1.0 / r) * (x0 - self.previous)
            self.x = (sigma_t / sigma_s) * x - decay * x0 - 0.5 * decay * d1
        self.previous = x0
        self.step += 1
        return True


SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (Euler, Heun, DDIM, DDPM, DPMSolver2M, SDEEuler)}
assert tuple(SAMPLERS) == SAMPLER_NAMES
DEFAULT_SAMPLER = "euler"  # racedit's own; a published family's is its conventions' default_sampler


# ----------------------------------------------------------------- building ----
def make_sampler(
    name: str,
    x: torch.Tensor,
    num_steps: int,
    conventions: Conventions = RACEDIT_CONVENTIONS,
    generators: Optional[list[torch.Generator]] = None,
) -> Sampler:
    """A sampler by name for a family, starting from noise x [N, C, H, W] (on any device), `num_steps`
    steps; `generators` (one per image, CPU) feed the stochastic samplers."""
    if name not in conventions.samplers:
        raise ValueError(
            f"sampler must be one of {', '.join(conventions.samplers)} for this {conventions.family} model, "
            f"got {name!r}"
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if conventions.discrete:
        return _discrete(name, x, num_steps, conventions, generators)
    sign = -1.0 if conventions.time == "noise_at_0" else 1.0
    grid = sde_grid(num_steps) if name == "sde_euler" else flow_grid(conventions, num_steps)
    times = grid if conventions.family == "racedit" else [model_time(conventions, s) for s in grid]
    if name in ("euler", "heun", "sde_euler"):
        return SAMPLERS[name](x, grid, times, generators, sign)
    if name == "ddim":
        return DDIM(x, grid, times, generators, sign, "flow")
    if name == "ddpm":
        return DDPM(x, grid, times, generators, sign, "flow", coefficients=_flow_posterior(grid))
    levels = [_levels(1.0 - s, s) for s in grid]
    return DPMSolver2M(x, grid, times, generators, sign, "flow", levels=levels)


def _levels(alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, s = f32(alpha), f32(sigma)
    return a, s, torch.log(a) - torch.log(s)


def _flow_posterior(grid: list[float]) -> list[tuple[float, float, float]]:
    """q(x_p | x_t, x0) on x = (1 - s) x0 + s eps: (mean coefficient of x0, of x_t, standard deviation)."""
    out = []
    for s, p in zip(grid[:-1], grid[1:]):
        a_t, a_p = 1.0 - s, 1.0 - p
        ratio = a_t / a_p  # alpha_{t|p}
        var_tp = s * s - ratio * ratio * p * p  # sigma^2_{t|p}
        out.append((a_p * var_tp / (s * s), ratio * p * p / (s * s), (var_tp * p * p / (s * s)) ** 0.5))
    return out


def _discrete(name, x, num_steps, conventions, generators) -> Sampler:
    schedule = conventions.schedule
    total = schedule.num_train_timesteps
    clip = schedule.clip_sample_range
    if schedule.arithmetic == "dit":
        chain = dit_chain(schedule, num_steps)
        n = len(chain.timestep_map)
        times = [float(chain.timestep_map[j]) for j in reversed(range(n))]
        grid = [t / total for t in times] + [0.0]
        bars = [float(chain.alphas_cumprod[j]) for j in reversed(range(n))] + [1.0]
        if name == "dpmpp_2m":
            levels = [_levels(bar**0.5, (1 - bar) ** 0.5) for bar in bars[:-1]] + [_levels(1.0, 0.0)]
            sampler = DPMSolver2M(x, grid, times, generators, 1.0, "dit", levels=levels)
        elif name == "ddim":
            coefficients = []
            for j in reversed(range(n)):
                prev = f32(chain.alphas_cumprod_prev[j])  # fp32, then sqrt in fp32 as DiT does
                coefficients.append(
                    (
                        f32(chain.sqrt_recip_alphas_cumprod[j]),
                        f32(chain.sqrt_recipm1_alphas_cumprod[j]),
                        torch.sqrt(prev),
                        torch.sqrt(1 - prev - 0.0),
                    )
                )
            sampler = DDIM(x, grid, times, generators, 1.0, "dit", coefficients=coefficients)
        else:
            learned = conventions.prediction == "noise_learned_range"
            fixed = chain.posterior_log_variance_clipped if learned else chain.fixed_large_log_variance
            coefficients = [
                (
                    f32(chain.sqrt_recip_alphas_cumprod[j]),
                    f32(chain.sqrt_recipm1_alphas_cumprod[j]),
                    f32(chain.posterior_mean_coef1[j]),
                    f32(chain.posterior_mean_coef2[j]),
                    f32(fixed[j]),
                    f32(np.log(chain.betas[j])),
                    j != 0,
                )
                for j in reversed(range(n))
            ]
            sampler = DDPM(x, grid, times, generators, 1.0, "dit", coefficients=coefficients)
        sampler.alpha_bar = bars
        return sampler
    bars32 = diffusers_alphas_cumprod(schedule)
    one = torch.tensor(1.0)
    steps = diffusers_timesteps(schedule, num_steps, multistep=name == "dpmpp_2m")
    times = [float(t) for t in steps]
    grid = [t / total for t in steps] + [0.0]
    if name == "ddim":
        coefficients, bars = [], []
        final = one if schedule.set_alpha_to_one else bars32[0]
        for t in steps:
            prev_t = t - total // num_steps
            bar, prev = bars32[t], (bars32[prev_t] if prev_t >= 0 else final)
            std = 0.0 * ((1 - prev) / (1 - bar) * (1 - bar / prev)) ** 0.5  # eta 0
            coefficients.append(((1 - bar) ** 0.5, bar**0.5, prev**0.5, (1 - prev - std**2) ** 0.5))
            bars.append(float(bar))
        sampler = DDIM(x, grid, times, generators, 1.0, "diffusers", clip, coefficients=coefficients)
    elif name == "ddpm":
        coefficients, bars = [], []
        for k, t in enumerate(steps):
            prev_t = steps[k + 1] if k + 1 < len(steps) else -1
            bar, prev = bars32[t], (bars32[prev_t] if prev_t >= 0 else one)
            current_alpha = bar / prev
            current_beta = 1 - current_alpha
            variance = torch.clamp((1 - prev) / (1 - bar) * (1 - bar / prev), min=1e-20)
            coefficients.append(
                (
                    (1 - bar) ** 0.5,
                    bar**0.5,
                    (prev**0.5 * current_beta) / (1 - bar),
                    current_alpha**0.5 * (1 - prev) / (1 - bar),
                    variance,
                    1 - bar / prev,
                    t > 0,
                )
            )
            bars.append(float(bar))
        sampler = DDPM(x, grid, times, generators, 1.0, "diffusers", clip, coefficients=coefficients)
    else:
        sigmas32 = ((1 - bars32) / bars32) ** 0.5
        levels, bars = [], []
        for sigma in [sigmas32[t] for t in steps] + [torch.tensor(0.0)]:
            alpha = 1 / ((sigma**2 + 1) ** 0.5)
            sigma_t = sigma * alpha
            levels.append((alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)))
            bars.append(float(alpha) ** 2)
        sampler = DPMSolver2M(x, grid, times, generators, 1.0, "diffusers", levels=levels)
        sampler.alpha_bar = bars
        return sampler
    sampler.alpha_bar = bars + [1.0]
    return sampler

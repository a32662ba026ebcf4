"""Where a sampler's steps fall: the time grids of the velocity families and the discrete DDPM chains
of the noise-prediction families (model/config.py `NoiseSchedule`), each in the arithmetic of the
family's own reference, so that a racedit sampler takes the very steps the reference takes.

- Velocity families (racedit, SiT, REPA) live on the linear path x = (1 - s) x0 + s eps, s = 1 at
  noise. racedit's own grid is `1 - i / n`; the published families' is `torch.linspace(1, 0, n + 1)`
  in float64 (REPA's samplers.py; SiT's fp32 grid over its reversed time is the same points), and the
  SDE's is `linspace(1, 0.04, n)` followed by 0 (the last step is a mean step of size 0.04).
- "dit" chains are facebookresearch/DiT's GaussianDiffusion: betas in float64, respaced to n steps by
  `space_timesteps` (the strides rounded half to even, as Python's round does), every product in float64
  and rounded to fp32 only where it meets a sample.
- "diffusers" chains are what diffusers' DDIMScheduler, DDPMScheduler and DPMSolverMultistepScheduler
  compute from the folder's scheduler config: fp32 betas and cumulative products, the config's
  `timestep_spacing` (and `steps_offset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import Conventions, NoiseSchedule

SDE_LAST_STEP = 0.04  # SiT's last_step_size and REPA's last grid point before 0


def racedit_grid(num_steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_N = 0, uniform: racedit's own grid."""
    return [1.0 - i / num_steps for i in range(num_steps + 1)]


def linspace_grid(num_steps: int) -> list[float]:
    """The published velocity families' grid: torch.linspace(1, 0, n + 1) in float64."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


def sde_grid(num_steps: int) -> list[float]:
    """Euler–Maruyama's grid: n evaluations at linspace(1, 0.04, n), then the mean step to 0."""
    return torch.linspace(1.0, SDE_LAST_STEP, num_steps, dtype=torch.float64).tolist() + [0.0]


def flow_grid(conventions: Conventions, num_steps: int) -> list[float]:
    """The ODE grid of a velocity family."""
    return racedit_grid(num_steps) if conventions.family == "racedit" else linspace_grid(num_steps)


def model_time(conventions: Conventions, s: float) -> float:
    """The time a velocity family's network is given at s (1 noise, 0 data): s, or SiT's 1 - s."""
    return 1.0 - s if conventions.time == "noise_at_0" else s


# --------------------------------------------------------------- diffusers --
def diffusers_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """fp32 cumulative products of 1 - beta, as diffusers' schedulers compute them."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    elif schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = torch.tensor(cosine_betas(n), dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_betas(n: int, max_beta: float = 0.999) -> list[float]:
    """Glide's squaredcos_cap_v2 betas (diffusers' and guided-diffusion's betas_for_alpha_bar)."""
    bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - bar((i + 1) / n) / bar(i / n), max_beta) for i in range(n)]


def diffusers_timesteps(schedule: NoiseSchedule, num_steps: int, multistep: bool = False) -> list[int]:
    """The timesteps diffusers' DDIM/DDPM schedulers (`multistep`: DPMSolverMultistep's) take for n steps."""
    total, spacing = schedule.num_train_timesteps, schedule.multistep_spacing if multistep else schedule.spacing
    if num_steps > total:
        raise ValueError(f"num_steps {num_steps} is more than the chain's {total} timesteps")
    count = num_steps + 1 if multistep else num_steps  # DPMSolverMultistep drops the last of n + 1 points
    if spacing == "linspace":
        points = np.linspace(0, total - 1, count).round()[::-1]
        steps = points[:-1] if multistep else points
    elif spacing == "leading":
        ratio = total // count if multistep else total // num_steps
        points = (np.arange(0, count) * ratio).round()[::-1]
        steps = (points[:-1] if multistep else points) + schedule.steps_offset
    else:  # trailing
        steps = np.round(np.arange(total, 0, -total / num_steps)) - 1
    return [int(t) for t in steps.astype(np.int64)]


# --------------------------------------------------------------------- DiT --
def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """DiT's respacing of one section: `count` timesteps of 0..num_timesteps - 1 at a fractional stride,
    each rounded (half to even, Python's round) from a running float sum."""
    if count > num_timesteps:
        raise ValueError(f"num_steps {count} is more than the chain's {num_timesteps} timesteps")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class DiTChain:
    """DiT's respaced GaussianDiffusion (float64 arrays indexed by the respaced step j = 0..n-1)."""

    timestep_map: list[int]  # j -> the original timestep the network is given
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    fixed_large_log_variance: np.ndarray  # DiT's variance of a network without a learned one (sigma_small False)


def dit_betas(schedule: NoiseSchedule) -> np.ndarray:
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return np.linspace(schedule.beta_start, schedule.beta_end, n, dtype=np.float64)
    if schedule.beta_schedule == "scaled_linear":  # DiT's "quad"
        return np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=np.float64) ** 2
    return np.array(cosine_betas(n), dtype=np.float64)


def dit_chain(schedule: NoiseSchedule, num_steps: int) -> DiTChain:
    """DiT's `create_diffusion(str(num_steps))` over the schedule: the kept timesteps and the respaced betas
    1 - alpha_bar_t / alpha_bar_previous_kept, then GaussianDiffusion's arrays."""
    base = np.cumprod(1.0 - dit_betas(schedule), axis=0)
    kept = set(space_timesteps(schedule.num_train_timesteps, num_steps))
    last, betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(base):
        if i in kept:
            betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    betas = np.array(betas, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    clipped = (
        np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        if len(posterior_variance) > 1
        else np.log(np.maximum(posterior_variance, 1e-20))  # one step: it adds no noise
    )
    large = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
    return DiTChain(
        timestep_map=timestep_map,
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=clipped,
        posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        fixed_large_log_variance=np.log(large),
    )


def f32(value) -> torch.Tensor:
    """A float64 coefficient as the 0-dim fp32 tensor it becomes where it meets a sample (DiT's
    `_extract_into_tensor`)."""
    return torch.tensor(float(value), dtype=torch.float64).float()

"""The published families' reference samplers, re-expressed for the parity tests (tests/model/test_families.py).

facebookresearch/DiT, willisma/SiT and sihyun-yu/REPA are not packages, so their samplers cannot be
imported. What follows is written from their published definitions -- DiT's GaussianDiffusion
(Nichol & Dhariwal's learned-range variance, the respacing of `space_timesteps`, `forward_with_cfg`),
SiT's transport (the linear interpolant, Euler ODE on torchdiffeq's fixed grid, Euler–Maruyama with
the "sigma" diffusion and a last mean step), REPA's `euler_sampler` and `euler_maruyama_sampler` --
in each reference's own arithmetic (DiT: float64 tables read into fp32; SiT: fp32; REPA: float64), not
copied from their code and independent of racedit's samplers (nothing here imports racedit). Every
noise the references draw from a global RNG is given instead, one tensor per stochastic step, the
same the racedit sampler draws from the image's generator.

A `net(x, t, y)` is a network as the family's code calls it: x [B, C, H, W], t [B], y [B] -> [B, C', H, W].
"""

from __future__ import annotations

import numpy as np
import torch


# ----------------------------------------------------------------------- DiT --
def dit_respaced_steps(total: int, count: int) -> list[int]:
    """The timesteps DiT keeps of `total` for `count` sampling steps (one section): a fractional stride
    (total - 1) / (count - 1) summed in floating point and rounded half to even."""
    stride = (total - 1) / (count - 1) if count > 1 else 1
    kept, at = set(), 0.0
    for _ in range(count):
        kept.add(round(at))
        at += stride
    return sorted(kept)


def dit_tables(count: int, total: int = 1000) -> dict[str, np.ndarray]:
    """DiT's respaced diffusion: linear betas 1e-4..0.02 (float64), kept timesteps, and the posterior's tables."""
    base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, total, dtype=np.float64))
    kept = dit_respaced_steps(total, count)
    betas, previous = [], 1.0
    for t in kept:
        betas.append(1.0 - base[t] / previous)
        previous = base[t]
    betas = np.array(betas)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "kept": np.array(kept),
        "recip": np.sqrt(1.0 / abar),
        "recipm1": np.sqrt(1.0 / abar - 1.0),
        "coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        "min_log": np.log(np.concatenate([[post_var[1]], post_var[1:]])),  # clipped at t = 0
        "max_log": np.log(betas),
    }


def dit_forward_with_cfg(net, x, t, y, null: int, scale: float, channels: int = 3) -> torch.Tensor:
    """DiT's guided output for the conditional half: the first `channels` channels guided, the rest (the
    other noise channels and the variance) the conditional row's."""
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = out.chunk(2)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


@torch.no_grad()
def dit_p_sample_loop(net, noise, y, null, scale, count, step_noises) -> torch.Tensor:
    """DiT's ancestral sampling with learned-range variance over `count` respaced steps (clip_denoised
    False), fp32 samples, tables read from float64; `step_noises[k]` is the noise of the k-th noisy step."""
    tables = dit_tables(count)
    at = lambda name, i: torch.tensor(tables[name][i]).float()
    x, c = noise.float(), noise.shape[1]
    noises = iter(step_noises)
    for i in reversed(range(len(tables["kept"]))):
        t = torch.full((x.shape[0],), int(tables["kept"][i]), dtype=torch.long)
        out = dit_forward_with_cfg(net, x, t, y, null, scale)
        eps, var = out[:, :c], out[:, c:]
        x0 = at("recip", i) * x - at("recipm1", i) * eps
        mean = at("coef_x0", i) * x0 + at("coef_xt", i) * x
        frac = (var + 1) / 2
        log_var = frac * at("max_log", i) + (1 - frac) * at("min_log", i)
        x = mean + torch.exp(0.5 * log_var) * next(noises) if i > 0 else mean
    return x


# ----------------------------------------------------------------------- SiT --
def sit_guided(net, x, t, y, null, scale, channels: int = 3) -> torch.Tensor:
    """SiT's forward_with_cfg (first 3 channels), conditional half; the network's output is SiT's velocity
    u = dx/dt with t = 0 at noise."""
    return dit_forward_with_cfg(net, x, t, y, null, scale, channels)


@torch.no_grad()
def sit_ode_euler(net, noise, y, null, scale, points: int) -> torch.Tensor:
    """SiT's `sample_ode(sampling_method="euler", num_steps=points)`: torchdiffeq's fixed-grid Euler over
    t = linspace(0, 1, points) in fp32 (velocity model, so t0 = 0, t1 = 1)."""
    t = torch.linspace(0, 1, points)
    x = noise.float()
    for k in range(points - 1):
        u = sit_guided(net, x, torch.full((x.shape[0],), float(t[k])), y, null, scale)
        x = x + (t[k + 1] - t[k]) * u
    return x


@torch.no_grad()
def sit_sde_euler(net, noise, y, null, scale, points: int, step_noises, last: float = 0.04) -> torch.Tensor:
    """SiT's `sample_sde` with sample.py's defaults: Euler–Maruyama over t = linspace(0, 1 - last, points)
    (fp32, constant dt = t[1] - t[0]), diffusion "sigma" (w = 1 - t), drift u + w * score with the linear
    path's score (t u - x) / (1 - t), noise sqrt(2 w) sqrt(dt) z; then the "Mean" last step of size `last`."""
    t = torch.linspace(0, 1 - last, points)
    dt = t[1] - t[0]
    x = noise.float()
    noises = iter(step_noises)

    def sde_drift(x, ti):
        u = sit_guided(net, x, torch.full((x.shape[0],), float(ti)), y, null, scale)
        score = (ti * u - x) / (1 - ti)
        return u + (1 - ti) * score

    for ti in t[:-1]:
        z = next(noises)
        mean = x + sde_drift(x, ti) * dt
        x = mean + torch.sqrt(2 * (1 - ti)) * (z * torch.sqrt(dt))
    return x + sde_drift(x, t[-1]) * last


# ---------------------------------------------------------------------- REPA --
def repa_guided(net, x, t, y, null, scale, low, high, to_drift=None):
    """REPA's guidance: both rows only where low <= t <= high (and scale > 1), on every channel of the
    drift; the network sees fp32 inputs and its output is read back as float64."""
    t_in = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    if scale > 1.0 and low <= t <= high:
        xx, yy, tt = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null)]), torch.cat([t_in, t_in])
    else:
        xx, yy, tt = x, y, t_in
    out = net(xx.float(), tt.float(), yy).double()
    d = to_drift(out, xx, tt) if to_drift is not None else out
    if xx.shape[0] != x.shape[0]:
        cond, uncond = d.chunk(2)
        d = uncond + scale * (cond - uncond)
    return d


@torch.no_grad()
def repa_euler(net, noise, y, null, scale, steps, low=0.0, high=1.0) -> torch.Tensor:
    """REPA's `euler_sampler` (ODE, float64 state, t = linspace(1, 0, steps + 1) with t = 1 at noise)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for k in range(steps):
        d = repa_guided(net, x, t[k], y, null, scale, low, high)
        x = x + (t[k + 1] - t[k]) * d
    return x


@torch.no_grad()
def repa_euler_maruyama(net, noise, y, null, scale, steps, step_noises, low=0.0, high=1.0) -> torch.Tensor:
    """REPA's `euler_maruyama_sampler`: t = linspace(1, 0.04, steps) then 0 (float64); diffusion 2t; the score
    of the linear path x = (1 - t) x0 + t eps from the velocity; drift v - (w / 2) score, guided; noise
    sqrt(w) sqrt(|dt|) z; the last step (0.04 -> 0) is the mean."""
    t = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise.double()
    noises = iter(step_noises)

    def drift(v, xx, tt):
        tt = tt.view(-1, 1, 1, 1)
        ratio = (1 - tt) / -1.0  # alpha / alpha'
        score = (ratio * v - xx) / (tt**2 - ratio * tt)
        return v - 0.5 * (2 * tt) * score

    for k in range(steps - 1):
        dt = t[k + 1] - t[k]
        z = next(noises).double()
        d = repa_guided(net, x, t[k], y, null, scale, low, high, drift)
        x = x + d * dt + torch.sqrt(2 * t[k]) * (z * torch.sqrt(torch.abs(dt)))
    d = repa_guided(net, x, t[-2], y, null, scale, low, high, drift)
    return x + (t[-1] - t[-2]) * d

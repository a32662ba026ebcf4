"""Activated FLOPs of one Race-DiT (or dense DiT) forward, counted the way the network runs them.

One multiply-add is 2 FLOPs. Per token (each of a row's L tokens):

    patch embed    2 C p^2 D
    per block      qkv 2 D 3D + attention 4 L D (QK^T and AV over all heads) + proj 2 D^2
                   + router (linear: 2 D E; MLP: 2 D^2 + 2 D E, its target head only trains)
                   + m x expert (GELU: 4 D D_e; SwiGLU: 6 D D_e) + the shared expert, if any
                   (a dense DiT: its MLP, 4 D H)
    final linear   2 D p^2 C_out

Per sample (once per row, not per token: the conditioning vector c is one per row):

    timestep MLP   2 * 256 D + 2 D^2
    adaLN          depth x 2 D 6D + 2 D 2D (the final layer's)

m is the mean number of experts a token takes (threshold routing: k on average at the
calibrated thresholds, the measured mean where a forward reports it). Norms, activations, the
label lookup and the routing itself are not counted: they are not matmuls. The older count,
2 x activated parameters x tokens, ran the adaLN GEMMs (44 M of B/2's 138 M activated
parameters) once per token and left attention's QK^T and AV out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from racedit.model.config import ModelConfig

BF16_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 SXM and of an H200 (no sparsity)
FREQUENCY_DIM = 256  # the timestep embedder's sinusoid width (model/dit.py's TimestepEmbedder)


@dataclass(frozen=True)
class ForwardFlops:
    """The FLOPs of one forward split by what they scale with."""

    per_token: float
    per_sample: float
    tokens: int

    @property
    def per_row(self) -> float:
        """One sample (one row of the batch): its tokens' work and its own."""
        return self.per_token * self.tokens + self.per_sample

    def forward(self, rows: int) -> float:
        return rows * self.per_row


def expert_flops(dim: int, hidden: int, kind: str) -> float:
    """One expert on one token: D -> D_e (SwiGLU: 2 D_e, gate and up) -> D."""
    first = 2 * hidden if kind == "swiglu" else hidden
    return 2.0 * dim * first + 2.0 * hidden * dim


def forward_flops(config: ModelConfig, experts_per_token: Optional[float] = None) -> ForwardFlops:
    """The activated FLOPs of a forward of `config` (formula in the module's docstring);
    `experts_per_token` is m (default: the spec's k)."""
    d, tokens, p = config.hidden_size, config.num_tokens, config.patch_size
    attention = 2.0 * d * 3 * d + 4.0 * tokens * d + 2.0 * d * d
    moe = config.moe
    if moe is None:
        mlp = 2 * 2.0 * d * int(d * config.mlp_ratio)
    else:
        m = moe.k if experts_per_token is None else experts_per_token
        hidden = int(config.mlp_ratio * d / moe.split)
        router = 2.0 * d * moe.num_experts + (2.0 * d * d if moe.router == "mlp" else 0.0)
        shared = expert_flops(d, moe.shared_expert_hidden or hidden, moe.expert_kind) if moe.shared_expert else 0.0
        mlp = router + m * expert_flops(d, hidden, moe.expert_kind) + shared
    per_token = (
        2.0 * config.in_channels * p * p * d + config.depth * (attention + mlp) + 2.0 * d * p * p * config.out_channels
    )
    per_sample = 2.0 * FREQUENCY_DIM * d + 2.0 * d * d + config.depth * 2.0 * d * 6 * d + 2.0 * d * 2 * d
    return ForwardFlops(per_token, per_sample, tokens)


def peak_share(flops: float, seconds: float, peak_tflops: float = BF16_PEAK_TFLOPS) -> float:
    """The share of the peak that `flops` done in `seconds` reached."""
    return flops / seconds / (peak_tflops * 1e12)

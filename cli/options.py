"""The typed options of every `racedit` command but serve and export (which have theirs in
`racedit.server.settings` and `racedit.export.cli`): pydantic models whose fields are the flags
(cli/flags.py makes them). Torch-free, so `--help` answers at once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .flags import POSITIONAL

BUDGETS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]  # racedit.model.training.calibrate.BUDGETS, without importing torch
Precision = Literal["float32", "bfloat16", "float16"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainOptions(Options):
    """Train a model from a YAML config."""

    config: Path = Field(..., description="YAML training config, or a pipeline of stages (configs/*.yaml)")
    out: Optional[Path] = Field(None, description="output folder (default: runs/<config name>)")
    resume: Optional[Path] = Field(
        None, description="checkpoint folder of an earlier run to continue exactly (default: start anew)"
    )
    init: Optional[Path] = Field(
        None,
        description="start from this checkpoint's weights with a fresh optimizer, "
        "for fine-tuning (default: random initialisation)",
    )


class EvalOptions(Options):
    """Class fidelity, Frechet distance, sample grid and Fig. 6 plot."""

    checkpoint: Optional[Path] = Field(None, description="checkpoint folder (default: the bundled shapes10 model)")
    num_samples: int = Field(500, ge=1, description="samples to draw, the classes in turn")
    cfg_scale: float = Field(4.0, ge=0, description="guidance scale of the samples")
    num_steps: int = Field(25, ge=1, description="Euler steps per sample")
    batch_size: int = Field(100, ge=1, description="samples generated at once")
    out: Path = Field(Path("eval-out"), description="folder for report.json and the figures")
    classifier: Optional[Path] = Field(None, description="classifier folder (default: the bundled one)")
    dtype: Precision = Field(
        "float32", description="precision of the network's matmuls (thresholds, timesteps and latents stay fp32)"
    )


class CalibrateOptions(Options):
    """Re-estimate the learned thresholds on the checkpoint's own weights."""

    checkpoint: Path = Field(..., description="checkpoint folder", json_schema_extra=POSITIONAL)
    out: Optional[Path] = Field(None, description="write here (default: update the checkpoint in place)")
    routing: Literal["keep", "threshold"] = Field(
        "keep",
        description="threshold: give a token-choice checkpoint (an imported DiT-MoE) threshold routing on its own "
        "gates, calibrated over the time grid so the mean experts per token is k (then expert_budget and compute "
        "that follows t work); keep: re-estimate a threshold-routed model's thresholds",
    )
    num_images: int = Field(40, ge=1, description="calibration samples (classes in turn)")
    cfg_scale: float = Field(4.0, ge=0, description="guidance of the calibration samples")
    num_steps: int = Field(25, ge=1, description="Euler steps: the time grid calibrated over")
    iterations: int = Field(
        2, ge=0, description="passes towards the fixed point (0 keeps the thresholds, e.g. to add a budget table)"
    )
    budgets: list[float] = Field(
        BUDGETS, description="expert budgets of the compute-dial table (must include 1.0; none: no table)"
    )
    seed: int = Field(10_000, description="seed of the first calibration sample (the others follow)")


class ImportOptions(Options):
    """A racedit checkpoint from a published DiT-family checkpoint, served as it is."""

    source: Path = Field(
        ...,
        description="a diffusers DiTPipeline folder, a DiTTransformer2DModel folder, or a .pt/.safetensors state dict "
        "(DiT, SiT, REPA or DiT-MoE)",
        json_schema_extra=POSITIONAL,
    )
    out: Path = Field(..., description="checkpoint folder to write")
    family: Literal["auto", "dit", "diffusers", "sit", "repa", "dit-moe"] = Field(
        "auto",
        description="whose conventions the weights follow; auto: a diffusers folder is diffusers, DiT-MoE's gates "
        "are dit-moe, a state dict with REPA's projectors is repa, other state dicts with DiT's keys are dit (SiT "
        "shares them: say --family sit)",
    )
    vae: Optional[Path] = Field(
        None,
        description="a diffusers AutoencoderKL folder (save_pretrained), e.g. sd-vae-ft-ema, to decode the latents "
        "(default: a pipeline's own vae/; a state dict without one serves latents only)",
    )
    num_heads: Optional[int] = Field(
        None, ge=1, description="attention heads, which a state dict does not record (default: the published sizes')"
    )
    moe: Optional[str] = Field(None, description="upcycle every MLP into experts, e.g. 2in8 (default: dense)")
    hidden_split: int = Field(
        1, ge=1, description="with --moe: 1, each expert a copy of the dense MLP; S > 1, slices of its width / S"
    )
    gating: Literal["identity", "sigmoid", "softmax"] = Field("identity", description="with --moe: the routers' gate")


class ImportDitOptions(Options):
    """A racedit checkpoint from DiT weights (diffusers folder or DiT .pt)."""

    source: Path = Field(
        ...,
        description="a diffusers DiTTransformer2DModel folder (safetensors) or a facebookresearch/DiT .pt",
        json_schema_extra=POSITIONAL,
    )
    out: Path = Field(..., description="checkpoint folder to write")
    moe: Optional[str] = Field(None, description="upcycle every MLP into experts, e.g. 2in8 (default: dense)")
    hidden_split: int = Field(
        1, ge=1, description="1: each expert a copy of the dense MLP; S > 1: experts are slices of its width / S"
    )
    gating: Literal["identity", "sigmoid", "softmax"] = Field("identity", description="gate of the upcycled routers")
    num_heads: Optional[int] = Field(
        None,
        ge=1,
        description="attention heads (default: from the width, for DiT's sizes; needed for a .pt of other sizes)",
    )
    autoencoder: Optional[Path] = Field(
        None, description="VAE folder (save_pretrained) to carry, e.g. sd-vae-ft-ema (default: none, a pixel model)"
    )


class PackOptions(Options):
    """Copy a checkpoint for shipping: weights only, parameters in float16."""

    checkpoint: Path = Field(..., description="checkpoint folder to copy")
    out: Path = Field(..., description="folder to write")
    dtype: Precision = Field(
        "float16", description="type of the stored parameters (buffers such as thresholds stay exact)"
    )


class ClassifierOptions(Options):
    """Train the shapes10 classifier used by eval."""

    out: Optional[Path] = Field(None, description="classifier folder (default: the bundled one, replaced)")
    steps: int = Field(600, ge=1, description="training steps")

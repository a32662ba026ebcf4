"""The autoencoder of a latent checkpoint: which VAE turns its samples into pixels, and how.

A latent checkpoint's `config.json` names it under `autoencoder`:

    {"kind": "diffusers.AutoencoderKL", "path": "vae", "scaling_factor": 0.18215, "shift_factor": null}

`path` is relative to the checkpoint folder (`save(..., autoencoder=...)` copies the VAE to
`folder/vae` in diffusers' `save_pretrained` layout) or an absolute local path. Nothing is ever
fetched from a hub, and diffusers is only imported when a VAE is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

KIND = "diffusers.AutoencoderKL"
FOLDER = "vae"
INSTALL_HINT = "pip install 'racedit[latents]' (diffusers)"


class AutoencoderError(RuntimeError):
    """A latent checkpoint's VAE is missing, broken, or cannot be loaded here."""


@dataclass(frozen=True)
class Autoencoder:
    """Where a checkpoint's VAE lives and how its latents are scaled: latents = (z - shift) * scale."""

    path: Path  # resolved folder in save_pretrained layout
    scaling_factor: float
    shift_factor: Optional[float] = None
    kind: str = KIND

    def record(self, checkpoint_folder: Path) -> dict[str, Any]:
        """The `autoencoder` entry of config.json (path relative to the checkpoint when inside it)."""
        try:
            path = str(self.path.resolve().relative_to(checkpoint_folder.resolve()))
        except ValueError:
            path = str(self.path.resolve())
        return {
            "kind": self.kind,
            "path": path,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], checkpoint_folder: Path) -> Autoencoder:
        if not isinstance(record, dict) or record.get("kind") != KIND:
            raise AutoencoderError(
                f"{checkpoint_folder / 'config.json'}: autoencoder must be "
                f"{{'kind': '{KIND}', 'path': ..., 'scaling_factor': ...}}, got {record!r}"
            )
        path = Path(record.get("path") or FOLDER)
        path = path if path.is_absolute() else checkpoint_folder / path
        shift = record.get("shift_factor")
        return cls(
            path=path,
            scaling_factor=float(record["scaling_factor"]),
            shift_factor=None if shift is None else float(shift),
        )

    def check(self) -> None:
        """Fail now, naming the folder, if the VAE is not where the checkpoint says."""
        config = self.path / "config.json"
        if not config.is_file():
            raise AutoencoderError(
                f"{self.path}: the checkpoint's VAE folder is missing or has no config.json "
                f"(expected diffusers' save_pretrained layout)"
            )
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise AutoencoderError(f"{config}: not valid JSON ({exc})") from exc
        if not any(self.path.glob("*.safetensors")):
            raise AutoencoderError(f"{self.path}: no .safetensors weights (racedit reads VAEs only as safetensors)")

    def load(self, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
        """The diffusers AutoencoderKL, in eval mode and fp32 (SD-style decoders overflow in fp16)."""
        self.check()
        AutoencoderKL = require_diffusers()
        try:
            # low_cpu_mem_usage=False: the plain load, which needs no `accelerate` (without it diffusers
            # falls back to this anyway, with a paragraph on every load).
            vae = AutoencoderKL.from_pretrained(
                self.path,
                local_files_only=True,
                use_safetensors=True,
                torch_dtype=torch.float32,
                low_cpu_mem_usage=False,
            )
        except Exception as exc:  # diffusers raises many kinds for a broken folder
            raise AutoencoderError(f"{self.path}: cannot load the VAE ({type(exc).__name__}: {exc})") from exc
        return vae.to(device).eval().requires_grad_(False)

    def image_size(self, latent_size: int) -> int:
        """Image side of a latent side: each down block but the last halves it (8x for SD-style VAEs)."""
        return decoded_size(read_vae_config(self.path), latent_size)

    def to_vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the checkpoint's latent scaling (`data.vae_encoder` applies it): what the VAE's decoder takes."""
        z = latents.float() / self.scaling_factor
        return z + self.shift_factor if self.shift_factor is not None else z


def require_diffusers():
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise AutoencoderError(f"this is a latent checkpoint whose autoencoder is {KIND}: {INSTALL_HINT}") from exc
    return AutoencoderKL


def copy_autoencoder(
    source: Union[str, os.PathLike, torch.nn.Module],
    checkpoint_folder: Path,
    scaling_factor: Optional[float] = None,
    shift_factor: Optional[float] = None,
) -> Autoencoder:
    """Put a VAE (an AutoencoderKL, or a save_pretrained folder) into `checkpoint_folder/vae`.
    Scaling and shift default to the VAE's own config (`scaling_factor`, `shift_factor`)."""
    target = checkpoint_folder / FOLDER
    if isinstance(source, torch.nn.Module):
        config = dict(getattr(source, "config", {}))
        if target.exists():
            shutil.rmtree(target)
        source.save_pretrained(target, safe_serialization=True)
    else:
        source_path = Path(source)
        found = Autoencoder(path=source_path, scaling_factor=1.0)
        found.check()
        config = json.loads((source_path / "config.json").read_text())
        if source_path.resolve() != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source_path, target)
    if scaling_factor is None:
        scaling_factor = float(config.get("scaling_factor") or 0.18215)
    if shift_factor is None and config.get("shift_factor") is not None:
        shift_factor = float(config["shift_factor"])
    return Autoencoder(path=target, scaling_factor=scaling_factor, shift_factor=shift_factor)


def decoded_size(vae_config: dict[str, Any], latent_size: int) -> int:
    """Image side of a latent side: each down block but the last halves it (8x for SD-style VAEs)."""
    return latent_size * 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def read_vae_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


class Decoder:
    """Turns a latent checkpoint's samples into images in [-1, 1], batched, on one device, in fp32."""

    def __init__(self, autoencoder: Autoencoder, device: Union[str, torch.device] = "cpu"):
        self.autoencoder = autoencoder
        self.vae = autoencoder.load(device)
        self.device = torch.device(device)

    def image_size(self, latent_size: int) -> int:
        return self.autoencoder.image_size(latent_size)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents (the model's scaling) -> [N, 3, H, W] fp32 images in [-1, 1]."""
        z = self.autoencoder.to_vae_input(latents.to(self.device))
        return self.vae.decode(z).sample.float().clamp(-1, 1)

"""Datasets: procedural shapes10 (the bundled default) and ImageFolder for users' own images.

shapes10 draws each image from its own seeded RNG, so item i of a split is the
same on every machine and nothing is downloaded. Shapes are drawn at 4x
resolution and box-filtered down (anti-aliasing), in a random colour of good
contrast over a gradient or a low-frequency texture.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..config import FORBID_UNKNOWN, SHAPES10_CLASSES, Float

SUPERSAMPLE = 4
SPLIT_OFFSETS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapesStyle:
    """Nuisance variance of shapes10: how far shapes move, how large they are, how much they turn."""

    __pydantic_config__ = FORBID_UNKNOWN

    jitter: Float = 0.1  # centre offset, as a fraction of the frame, uniform in +-jitter
    min_size: Float = 0.55  # shape diameter as a fraction of the frame
    max_size: Float = 0.8
    rotation: Float = 20.0  # degrees either way; kept below 45 so squares stay distinct from diamonds


def _polygon(n: int, radius: float, angle: float, inner: Optional[float] = None) -> list[tuple[float, float]]:
    """Regular polygon (or star with `inner` radius ratio) centred at 0, first vertex up."""
    points, count = [], n * (2 if inner else 1)
    for i in range(count):
        r = radius * (inner if inner and i % 2 else 1.0)
        a = angle - math.pi / 2 + 2 * math.pi * i / count
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _outline(name: str, radius: float, angle: float) -> list[tuple[float, float]]:
    if name == "square":
        return _polygon(4, radius, angle + math.pi / 4)
    if name == "triangle":
        return [(x, y + 0.15 * radius) for x, y in _polygon(3, radius * 1.1, angle)]
    if name == "diamond":
        return (
            [(x * 0.8, y) for x, y in _polygon(4, radius, 0.0)]
            if angle == 0
            else _rotate([(x * 0.8, y) for x, y in _polygon(4, radius, 0.0)], angle)
        )
    if name == "pentagon":
        return _polygon(5, radius, angle)
    if name == "hexagon":
        return _polygon(6, radius, angle)
    if name == "star":
        return _polygon(5, radius, angle, inner=0.42)
    if name == "cross":
        w = 0.32 * radius
        arm = [
            (-w, -radius),
            (w, -radius),
            (w, -w),
            (radius, -w),
            (radius, w),
            (w, w),
            (w, radius),
            (-w, radius),
            (-w, w),
            (-radius, w),
            (-radius, -w),
            (-w, -w),
        ]
        return _rotate(arm, angle)
    if name == "heart":
        pts = []
        for i in range(64):
            s = 2 * math.pi * i / 64
            x = 16 * math.sin(s) ** 3
            y = -(13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s) - math.cos(4 * s))
            pts.append((x * radius / 17, (y + 2) * radius / 17))
        return _rotate(pts, angle)
    raise ValueError(name)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB in [0, 1] whose luminances differ by at least 0.35."""

    def hsv(h: float, s: float, v: float) -> np.ndarray:
        i, f = int(h * 6) % 6, h * 6 - int(h * 6)
        p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
        return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])

    dark_background = rng.random() < 0.5
    bg_value = rng.uniform(0.08, 0.35) if dark_background else rng.uniform(0.75, 0.97)
    fg_value = rng.uniform(0.8, 1.0) if dark_background else rng.uniform(0.1, 0.4)
    background = hsv(rng.random(), rng.uniform(0.0, 0.6), bg_value)
    foreground = hsv(rng.random(), rng.uniform(0.5, 1.0), fg_value)
    lum = np.array([0.299, 0.587, 0.114])
    if abs(float(lum @ background - lum @ foreground)) < 0.35:
        foreground = np.clip(foreground + (0.45 if dark_background else -0.45), 0, 1)
    return background, foreground


def _background(rng: np.random.Generator, base: np.ndarray, size: int) -> np.ndarray:
    """[size, size, 3]: a linear gradient or a smooth low-frequency texture around `base`."""
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        coords = np.linspace(-0.5, 0.5, size)
        ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
        shift = rng.uniform(-0.15, 0.15, size=3)
        image = base[None, None] + ramp[..., None] * shift[None, None]
    else:
        coarse = rng.uniform(-0.08, 0.08, size=(4, 4, 3)).astype(np.float32)
        noise = np.asarray(Image.fromarray(((coarse + 0.5) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        image = base[None, None] + (noise.astype(np.float32) / 255.0 - 0.5)
    return np.clip(image, 0, 1)


def draw_shape(rng: np.random.Generator, label: int, image_size: int, style: ShapesStyle) -> np.ndarray:
    """One anti-aliased image uint8 [H, W, 3] of class `label`."""
    big = image_size * SUPERSAMPLE
    name = SHAPES10_CLASSES[label]
    radius = rng.uniform(style.min_size, style.max_size) * big / 2
    cx = big / 2 + rng.uniform(-style.jitter, style.jitter) * big
    cy = big / 2 + rng.uniform(-style.jitter, style.jitter) * big
    angle = math.radians(rng.uniform(-style.rotation, style.rotation))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if name in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if name == "ring":
            inner = radius * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in _outline(name, radius, angle)], fill=255)
    alpha = np.asarray(mask.resize((image_size, image_size), Image.BOX), dtype=np.float32)[..., None] / 255.0
    background, foreground = _colour_pair(rng)
    canvas = _background(rng, background, image_size)
    image = canvas * (1 - alpha) + foreground[None, None] * alpha
    return (image * 255 + 0.5).clip(0, 255).astype(np.uint8)


class Shapes10(Dataset):
    """Procedural 10-class shapes: (image float [-1, 1] [3, H, W], label int)."""

    class_names = SHAPES10_CLASSES

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        length: Optional[int] = None,
        style: Optional[ShapesStyle] = None,
    ):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = length if length is not None else (50_000 if split == "train" else 5_000)
        self.style = style or ShapesStyle()

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return index % len(SHAPES10_CLASSES)

    def draw(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3]. The RNG key includes the split, so train and val never share a draw."""
        rng = np.random.default_rng([self.seed, SPLIT_OFFSETS[self.split], index])
        return draw_shape(rng, self.label(index), self.image_size, self.style)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        pixels = torch.from_numpy(self.draw(index)).permute(2, 0, 1)
        return pixels.float() / 127.5 - 1.0, self.label(index)

    def materialize(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as uint8 [N, 3, H, W] and labels [N], cached on disk (keyed by every setting)."""
        key = json.dumps([self.split, self.image_size, self.seed, self.length, asdict(self.style)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        folder = Path(cache_dir or os.environ.get("RACEDIT_CACHE", Path.home() / ".cache" / "racedit"))
        path = folder / f"shapes10-{digest}.npz"
        if path.is_file():
            with np.load(path) as data:
                return torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
        images = np.stack([self.draw(i) for i in range(self.length)]).transpose(0, 3, 1, 2)
        labels = np.array([self.label(i) for i in range(self.length)], dtype=np.int64)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(path)
        return torch.from_numpy(images), torch.from_numpy(labels)


class ImageFolder(Dataset):
    """One sub-folder per class of images, resized and centre-cropped to `image_size`.

    With `encoder` (a callable such as a local diffusers AutoencoderKL's
    `encode(...).latent_dist.mean * scale`), items are latents instead of pixels.
    """

    EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

    def __init__(
        self,
        root: Union[str, os.PathLike],
        image_size: int = 32,
        encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a folder")
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.class_names:
            raise ValueError(f"ImageFolder: {self.root} has no class sub-folders")
        self.samples = [
            (p, label)
            for label, name in enumerate(self.class_names)
            for p in sorted((self.root / name).rglob("*"))
            if p.suffix.lower() in self.EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"ImageFolder: no images ({', '.join(sorted(self.EXTENSIONS))}) under {self.root}")
        self.image_size, self.encoder = image_size, encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.BICUBIC)
            x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.encoder is not None:
            with torch.no_grad():
                x = self.encoder(x[None])[0]
        return x, label


def vae_encoder(
    vae: Union[torch.nn.Module, str, os.PathLike], scale: Optional[float] = None, shift: Optional[float] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ImageFolder encoder from a diffusers AutoencoderKL: a module, or a local folder
    written by `save_pretrained` (loaded with `local_files_only`, so nothing is fetched).

    Latents are `(mean - shift) * scale` of the posterior, by default with the VAE's own
    `config.scaling_factor` (0.18215 for the SD VAE that DiT uses) and `config.shift_factor`
    (none for SD VAEs); a latent checkpoint's `Autoencoder.to_vae_input` undoes it.
    """
    if not isinstance(vae, torch.nn.Module):
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ImportError("encoding to latents needs diffusers: pip install diffusers") from exc
        path = Path(vae)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not an AutoencoderKL folder (no config.json); write one with save_pretrained"
            )
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)  # as Autoencoder.load
    vae = vae.eval()
    config = getattr(vae, "config", None)
    if scale is None:
        scale = float(getattr(config, "scaling_factor", 0.18215))
    if shift is None:
        shift = getattr(config, "shift_factor", None)

    def encode(x: torch.Tensor) -> torch.Tensor:
        mean = vae.encode(x).latent_dist.mean
        return (mean - float(shift) if shift is not None else mean) * scale

    return encode

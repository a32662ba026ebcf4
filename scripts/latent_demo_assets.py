"""Assets for the README's latent-space walk-through, made on this machine with nothing downloaded:

    python scripts/latent_demo_assets.py out/latent-demo

writes out/latent-demo/images/<class>/*.png (shapes10 drawings, 32x32, three classes) and
out/latent-demo/vae (a tiny, randomly initialised diffusers AutoencoderKL in save_pretrained layout:
32x32x3 images <-> 8x8x4 latents). A random VAE decodes to noise-like pictures; it stands in for a
real one (e.g. sd-vae-ft-ema) so the whole path -- encode, train, save, serve, decode -- runs here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from racedit.model.training.data import Shapes10

CLASSES = ("circle", "square", "star")


def demo_vae():
    """A tiny random diffusers AutoencoderKL: 32x32x3 images <-> 8x8x4 latents, diffusers' default
    scaling factor (0.18215, sd-vae-ft-ema's), seed 0."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=32)
    args = parser.parse_args()
    shapes = Shapes10("train", length=10 * args.per_class, seed=0)
    for index in range(len(shapes)):
        name = shapes.class_names[shapes.label(index)]
        if name not in CLASSES:
            continue
        folder = args.out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shapes.draw(index)).save(folder / f"{index:05d}.png")
    demo_vae().save_pretrained(args.out / "vae", safe_serialization=True)
    print(f"wrote {args.out / 'images'} ({', '.join(CLASSES)}) and {args.out / 'vae'}")


if __name__ == "__main__":
    main()

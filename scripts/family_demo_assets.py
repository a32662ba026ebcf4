"""Stand-ins for the README's walk-through from DiT's published weights, made here with nothing downloaded:

    python scripts/family_demo_assets.py out/family-demo

writes out/family-demo/DiT-XL-2-tiny.pt, a tiny randomly initialised DiT saved as facebookresearch/DiT
saves DiT-XL-2-256x256.pt (a plain state dict under DiT's names: `x_embedder.proj`, `pos_embed`,
fused `attn.qkv`, `y_embedder.embedding_table`, a learned-variance output half), and
out/family-demo/vae, a tiny random diffusers AutoencoderKL in save_pretrained layout (32x32x3
images <-> 8x8x4 latents, scaling factor 0.18215) standing in for sd-vae-ft-ema. Random weights
draw noise-like pictures; the commands are the ones that serve the real checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from latent_demo_assets import demo_vae  # scripts/ is on the path when a script here runs

from racedit.model import build
from racedit.model.dit import sincos_pos_embed_2d


def tiny_dit_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DiT of DiT's layout: 8x8x4 latents, patch 2, width 64 in 4 heads, 2 blocks, 10 classes."""
    torch.manual_seed(seed)
    model = build(
        "tiny",
        in_channels=4,
        image_size=8,
        patch_size=2,
        moe=None,
        num_classes=10,
        learn_sigma=True,
        position_order="col_row",
    )
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: perturb everything so the output varies
            p.add_(torch.randn_like(p) * 0.05)
    names = {"x_embedder.weight": "x_embedder.proj.weight", "x_embedder.bias": "x_embedder.proj.bias"}
    state = {
        names.get(k, k.replace("y_embedder.table", "y_embedder.embedding_table")): v.clone()
        for k, v in model.state_dict().items()
    }
    state["pos_embed"] = sincos_pos_embed_2d(64, 4, "col_row")[None]
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_dit_state_dict(), args.out / "DiT-XL-2-tiny.pt")
    demo_vae().save_pretrained(args.out / "vae", safe_serialization=True)  # the latent walk-through's VAE
    print(f"wrote {args.out / 'DiT-XL-2-tiny.pt'} and {args.out / 'vae'}")


if __name__ == "__main__":
    main()

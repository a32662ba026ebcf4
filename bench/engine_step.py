"""ms per denoising step: the served Race-DiT forward (threshold routing, grouped experts, row tiles)
against a dense DiT of equal activated FLOPs (same preset, dense MLP), eager and under torch.compile.

    python bench/engine_step.py --preset B/2 --device cuda --rows 64 128 256
    python bench/engine_step.py --preset XL/2 --moe 4in32 --device cuda --rows 64 256 --dtype bfloat16
    python bench/engine_step.py --preset shapes10 --device cpu --rows 16 64 --no-compile

Random weights: the thresholds are set by a few training forwards so routing activates about k
experts per token. Prints and saves bench/results/engine_step-<preset>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, time_interleaved  # noqa: E402

from racedit.model import SERVING, Execution, build
from racedit.server.engine import pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes10")
    parser.add_argument("--moe", default=None, help="MoE spec override, e.g. 4in32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    device, dtype = pick_device(args.device, args.dtype)
    cuda = device.type == "cuda"
    moe = build(args.preset, **({"moe": {"spec": args.moe}} if args.moe else {})).to(device).train()
    cfg = moe.config
    with torch.no_grad():  # thresholds from the race on random inputs
        for _ in range(2):
            moe(
                torch.randn(8, cfg.in_channels, cfg.image_size, cfg.image_size, device=device),
                torch.rand(8, device=device),
                torch.randint(0, cfg.num_classes, (8,), device=device),
            )
    moe.eval().set_precision(dtype)
    # The baseline is a plain dense DiT: the library's own kernels (cuBLAS, FlashAttention on a GPU), no row tiles.
    plain = Execution(row_tile=None)
    dense = build(args.preset, moe=None).to(device).eval().set_precision(dtype).with_execution(plain)
    variants = {
        "Race-DiT served forward": lambda x, t, y: moe.with_execution(SERVING)(x, t, y),
        "Race-DiT forward, not batch-invariant": lambda x, t, y: moe.with_execution(plain)(x, t, y),
        "dense DiT (equal activated FLOPs)": dense,
    }
    if args.compile:
        variants["dense DiT, torch.compile"] = torch.compile(dense)
    rows = []
    for batch in args.rows:
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        t, y = torch.rand(batch, device=device), torch.randint(0, cfg.num_classes, (batch,), device=device)
        with torch.no_grad():  # round-robin, so load changes hit every variant alike
            timings = time_interleaved(
                {name: lambda net=net: net(x, t, y) for name, net in variants.items()}, args.repeats, cuda=cuda
            )
        for name, seconds in timings.items():
            rows.append({"rows": batch, "variant": name, "ms_per_step": seconds * 1000})
            print(f"rows {batch:4d}  {name:36s} {seconds * 1000:9.2f} ms")
        save(
            f"engine_step-{args.preset.replace('/', '_')}{'-' + args.moe if args.moe else ''}-{device.type}",
            {"preset": args.preset, "moe": args.moe, "dtype": str(dtype).removeprefix("torch.")},
            rows,
        )  # after each batch size


if __name__ == "__main__":
    main()

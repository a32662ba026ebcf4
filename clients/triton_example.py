"""Generate images through the stock `tritonclient.http` client against racedit's KServe v2 routes.

    python clients/triton_example.py --url 127.0.0.1:8000 --model racedit-shapes10 --class 6 --out star.png

The same code works against a Triton Inference Server that serves the `racedit`
model repository built by `racedit export triton`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tritonclient.http as triton
from PIL import Image


def generate(
    url: str,
    model: str,
    labels: Sequence[int],
    cfg_scale: float = 4.0,
    num_steps: int = 25,
    seeds: Optional[Sequence[int]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, 3], mean experts per token [N] and the seeds used [N]
    (drawn at random by the server where `seeds` is None)."""
    n = len(labels)
    client = triton.InferenceServerClient(url)
    columns = [
        ("class_label", "INT64", np.asarray(labels, dtype=np.int64)),
        ("cfg_scale", "FP32", np.full(n, cfg_scale, dtype=np.float32)),
        ("num_steps", "INT32", np.full(n, num_steps, dtype=np.int32)),
    ]
    if seeds is not None:
        columns.append(("seed", "INT64", np.asarray(seeds, dtype=np.int64)))
    inputs = []
    for name, datatype, values in columns:
        item = triton.InferInput(name, [n], datatype)
        item.set_data_from_numpy(values)
        inputs.append(item)
    outputs = [triton.InferRequestedOutput(name) for name in ("image", "mean_experts_per_token", "seed")]
    result = client.infer(model, inputs, outputs=outputs)
    return result.as_numpy("image"), result.as_numpy("mean_experts_per_token"), result.as_numpy("seed")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the KServe v2 endpoint")
    parser.add_argument(
        "--model",
        default="racedit-shapes10",
        help="model name: racedit-shapes10 (or --model-name) on racedit serve, racedit on Triton",
    )
    parser.add_argument("--class", dest="label", type=int, default=6)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn at random by the server")
    parser.add_argument("--out", default="triton.png")
    args = parser.parse_args(argv)
    images, experts, seeds = generate(
        args.url, args.model, [args.label], args.cfg, args.steps, None if args.seed is None else [args.seed]
    )
    Image.fromarray(images[0]).save(args.out)
    print(
        f"saved {args.out} ({images.shape[1]}x{images.shape[2]}, seed {seeds[0]}); "
        f"mean experts per token {experts[0]:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

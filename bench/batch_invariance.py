"""What exactness costs: the engine at saturation with and without batch invariance, in fp32 and bf16,
and whether a request's final float samples are the same bytes alone and among others.

    python bench/batch_invariance.py [--checkpoint PATH] [--preset B/2] [--device cpu|cuda]
                                     [--requests 48] [--steps 10] [--max-batch-rows 64]

For each (dtype, batch_invariant) cell: images/s of the engine (in-process, every request queued
at once, guided, mixed classes) and whether request 0's npy bytes equal its bytes when run alone.
Prints and saves bench/results/batch_invariance-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from racedit.model import DEFAULT_CHECKPOINT, load
from racedit.server.engine import Engine, GenerationRequest, pick_device


def run(
    checkpoint: str, device: str, dtype: str, batch_invariant: bool, requests: int, steps: int, max_batch_rows: int
) -> dict:
    torch_device, torch_dtype = pick_device(device, dtype)
    engine = Engine.build(
        load(checkpoint),
        torch_device,
        torch_dtype,
        max_batch_rows=max_batch_rows,
        max_queue=requests + 1,
        batch_invariant=batch_invariant,
    ).start()
    try:
        batch = [
            GenerationRequest(class_label=i % 10, cfg_scale=4.0, num_steps=steps, seed=i, request_id=f"r{i}")
            for i in range(requests)
        ]
        start = time.monotonic()
        futures = [engine.submit(r) for r in batch]
        results = [f.result() for f in futures]
        images_per_s = requests / (time.monotonic() - start)
        alone = engine.submit(
            GenerationRequest(class_label=0, cfg_scale=4.0, num_steps=steps, seed=0, request_id="alone")
        ).result()
    finally:
        engine.stop()
    return {
        "dtype": dtype,
        "batch_invariant": batch_invariant,
        "verified_at_start": engine.batch_invariant,
        "images_per_s": images_per_s,
        "same_bytes_alone_and_batched": bool(
            np.array_equal(results[0].samples.view(np.uint32), alone.samples.view(np.uint32))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--preset", default=None, help="a randomly initialised preset instead (e.g. B/2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch-rows", type=int, default=64)
    args = parser.parse_args()
    if args.preset:
        from serve_load import random_checkpoint

        args.checkpoint = random_checkpoint(args.preset)
    rows = []
    for dtype in args.dtypes:
        for invariant in (True, False):
            row = run(args.checkpoint, args.device, dtype, invariant, args.requests, args.steps, args.max_batch_rows)
            rows.append(row)
            print(
                f"{dtype:9s} batch_invariant={invariant!s:5s}: {row['images_per_s']:.2f} images/s, "
                f"same bytes alone/batched: {row['same_bytes_alone_and_batched']}"
            )
    cost = {
        dtype: next(r["images_per_s"] for r in rows if r["dtype"] == dtype and not r["batch_invariant"])
        / next(r["images_per_s"] for r in rows if r["dtype"] == dtype and r["batch_invariant"])
        for dtype in args.dtypes
    }
    print("throughput without / with batch invariance:", {k: round(v, 3) for k, v in cost.items()})
    save(
        f"batch_invariance-{torch.device(pick_device(args.device)[0]).type}",
        {
            "checkpoint": args.checkpoint,
            "preset": args.preset,
            "steps": args.steps,
            "requests": args.requests,
            "max_batch_rows": args.max_batch_rows,
            "speed_without_over_with": cost,
        },
        rows,
    )


if __name__ == "__main__":
    main()

"""The compute dial, measured: for each expert budget, the experts per token it realises, ms per
denoising step on this machine, class fidelity and FD (cfg 4, 25 Euler steps, the shipped
classifier, as docs/training.md evaluates).

    python bench/compute_curve.py [--checkpoint PATH] [--budgets 0.25 0.5 0.75 1.0 1.25 1.5] [--num-samples 500]

Prints and saves bench/results/compute_curve.{json,md} and docs/compute-curve.png.
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

from racedit.model import DEFAULT_CHECKPOINT, generate, load
from racedit.model.calibrate import budget_range
from racedit.model.data import Shapes10
from racedit.model.evaluate import classify, frechet_distance, load_classifier

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    model = load(args.checkpoint)
    if budget_range(model.metadata) is None:
        sys.exit(f"{args.checkpoint} has no budget table: run `racedit calibrate {args.checkpoint}` first")
    classifier = load_classifier()
    _, real = classify(classifier, Shapes10("val").materialize()[0])
    labels = [i % model.config.num_classes for i in range(args.num_samples)]
    k = model.config.moe.k
    rows = []
    for budget in args.budgets:
        images, usages, seconds = [], [], 0.0
        for lo in range(0, args.num_samples, args.batch_size):
            chunk = labels[lo:lo + args.batch_size]
            start = time.perf_counter()
            out, usage = generate(model, chunk, cfg_scale=4.0, num_steps=25, seeds=list(range(lo, lo + len(chunk))),
                                  expert_budget=budget)
            seconds += time.perf_counter() - start
            images.append(out)
            usages += usage
        images = torch.cat(images)
        preds, feats = classify(classifier, images)
        row = {"expert_budget": budget,
               "experts_per_token": float(np.mean([u["mean_experts_per_token"] for u in usages])),
               "target": budget * k,
               "ms_per_step": 1000 * seconds / (25 * -(-args.num_samples // args.batch_size)),
               "class_fidelity": float((preds == torch.tensor(labels)).float().mean()),
               "frechet_distance": frechet_distance(feats, real)}
        rows.append(row)
        print(f"budget {budget:4.2f}: {row['experts_per_token']:.3f} experts/token (target {row['target']:.2f}), "
              f"{row['ms_per_step']:.0f} ms per {args.batch_size}-image step, fidelity {row['class_fidelity']:.3f}, "
              f"FD {row['frechet_distance']:.2f}", flush=True)
    save("compute_curve", {"checkpoint": args.checkpoint, "num_samples": args.num_samples,
                           "batch_size": args.batch_size, "cfg_scale": 4.0, "num_steps": 25}, rows)
    plot(rows, k)


def plot(rows: list[dict], k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    budgets = [r["expert_budget"] for r in rows]
    left.plot(budgets, [r["experts_per_token"] for r in rows], marker="o", label="realised")
    left.plot(budgets, [b * k for b in budgets], linestyle="--", color="grey", label="budget x k")
    left.set_xlabel("expert budget")
    left.set_ylabel("experts per token")
    left.legend()
    left.grid(alpha=0.3)
    right.plot([r["experts_per_token"] for r in rows], [r["class_fidelity"] for r in rows], marker="o",
               label="class fidelity")
    right.set_xlabel("experts per token")
    right.set_ylabel("class fidelity")
    twin = right.twinx()
    twin.plot([r["experts_per_token"] for r in rows], [r["frechet_distance"] for r in rows], marker="s",
              color="#d62728", label="FD")
    twin.set_ylabel("Frechet distance", color="#d62728")
    right.grid(alpha=0.3)
    fig.suptitle("The compute dial on the bundled model (cfg 4, 25 Euler steps)")
    fig.tight_layout()
    fig.savefig(DOCS / "compute-curve.png")
    plt.close(fig)


if __name__ == "__main__":
    main()

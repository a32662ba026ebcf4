"""The compute dial, measured: for each expert budget, the experts per token it realises, ms per
denoising step on this machine, class fidelity and FD (cfg 4, 25 Euler steps, the shipped
classifier, as docs/training.md evaluates).

    python bench/compute_curve.py [--checkpoint PATH] [--budgets 0.25 0.5 0.75 1.0 1.25 1.5] [--num-samples 500]

Prints and saves bench/results/compute_curve.{json,md} and docs/compute-curve.png. Each budget's
quality pass is kept in bench/results/compute_curve/ as it ends, so a long run resumes; the timing
pass (round-robin over budgets) is redone each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save, time_interleaved  # noqa: E402

from racedit.model import DEFAULT_CHECKPOINT, generate, load
from racedit.model.training.data import Shapes10
from racedit.model.training.evaluate import classify, frechet_distance, load_classifier, reference_style

DOCS = Path(__file__).resolve().parents[1] / "docs"
PARTS = RESULTS / "compute_curve"  # one file per budget's quality pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per budget (round-robin)")
    args = parser.parse_args()
    model = load(args.checkpoint)
    if model.budget_table is None:
        sys.exit(f"{args.checkpoint} has no budget table: run `racedit calibrate {args.checkpoint}` first")
    k = model.config.moe.k
    # Quality: one budget at a time, each saved as it ends (an interrupted run resumes).
    PARTS.mkdir(parents=True, exist_ok=True)
    # A part is reused only for the same weights and sample count (the bundled model changes over time).
    key = {
        "weights_sha256": hashlib.sha256((Path(args.checkpoint) / "model.safetensors").read_bytes()).hexdigest(),
        "num_samples": args.num_samples,
    }
    for budget in args.budgets:
        part = PARTS / f"budget-{budget:.2f}.json"
        if not part.exists() or {k: json.loads(part.read_text()).get(k) for k in key} != key:
            part.write_text(json.dumps({**key, **quality(model, budget, args.num_samples, args.batch_size)}) + "\n")
        row = json.loads(part.read_text())
        print(
            f"budget {budget:4.2f}: {row['experts_per_token']:.3f} experts/token (target {budget * k:.2f}), "
            f"fidelity {row['class_fidelity']:.3f}, FD {row['frechet_distance']:.2f}",
            flush=True,
        )
    # Speed: one guided step of a full batch at each budget, timed round-robin so that a change in
    # the machine's load hits every budget alike.
    seconds = step_seconds(model, args.budgets, args.batch_size, args.repeats)
    rows = []
    for budget in args.budgets:
        row = json.loads((PARTS / f"budget-{budget:.2f}.json").read_text())
        rows.append(
            {
                "expert_budget": budget,
                "experts_per_token": row["experts_per_token"],
                "target": budget * k,
                "ms_per_step": 1000 * seconds[budget],
                "class_fidelity": row["class_fidelity"],
                "frechet_distance": row["frechet_distance"],
            }
        )
        print(
            f"budget {budget:4.2f}: {1000 * seconds[budget]:.0f} ms per {args.batch_size}-image guided step", flush=True
        )
    save(
        "compute_curve",
        {
            "checkpoint": args.checkpoint,
            "num_samples": args.num_samples,
            "batch_size": args.batch_size,
            "cfg_scale": 4.0,
            "num_steps": 25,
            "threads": torch.get_num_threads(),
        },
        rows,
    )
    plot(rows, k)


def quality(model, budget: float, num_samples: int, batch_size: int) -> dict:
    """Realised experts per token, class fidelity and FD of `num_samples` images at one budget."""
    classifier = load_classifier()
    _, real = classify(classifier, Shapes10("val", style=reference_style(model)).materialize()[0])
    labels = [i % model.config.num_classes for i in range(num_samples)]
    images, usages = [], []
    for lo in range(0, num_samples, batch_size):
        chunk = labels[lo : lo + batch_size]
        out, usage = generate(
            model, chunk, cfg_scale=4.0, num_steps=25, seeds=list(range(lo, lo + len(chunk))), expert_budget=budget
        )
        images.append(out)
        usages += usage
    preds, feats = classify(classifier, torch.cat(images))
    return {
        "expert_budget": budget,
        "experts_per_token": float(np.mean([u["mean_experts_per_token"] for u in usages])),
        "class_fidelity": float((preds == torch.tensor(labels)).float().mean()),
        "frechet_distance": frechet_distance(feats, real),
    }


@torch.no_grad()
def step_seconds(model, budgets: list[float], batch_size: int, repeats: int) -> dict[float, float]:
    """Median seconds of one cfg-4 denoiser step of `batch_size` images (2 rows each) per budget."""
    from racedit.model.budget import thresholds_for
    from racedit.model.sampling import guided_prediction

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.full((batch_size,), 0.5)
    y = torch.arange(batch_size) % cfg.num_classes
    s = torch.full((batch_size,), 4.0)
    learned = model.learned_thresholds()
    steps = {
        budget: (
            lambda th=thresholds_for(model.budget_table, learned, [budget] * batch_size): guided_prediction(
                model, x, t, y, s, th
            )
        )
        for budget in budgets
    }
    return time_interleaved(steps, repeats=repeats, warmup=1)


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
    right.plot(
        [r["experts_per_token"] for r in rows], [r["class_fidelity"] for r in rows], marker="o", label="class fidelity"
    )
    right.set_xlabel("experts per token")
    right.set_ylabel("class fidelity")
    right.set_ylim(0.8, 1.0)  # the full range a reader compares against, not the noise between budgets
    twin = right.twinx()
    twin.plot(
        [r["experts_per_token"] for r in rows],
        [r["frechet_distance"] for r in rows],
        marker="s",
        color="#d62728",
        label="FD",
    )
    twin.set_ylabel("Frechet distance", color="#d62728")
    twin.set_ylim(0, 1.3 * max(r["frechet_distance"] for r in rows))
    right.grid(alpha=0.3)
    fig.suptitle("The compute dial on the bundled model (cfg 4, 25 Euler steps)")
    fig.tight_layout()
    fig.savefig(DOCS / "compute-curve.png")
    plt.close(fig)


if __name__ == "__main__":
    main()

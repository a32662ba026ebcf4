"""Race routing for published MoE weights (issue #25 item 6), measured at small scale.

Trains a DiT-MoE in miniature on shapes10 with DiT-MoE's recipe (its XL/G layout): top-2 of 8
experts by token choice on softmax gates weighted as they are, SwiGLU experts of hidden 4D
without biases, a shared SwiGLU expert of hidden 2D, a linear router without bias, qk-LayerNorm
attention, rectified flow with t fed unscaled, its balance loss 0.01. Then `calibrate(routing=
"threshold")` gives the token-choice checkpoint threshold routing on its own gates, and this
measures, over the same seeds (Euler, cfg 4, 25 steps):

  * how far the final samples move from top-k routing: relative L2 ||x_thr - x_topk|| / ||x_topk||
    per image, at every budget of the compute dial (1.0: the calibrated thresholds themselves);
  * experts per token against t (per Euler step), top-k against threshold routing.

    python bench/dit_moe_race.py [--steps 1500] [--images 16]

Results: bench/results/dit_moe_race.{json,md}; the run under runs/dit_moe_race.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, save  # noqa: E402

RUN = ROOT / "runs" / "dit_moe_race"

MOE = {
    "spec": "2in8",
    "hidden_split": 1,
    "routing": "token_choice",
    "gating": "softmax",
    "router": "linear",
    "router_bias": False,
    "expert_kind": "swiglu",
    "expert_bias": False,
    "shared_expert": True,
    "shared_expert_hidden": 192,  # 2D
}


def train_config(steps: int) -> dict:
    return {
        "model": {
            "preset": "shapes10",
            "hidden_size": 96,
            "depth": 4,
            "num_heads": 4,
            "qk_norm": True,
            "conventions": {"time_scale": 1.0},  # t fed unscaled, as DiT-MoE XL/G
            "moe": MOE,
        },
        "data": {
            "name": "shapes10",
            "length": 50000,
            "seed": 0,
            "style": {"jitter": 0.1, "min_size": 0.55, "max_size": 0.8, "rotation": 20.0},
        },
        "optim": {
            "steps": steps,
            "batch_size": 32,
            "lr": 1.0e-3,
            "warmup_steps": 100,
            "decay_steps": steps // 3,
            "min_lr": 1.0e-4,
            "grad_clip": 1.0,
            "ema_decay": 0.99,
            "seed": 0,
            "threads": 1,
            "log_every": 100,
            "checkpoint_every": steps,
            "sample_every": steps,
        },
        "loss": {"plr": 0.0, "similarity": 0.0, "balance": 0.01},
        "calibration": {"num_images": 4, "num_steps": 5, "iterations": 1},  # unused by token choice
    }


def rel_l2(a, b) -> list[float]:
    return [round(float((x - y).norm() / y.norm()), 4) for x, y in zip(a, b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=16, help="images compared (classes in turn)")
    parser.add_argument("--reuse", action="store_true", help="measure the run already trained")
    args = parser.parse_args()

    import torch

    from racedit.model import generate, load
    from racedit.model.training.calibrate import CalibrateOptions, calibrate
    from racedit.model.training.config import parse_config
    from racedit.model.training.train import train

    torch.set_num_threads(1)
    start = time.time()
    if not args.reuse:
        if RUN.exists():
            shutil.rmtree(RUN)
        train(parse_config(train_config(args.steps)), RUN, progress=False)
    train_seconds = round(time.time() - start, 1)
    if args.reuse:  # the run's own training time, as its first measurement recorded it
        previous = RESULTS / "dit_moe_race.json"
        train_seconds = json.loads(previous.read_text()).get("train_seconds") if previous.exists() else None
    labels = [i % 10 for i in range(args.images)]
    seeds = list(range(args.images))

    def sample(model, budget=1.0):
        x, usage = generate(
            model, labels, cfg_scale=4.0, num_steps=25, seeds=seeds, as_float=True, expert_budget=budget
        )
        per_step = [round(sum(u.per_step[s] for u in usage) / len(usage), 3) for s in range(25)]
        return x, round(sum(u.mean_experts_per_token for u in usage) / len(usage), 4), per_step

    topk_model = load(RUN / "checkpoint")
    x_topk, ept_topk, steps_topk = sample(topk_model)
    # a yardstick: how far the same top-k samples move when only the matmuls' precision changes
    x_bf16, _, _ = sample(load(RUN / "checkpoint").set_precision(torch.bfloat16))
    bf16_moved = rel_l2(x_bf16, x_topk)
    model = load(RUN / "checkpoint")
    record = calibrate(model, CalibrateOptions(routing="threshold"))
    by_budget = {}
    for budget in record["budget_table"]["budgets"]:
        x, ept, per_step = sample(model, budget)
        moved = rel_l2(x, x_topk)
        by_budget[str(budget)] = {
            "experts_per_token": ept,
            "rel_l2_from_topk_mean": round(sum(moved) / len(moved), 4),
            "rel_l2_from_topk_max": max(moved),
            "per_step": per_step,
        }
    grid = [round(1.0 - s / 25, 2) for s in range(25)]
    result = {
        "model": train_config(args.steps)["model"],
        "train_steps": args.steps,
        "train_seconds": train_seconds,
        "images": args.images,
        "sampler": "euler, cfg 4, 25 steps",
        "topk": {"experts_per_token": ept_topk, "per_step": steps_topk},
        "topk_bf16_rel_l2_from_fp32": {"mean": round(sum(bf16_moved) / len(bf16_moved), 4), "max": max(bf16_moved)},
        "calibration": {k: record[k] for k in ("thresholds", "mean_experts_per_token_by_iteration")},
        "threshold": by_budget,
        "t": grid,
    }
    table = [{"routing": "top-k (the checkpoint's own)", "experts_per_token": ept_topk, "rel_l2_mean": 0.0, "max": 0.0}]
    table += [
        {
            "routing": "top-k, matmuls in bf16 (a yardstick)",
            "experts_per_token": ept_topk,
            "rel_l2_mean": result["topk_bf16_rel_l2_from_fp32"]["mean"],
            "max": result["topk_bf16_rel_l2_from_fp32"]["max"],
        }
    ]
    table += [
        {
            "routing": f"threshold, budget {b}",
            "experts_per_token": r["experts_per_token"],
            "rel_l2_mean": r["rel_l2_from_topk_mean"],
            "max": r["rel_l2_from_topk_max"],
        }
        for b, r in by_budget.items()
    ]
    path = save("dit_moe_race", result, table)
    shown = list(range(0, 25, 3))
    lines = ["", "experts per token against t (Euler step's t; mean over images, guided rows included)", ""]
    lines += ["| routing | " + " | ".join(f"t={grid[s]:g}" for s in shown) + " |", "|---" * (1 + len(shown)) + "|"]
    lines += ["| top-k | " + " | ".join(f"{steps_topk[s]:.2f}" for s in shown) + " |"]
    lines += [
        f"| threshold, budget {b} | " + " | ".join(f"{r['per_step'][s]:.2f}" for s in shown) + " |"
        for b, r in by_budget.items()
        if b in ("0.5", "1.0", "1.5")
    ]
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()

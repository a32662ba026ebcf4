"""The paper's findings at small scale: train small Race-DiTs on shapes10 with equal steps and seed,
varying one thing at a time, and evaluate each like the bundled model (cfg 4, 25 Euler steps, the
shipped classifier).

    python bench/ablation.py [--steps 1200] [--workers 2] [--num-samples 500] [--only NAME ...]

Studies (docs/science.md):
  Table 1  routing {token choice, expert choice, expert race} x gating {softmax, sigmoid, identity},
           no auxiliary losses; races infer with the learned threshold.
  Table 3  the ladder: softmax race (top-k race at inference), identity gating, + threshold
           inference, + per-layer regularisation, + router similarity.
  Table 2  router similarity against a balance loss (both on top of per-layer regularisation).
  Fig. 6   experts per token over t for every race model that infers with a threshold.

Each training run is saved under runs/ablation/NAME (checkpoint, metrics.csv, evaluations) and its
result under bench/results/ablation/NAME.json, so an interrupted study resumes where it stopped.
The summary goes to bench/results/ablation.{json,md} and docs/science-*.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import RESULTS, save  # noqa: E402

RUNS_DIR = ROOT / "runs" / "ablation"
PER_RUN = RESULTS / "ablation"
DOCS = ROOT / "docs"

# The small model: shapes10's 32x32 images in 64 patch tokens, width 96, depth 4, MoE 2in8; batch 32.
MODEL = {"preset": "shapes10", "hidden_size": 96, "depth": 4, "num_heads": 4}
NO_AUX = {"plr": 0.0, "similarity": 0.0, "balance": 0.0}

# name -> (moe overrides, loss weights). One training run each.
# In the order they train: the race runs (the ladder, Table 2, Fig. 6) first, then Table 1's others.
RUNS: dict[str, tuple[dict, dict]] = {
    "expert_race-identity": ({"routing": "expert_race", "gating": "identity"}, NO_AUX),
    "race-identity-plr-sim": (
        {"routing": "expert_race", "gating": "identity"},
        {**NO_AUX, "plr": 1.0, "similarity": 0.01},
    ),
    "expert_race-softmax": ({"routing": "expert_race", "gating": "softmax"}, NO_AUX),
    "race-identity-plr": ({"routing": "expert_race", "gating": "identity"}, {**NO_AUX, "plr": 1.0}),
    "race-identity-plr-balance": (
        {"routing": "expert_race", "gating": "identity"},
        {**NO_AUX, "plr": 1.0, "balance": 0.01},
    ),
    "expert_race-sigmoid": ({"routing": "expert_race", "gating": "sigmoid"}, NO_AUX),
    **{
        f"{routing}-{gating}": ({"routing": routing, "gating": gating}, NO_AUX)
        for routing in ("token_choice", "expert_choice")
        for gating in ("softmax", "sigmoid", "identity")
    },
}

# table -> rows of (label, run, inference mode at evaluation)
TABLES: dict[str, list[tuple[str, str, str]]] = {
    # As in the paper, Table 1's races pick the top-k pairs of the batch at inference too (the learned
    # threshold enters at Table 3's third row).
    "table1": [
        (f"{routing} / {gating}", f"{routing}-{gating}", "topk" if routing == "expert_race" else "threshold")
        for routing in ("token_choice", "expert_choice", "expert_race")
        for gating in ("softmax", "sigmoid", "identity")
    ],
    "table3": [
        ("softmax race (top-k race at inference)", "expert_race-softmax", "topk"),
        ("+ identity gating", "expert_race-identity", "topk"),
        ("+ threshold inference", "expert_race-identity", "threshold"),
        ("+ per-layer regularisation", "race-identity-plr", "threshold"),
        ("+ router similarity", "race-identity-plr-sim", "threshold"),
    ],
    "table2": [
        ("per-layer regularisation only", "race-identity-plr", "threshold"),
        ("+ balance loss 0.01", "race-identity-plr-balance", "threshold"),
        ("+ router similarity 0.01", "race-identity-plr-sim", "threshold"),
    ],
}


def train_config(name: str, steps: int, seed: int) -> dict:
    moe, loss = RUNS[name]
    return {
        "model": {**MODEL, "moe": {"spec": "2in8", "router": "mlp", "threshold_momentum": 0.99, **moe}},
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
            "seed": seed,
            "threads": 1,
            "log_every": 50,
            "checkpoint_every": steps,
            "sample_every": steps,
        },
        "loss": loss,
    }


def with_inference(checkpoint: Path, mode: str) -> Path:
    """The checkpoint itself, or a copy whose config infers by `mode` (same weights)."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config["model"]["moe"]["inference"] == mode:
        return checkpoint
    copy = checkpoint.parent / f"checkpoint-{mode}"
    shutil.copytree(checkpoint, copy, dirs_exist_ok=True)
    config["model"]["moe"]["inference"] = mode
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def last_metrics(metrics_csv: Path) -> dict:
    """The final logged training row, averaged over the last 4 logs (the loss is noisy)."""
    rows = list(csv.DictReader(metrics_csv.open()))[-4:]
    keys = ("loss", "mse", "plr", "maxvio", "comb_usage")
    return {f"train_{k}": sum(float(r[k]) for r in rows) / len(rows) for k in keys if k in rows[-1]}


def run_one(name: str, steps: int, seed: int, num_samples: int) -> dict:
    import torch

    from racedit.model.training.config import parse_config
    from racedit.model.training.train import train

    torch.set_num_threads(1)
    tag = run_tag(name, seed)
    out = RUNS_DIR / tag
    if out.exists():
        shutil.rmtree(out)
    config = train_config(name, steps, seed)
    start = time.time()
    train(parse_config(config), out, progress=False)
    result = {
        "name": name,
        "seed": seed,
        "config": config,
        "train_seconds": round(time.time() - start, 1),
        **last_metrics(out / "metrics.csv"),
        "evaluations": {},
    }
    modes = sorted({mode for rows in TABLES.values() for _, run, mode in rows if run == name}) or ["threshold"]
    for mode in modes:
        result["evaluations"][mode] = evaluation(tag, mode, num_samples)
    PER_RUN.mkdir(parents=True, exist_ok=True)
    (PER_RUN / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{tag}: {result['train_seconds']:.0f} s, "
        + ", ".join(
            f"{m}: fidelity {e['class_fidelity']:.3f} FD {e['frechet_distance']:.2f}"
            for m, e in result["evaluations"].items()
        ),
        flush=True,
    )
    return result


def run_tag(name: str, seed: int) -> str:
    """Where a run lives: its name for the study's seed 0, NAME-seedS for a repeat with another seed."""
    return name if seed == 0 else f"{name}-seed{seed}"


def _job(args: tuple) -> dict:
    return run_one(*args)


def evaluation(name: str, mode: str, num_samples: int) -> dict:
    """The `mode` evaluation of a trained run (its tag): what evaluate reports, as saved in its result."""
    from racedit.model.training.evaluate import evaluate

    checkpoint = RUNS_DIR / name / "checkpoint"
    report = evaluate(
        with_inference(checkpoint, mode),
        num_samples,
        cfg_scale=4.0,
        num_steps=25,
        batch_size=100,
        out=RUNS_DIR / name / f"eval-{mode}",
    )
    return {
        k: report[k]
        for k in (
            "class_fidelity",
            "per_class_fidelity",
            "frechet_distance",
            "mean_experts_per_token",
            "experts_per_token_histogram",
            "maxvio",
            "combination_usage",
            "experts_per_token_by_t",
        )
    }


def summarise(num_samples: int = 500) -> None:
    everything = {p.stem: json.loads(p.read_text()) for p in sorted(PER_RUN.glob("*.json"))}
    results = {tag: r for tag, r in everything.items() if tag in RUNS}
    repeats = {tag: r for tag, r in everything.items() if tag not in RUNS}  # other seeds of a run
    for table_rows in TABLES.values():  # evaluations a table asks for that the run's own pass did not make
        for _, run, mode in table_rows:
            if run in results and mode not in results[run]["evaluations"]:
                results[run]["evaluations"][mode] = evaluation(run, mode, num_samples)
                (PER_RUN / f"{run}.json").write_text(json.dumps(results[run], indent=2) + "\n")
    tables = {}
    for table, rows in TABLES.items():
        tables[table] = []
        for label, run, mode in rows:
            if run not in results:
                continue
            r, e = results[run], results[run]["evaluations"][mode]
            tables[table].append(
                {
                    "table": table,
                    "row": label,
                    "run": run,
                    "inference": mode,
                    "class_fidelity": e["class_fidelity"],
                    "frechet_distance": e["frechet_distance"],
                    "final_mse": r.get("train_mse", float("nan")),  # the denoising loss alone
                    "final_loss": r.get("train_loss", float("nan")),  # with the run's auxiliary terms
                    "maxvio": e["maxvio"],
                    "combination_usage": e["combination_usage"],
                    "experts_per_token": e["mean_experts_per_token"],
                }
            )
    tables["seeds"] = []  # a run and its repeats with other seeds: how far seed alone moves the numbers
    for repeat in repeats.values():
        for r in (results.get(repeat["name"]), repeat):
            if r is None:
                continue
            e = r["evaluations"]["threshold"]
            tables["seeds"].append(
                {
                    "table": "seeds",
                    "row": f"seed {r['config']['optim']['seed']}",
                    "run": r["name"],
                    "inference": "threshold",
                    "class_fidelity": e["class_fidelity"],
                    "frechet_distance": e["frechet_distance"],
                    "final_mse": r.get("train_mse", float("nan")),
                    "final_loss": r.get("train_loss", float("nan")),
                    "maxvio": e["maxvio"],
                    "combination_usage": e["combination_usage"],
                    "experts_per_token": e["mean_experts_per_token"],
                }
            )
    any_run = next(iter(results.values()), None)
    save(
        "ablation",
        {
            "model": MODEL,
            "steps": any_run and any_run["config"]["optim"]["steps"],
            "seed": any_run and any_run["config"]["optim"]["seed"],
            "train_seconds": {n: r["train_seconds"] for n, r in results.items()},
            "experts_per_token_by_t": {
                n: r["evaluations"]["threshold"]["experts_per_token_by_t"]
                for n, r in results.items()
                if RUNS[n][0]["routing"] == "expert_race" and "threshold" in r["evaluations"]
            },
        },
        [row for rows in tables.values() for row in rows],
    )
    plot(results, tables)


def plot(results: dict, tables: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    t1 = {(row["run"].split("-")[0], row["run"].split("-")[1]): row for row in tables.get("table1", [])}
    gatings = ("softmax", "sigmoid", "identity")
    for i, routing in enumerate(("token_choice", "expert_choice", "expert_race")):
        values = [t1[(routing, g)]["frechet_distance"] if (routing, g) in t1 else 0.0 for g in gatings]
        axes[0].bar([x + 0.27 * (i - 1) for x in range(3)], values, width=0.27, label=routing.replace("_", " "))
    axes[0].set_xticks(range(3), gatings)
    axes[0].set_ylabel("Frechet distance (lower is better)")
    axes[0].set_title("Table 1: routing x gating")
    axes[0].legend(fontsize=8)
    axes[0].grid(axis="y", alpha=0.3)
    ladder = tables.get("table3", [])
    axes[1].barh(range(len(ladder)), [r["frechet_distance"] for r in ladder], color="#4c72b0")
    axes[1].set_yticks(
        range(len(ladder)), [r["row"].replace(" (top-k race at inference)", "") for r in ladder], fontsize=8
    )
    axes[1].invert_yaxis()
    axes[1].set_xlabel("Frechet distance (lower is better)")
    axes[1].set_title("Table 3: the ladder")
    axes[1].grid(axis="x", alpha=0.3)
    for name, result in results.items():
        evaluation = result["evaluations"].get("threshold")
        if RUNS[name][0]["routing"] != "expert_race" or evaluation is None:
            continue
        by_t = evaluation["experts_per_token_by_t"]
        axes[2].plot([float(t) for t in by_t], list(by_t.values()), label=name, linewidth=1.2)
    axes[2].axhline(2, color="grey", linestyle="--", linewidth=0.8, label="k = 2")
    axes[2].set_xlim(1.0, 0.0)
    axes[2].set_xticks([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    axes[2].set_xlabel("t (sampling runs from 1 to 0)")
    axes[2].set_ylabel("experts per token")
    axes[2].set_title("Fig. 6: compute over t")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "science-ablation.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="training runs at once, one thread each")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="train these runs (default: every missing one)")
    # e.g. --seed 1 --only expert_race-identity: a repeat, saved as NAME-seed1 and shown beside seed 0
    parser.add_argument("--summarise", action="store_true", help="only rebuild the tables and figure")
    args = parser.parse_args()
    if not args.summarise:
        todo = args.only or [n for n in RUNS if not (PER_RUN / f"{run_tag(n, args.seed)}.json").exists()]
        print(
            f"training {len(todo)} runs of {args.steps} steps, {args.workers} at a time: {', '.join(todo)}", flush=True
        )
        jobs = [(name, args.steps, args.seed, args.num_samples) for name in todo]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for _ in pool.imap_unordered(_job, jobs):
                pass
    summarise(args.num_samples)


if __name__ == "__main__":
    main()

"""Evaluation: `racedit eval --checkpoint PATH`.

Class fidelity is the share of generated images that a shapes10 classifier
(shipped in `weights/shapes10-classifier`, trained by `racedit train-classifier`)
assigns to the class that was asked for. The Frechet distance is computed in
that classifier's 64-d feature space against real val images drawn in the style the model
was trained on (its checkpoint's `data.style`), and also against shapes10's default style
when that differs. The Fig. 6 plot shows mean experts per token against the sampling timestep.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import CheckpointError, load
from ..config import SHAPES10_CLASSES
from ..samplers import time_grid
from ..sampling import generate
from .data import Shapes10, ShapesStyle

DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "weights" / "shapes10-classifier"  # in model/weights


class ShapesClassifier(nn.Module):
    """A small CNN for 32x32 shapes10; `features` gives the 64-d embedding used for FD."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.body = nn.Sequential(
            stage(3, 16),
            nn.MaxPool2d(2),
            stage(16, 32),
            nn.MaxPool2d(2),
            stage(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def load_classifier(path: Optional[Path] = None) -> ShapesClassifier:
    folder = Path(path or DEFAULT_CLASSIFIER)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; train one with `racedit train-classifier`")
    model = ShapesClassifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def classify(
    model: ShapesClassifier, images_uint8: torch.Tensor, batch: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels [N] and features [N, 64]."""
    preds, feats = [], []
    for chunk in images_uint8.split(batch):
        f = model.features(to_input(chunk))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.t()
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def train_classifier(out: Path, steps: int = 600, batch: int = 64, seed: int = 0) -> float:
    """Train on shapes10 train (with pixel noise, so it also reads imperfect samples); returns val accuracy."""
    torch.manual_seed(seed)
    images, labels = Shapes10("train").materialize()
    val_images, val_labels = Shapes10("val").materialize()
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = to_input(images[index])
        x = x + torch.randn(x.shape, generator=g) * torch.rand(batch, 1, 1, 1, generator=g) * 0.15
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"classifier step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    preds, _ = classify(model, val_images)
    accuracy = float((preds == val_labels).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {"classes": SHAPES10_CLASSES, "val_accuracy": accuracy, "steps": steps, "batch": batch, "seed": seed},
            indent=2,
        )
        + "\n"
    )
    return accuracy


def plot_experts_per_timestep(
    grid_t: Sequence[float], per_step: Sequence[float], k: int, path: Path, title: str
) -> None:
    """Mean experts per token at each sampling step, t running from 1 (noise) to 0 as sampling does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(grid_t, per_step, marker="o", markersize=3, label="mean experts per token")
    ax.axhline(k, color="grey", linestyle="--", linewidth=1, label=f"k = {k} (nominal)")
    ax.set_xlim(1.0, 0.0)  # sampling goes from noise to image
    ax.set_xticks([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    ax.set_xlabel("t (1 = noise, 0 = image)")
    ax.set_ylabel("experts per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sample_grid(images: torch.Tensor, class_names: Sequence[str], path: Path, columns: int = 10) -> None:
    """uint8 [N, 3, H, W], image i of class i % columns: one column per class, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-images.shape[0] // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.3), dpi=120, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < images.shape[0]:
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        if i < columns:
            ax.set_title(class_names[i % len(class_names)], fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (rows * 0.9 + 0.3), wspace=0.05, hspace=0.05)
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def routing_probe(
    model, images_uint8: torch.Tensor, labels: torch.Tensor, grid_t: Sequence[float], seed: int = 0
) -> float:
    """Combination usage (docs/design.md, paper Fig. 13) of real images noised to each t of the time
    grid: per layer and t over the batch's tokens, then averaged."""
    from .losses import combination_usage

    generator = torch.Generator().manual_seed(seed)
    x0 = to_input(images_uint8)
    values = []
    for t in grid_t:
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t) * x0 + t * noise
        stats = model(x_t, torch.full((x0.shape[0],), float(t)), labels, return_stats=True).stats
        values += [combination_usage(r.mask) for r in stats.routing]
    return float(np.mean(values))


def reference_style(model) -> ShapesStyle:
    """The shapes10 style of the real images FD compares with: the one the checkpoint was trained
    on (its training config's `data.style`), or shapes10's default for checkpoints that record none."""
    data = (model.metadata or {}).get("train_config", {}).get("data", {})
    if data.get("name") == "shapes10" and data.get("style"):
        return ShapesStyle(**data["style"])
    return ShapesStyle()


def evaluate(
    checkpoint: Path,
    num_samples: int,
    cfg_scale: float,
    num_steps: int,
    batch_size: int,
    out: Path,
    classifier_path: Optional[Path] = None,
    dtype: str = "float32",
) -> dict:
    from .losses import max_violation

    model = load(checkpoint).set_precision(getattr(torch, dtype))
    classifier = load_classifier(classifier_path)
    n_classes = model.config.num_classes
    labels = [i % n_classes for i in range(num_samples)]
    images, usages = [], []
    start = time.time()
    for lo in range(0, num_samples, batch_size):
        chunk = labels[lo : lo + batch_size]
        imgs, usage = generate(
            model, chunk, cfg_scale=cfg_scale, num_steps=num_steps, seeds=list(range(lo, lo + len(chunk)))
        )
        images.append(imgs)
        usages.extend(usage)
    images = torch.cat(images)
    seconds = time.time() - start
    preds, feats = classify(classifier, images)
    target = torch.tensor(labels)
    style = reference_style(model)
    val_images, val_labels = Shapes10("val", style=style).materialize()
    _, real_feats = classify(classifier, val_images)
    default_fd = {}
    if style != ShapesStyle():  # also against shapes10's default style, to compare with models trained on it
        _, default_feats = classify(classifier, Shapes10("val").materialize()[0])
        default_fd = {"frechet_distance_default_style": frechet_distance(feats, default_feats)}
    per_step = np.mean([u.per_step for u in usages], axis=0).tolist()
    grid_t = time_grid(num_steps)[:-1]
    loads = np.sum([[layer.expert_load for layer in u.per_layer] for u in usages], axis=0)  # [layers, E]
    k = model.config.moe.k if model.config.moe else 0
    out.mkdir(parents=True, exist_ok=True)
    names = model.config.class_names or [str(c) for c in range(n_classes)]
    plot_sample_grid(images[: min(100, num_samples)], names[:n_classes], out / "samples.png", columns=n_classes)
    plot_experts_per_timestep(
        grid_t,
        per_step,
        k,
        out / "experts_per_timestep.png",
        title=f"Experts per token over sampling (cfg {cfg_scale:g}, {num_steps} steps)",
    )
    report = {
        "checkpoint": str(checkpoint),
        "num_samples": num_samples,
        "cfg_scale": cfg_scale,
        "num_steps": num_steps,
        "dtype": dtype,
        "class_fidelity": float((preds == target).float().mean()),
        "per_class_fidelity": {
            SHAPES10_CLASSES[c]: float((preds[target == c] == c).float().mean())
            for c in range(n_classes)
            if (target == c).any()
        },
        "frechet_distance": frechet_distance(feats, real_feats),
        "frechet_reference": {"split": "val", "images": len(val_images), "style": dataclasses.asdict(style)},
        **default_fd,
        "mean_experts_per_token": float(np.mean([u.mean_experts_per_token for u in usages])),
        # share of (layer, token, step) slots whose token used 0..E experts, over all samples
        "experts_per_token_histogram": np.mean([u.experts_per_token_histogram for u in usages], axis=0)
        .round(6)
        .tolist(),
        # per layer over every token and step of the samples, then averaged over layers
        "maxvio": float(np.mean([max_violation(torch.from_numpy(layer)) for layer in loads])) if k else 0.0,
        # real val images (one per class, in turn) noised to each t of the grid
        "combination_usage": routing_probe(model, val_images[: n_classes * 5], val_labels[: n_classes * 5], grid_t)
        if k
        else 0.0,
        "experts_per_token_by_t": {f"{t:.2f}": round(v, 4) for t, v in zip(grid_t, per_step)},
        "generation_seconds": round(seconds, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

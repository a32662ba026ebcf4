"""Evaluation: classifier, Frechet distance, and `racedit eval` on the shipped checkpoint."""

import json
import subprocess
import sys

import torch
from PIL import Image

from racedit.model import DEFAULT_CHECKPOINT, build, generate, load
from racedit.model.config import SHAPES10_CLASSES
from racedit.model.training.data import Shapes10, ShapesStyle
from racedit.model.training.evaluate import classify, frechet_distance, load_classifier, reference_style


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    b = torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, b) < 0.1
    assert frechet_distance(a, b + 1.0) > 7.5  # a mean shift of 1 in 8 dims adds 8
    assert frechet_distance(a, b * 2) > 1.0


def test_shipped_classifier_is_accurate_on_real_val_images():
    images, labels = Shapes10("val", length=400).materialize()
    preds, feats = classify(load_classifier(), images)
    assert float((preds == labels).float().mean()) >= 0.98
    assert feats.shape == (400, 64)


def test_fd_reference_is_drawn_in_the_models_training_style():
    model = build("tiny")
    assert reference_style(model) == ShapesStyle()  # a checkpoint that records no training data
    model.metadata = {"train_config": {"data": {"name": "shapes10", "style": {"rotation": 5.0, "min_size": 0.6}}}}
    assert reference_style(model) == ShapesStyle(rotation=5.0, min_size=0.6)


def test_shipped_checkpoint_loads():
    model = load(DEFAULT_CHECKPOINT)
    cfg = model.config
    assert cfg.moe.routing == "expert_race" and cfg.moe.gating == "identity" and cfg.moe.router == "mlp"
    assert cfg.moe.inference == "threshold" and all(float(layer.threshold) != 0 for layer in model.moe_layers)
    assert model.metadata["step"] > 0 and model.metadata["history"]
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 25 * 2**20


def test_shipped_model_draws_every_class():
    """A guard on the bundled weights: 20 samples per class (cfg 4, 25 Euler steps, the evaluation's
    first 200 seeds), every class read as asked at least 17 times (a class drawn right 70 % of the
    time passes that with probability 0.11), 0.95 overall.

    The bundled model (attempt 8) draws all 200 as asked; the one before (attempt 6) drew 11 of 20
    hexagons (and 18 of 20 crosses) and fails.
    """
    model = load(DEFAULT_CHECKPOINT)
    labels = list(range(10)) * 20
    images = torch.cat(
        [
            generate(model, labels=labels[lo : lo + 100], cfg_scale=4.0, num_steps=25, seeds=list(range(lo, lo + 100)))[
                0
            ]
            for lo in (0, 100)
        ]
    )
    preds, _ = classify(load_classifier(), images)
    target = torch.tensor(labels)
    per_class = {name: int((preds[target == c] == c).sum()) for c, name in enumerate(SHAPES10_CLASSES)}
    assert min(per_class.values()) >= 17, per_class
    assert float((preds == target).float().mean()) >= 0.95, per_class


def test_eval_cli_runs_on_a_small_sample(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit.cli",
            "eval",
            "--num-samples",
            "20",
            "--num-steps",
            "4",
            "--batch-size",
            "20",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= report["class_fidelity"] <= 1.0 and report["frechet_distance"] >= 0
    assert len(report["experts_per_token_by_t"]) == 4 and len(report["per_class_fidelity"]) == 10
    histogram = report["experts_per_token_histogram"]  # 0..E experts, shares of (layer, token, step) slots
    assert len(histogram) == 9 and abs(sum(histogram) - 1) < 1e-4
    mean = sum(j * share for j, share in enumerate(histogram))
    assert abs(mean - report["mean_experts_per_token"]) < 1e-3  # the histogram is of the same counts
    assert report["maxvio"] >= 0 and 0 < report["combination_usage"] <= 1
    for name in ("samples.png", "experts_per_timestep.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 100

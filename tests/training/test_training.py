"""The training module: loss decreases, determinism, resume, bad configs, DDP on gloo."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from racedit.model import load
from racedit.model.checkpoint import read_config
from racedit.model.config import ConfigError
from racedit.model.training.config import OptimConfig, Restart, is_pipeline, load_config, load_pipeline, parse_config
from racedit.model.training.train import batch_sampler, learning_rate, train

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(steps=40, **optim):
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["optim"].update(steps=steps, **optim)
    return parse_config(doc)


def losses(folder):
    with open(folder / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_loss_decreases_on_tiny(tmp_path):
    config = tiny_config(steps=120, log_every=20, checkpoint_every=120, sample_every=120)
    train(config, tmp_path, progress=False)
    series = losses(tmp_path)
    assert series[-1] < 0.8 * series[0], series
    model = load(tmp_path / "checkpoint")
    assert model.metadata["step"] == 120 and model.metadata["history"][0]["to_step"] == 120
    assert (tmp_path / "samples-0000120.png").is_file()
    with open(tmp_path / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    for key in ("mse", "plr", "similarity", "ept_t0", "ept_t3", "maxvio", "comb_usage", "tau0"):
        assert key in row


def test_same_seed_same_losses(tmp_path):
    train(tiny_config(steps=20), tmp_path / "a", progress=False)
    train(tiny_config(steps=20), tmp_path / "b", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_continues_and_records_history(tmp_path):
    train(tiny_config(steps=20), tmp_path / "a", progress=False)
    train(tiny_config(steps=40), tmp_path / "b", resume=tmp_path / "a" / "checkpoint", progress=False)
    history = load(tmp_path / "b" / "checkpoint").metadata["history"]
    assert [(h["from_step"], h["to_step"]) for h in history] == [(0, 20), (20, 40)]
    # Resuming reproduces the uninterrupted run.
    train(tiny_config(steps=40), tmp_path / "c", progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "c")[-2:]


def test_init_starts_from_a_checkpoint(tmp_path):
    train(tiny_config(steps=20), tmp_path / "a", progress=False)
    start = load(tmp_path / "a" / "checkpoint")
    train(tiny_config(steps=5), tmp_path / "b", progress=False, init=tmp_path / "a" / "checkpoint")
    tuned = load(tmp_path / "b" / "checkpoint")
    history = tuned.metadata["history"]
    assert len(history) == 2 and history[-1]["initialised_from"].endswith("checkpoint")
    # Five small steps from the start weights stay close to them (a fresh init would not).
    drift = max((a - b).abs().max().item() for a, b in zip(start.parameters(), tuned.parameters()))
    assert drift < 0.05
    with pytest.raises(ConfigError, match="--init"):
        wider = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        wider["model"]["hidden_size"] = 32
        train(parse_config(wider), tmp_path / "c", progress=False, init=tmp_path / "a" / "checkpoint")


def test_learning_rate_warms_up_holds_then_cools_down():
    o = OptimConfig(steps=100, lr=1e-3, warmup_steps=10, decay_steps=40, min_lr=1e-4)
    lrs = [learning_rate(o, step) for step in range(o.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:61])
    assert all(a > b for a, b in zip(lrs[60:], lrs[61:]))  # strictly decreasing cosine
    assert lrs[80] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert lrs[-1] > 1e-4 and lrs[-1] == pytest.approx(1e-4, rel=0.02)
    assert learning_rate(OptimConfig(steps=100, lr=1e-3, warmup_steps=1), 99) == 1e-3  # no decay by default


def test_warm_restarts_repeat_hold_and_cool_down():
    restarts = [
        Restart(at=100, lr=3e-4, decay_steps=40, min_lr=2e-5),
        Restart(at=150, lr=2e-4, decay_steps=50, min_lr=1e-5),
    ]
    o = OptimConfig(steps=200, lr=1e-3, warmup_steps=10, decay_steps=40, min_lr=5e-5, restarts=restarts)
    lrs = [learning_rate(o, step) for step in range(o.steps)]
    first = OptimConfig(steps=100, lr=1e-3, warmup_steps=10, decay_steps=40, min_lr=5e-5)
    assert lrs[:100] == [learning_rate(first, step) for step in range(100)]  # the first piece as if alone
    assert lrs[100:110] == [3e-4] * 10  # restart: hold the new lr until its cool-down starts at 110
    assert lrs[110] == pytest.approx(3e-4) and lrs[149] == pytest.approx(2e-5, abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[110:150], lrs[111:150]))
    assert lrs[150] == 2e-4 and lrs[199] == pytest.approx(1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["optim"].update(stepz=3), "unknown key optim.stepz"),
        (lambda d: d["optim"].update(lr="fast"), "optim.lr must be a number, got 'fast'"),
        (lambda d: d["optim"].update(steps=True), "optim.steps must be an integer, got True"),
        (lambda d: d["optim"].update(steps="40"), "optim.steps must be an integer, got '40'"),
        (lambda d: d["model"].update(depth=2.5), "model.depth must be an integer, got 2.5"),
        (
            lambda d: d["data"].update(style={"min_size": 0.5, "size": 1}),
            r"unknown key data.style.size \(allowed: jitter",
        ),
        (lambda d: d["model"].update(image_size=18), "not divisible by model.patch_size"),
        (lambda d: d.update(extra=1), r"unknown key extra \(allowed: calibration, data, loss, model, optim\)"),
        (lambda d: d["data"].update(name="imagenet"), "data.name"),
        (lambda d: d["model"].update(moe={"routing": "nope"}), "moe.routing"),
        (lambda d: d["optim"].update(decay_steps=10_000), "optim.decay_steps must be in 0..optim.steps"),
        (lambda d: d["optim"].update(min_lr=1.0), "optim.min_lr must be in 0..optim.lr"),
        (
            lambda d: d["optim"].update(restarts=[{"at": 10, "lr": 1e-4, "decay_steps": 5, "min_lr": 0.0, "x": 1}]),
            r"unknown key optim.restarts\[0\].x",
        ),
        (
            lambda d: d["optim"].update(restarts=[{"at": 10, "lr": 1e-4, "decay_steps": 5}]),
            r"optim.restarts\[0\].min_lr is missing",
        ),
        (
            lambda d: d["optim"].update(restarts=[{"at": 10, "lr": "low", "decay_steps": 5, "min_lr": 0.0}]),
            r"optim.restarts\[0\].lr must be a number, got 'low'",
        ),
        (
            lambda d: d["optim"].update(
                steps=40,
                restarts=[
                    {"at": 20, "lr": 1e-4, "decay_steps": 5, "min_lr": 0.0},
                    {"at": 18, "lr": 1e-4, "decay_steps": 5, "min_lr": 0.0},
                ],
            ),
            r"optim.restarts\[1\].at must be >= 25",
        ),
        (
            lambda d: d["optim"].update(steps=40, restarts=[{"at": 30, "lr": 1e-4, "decay_steps": 20, "min_lr": 0.0}]),
            r"optim.steps \(40\) must leave room for the last piece",
        ),
        (
            lambda d: (d["data"].update(name="imagefolder", root="x"), d["model"].update(in_channels=4)),
            "ImageFolder in pixel space needs model.in_channels 3",
        ),
        (lambda d: d["data"].update(class_weights={"octagon": 2.0}), "data.class_weights: 'octagon' is not a class"),
        (lambda d: d["data"].update(class_weights={"hexagon": 0}), "data.class_weights.hexagon must be a number > 0"),
        (
            lambda d: d["data"].update(class_weights={"hexagon": True}),
            "data.class_weights.hexagon must be a number, got True",
        ),
        (lambda d: d.setdefault("loss", {}).update(t_std=0.0), "loss.t_std must be > 0, got 0.0"),
        (lambda d: d.setdefault("loss", {}).update(t_mean="noisy"), "loss.t_mean must be a number, got 'noisy'"),
    ],
)
def test_bad_config_fails_before_training(mutate, message):
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    mutate(doc)
    with pytest.raises(ConfigError, match=message):
        parse_config(doc)


def test_cli_reports_bad_config_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny, patch_size: 5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "train", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "model.image_size 16 is not divisible by model.patch_size 5" in result.stderr


def test_class_weights_draw_more_of_the_named_classes():
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["data"]["class_weights"] = {"hexagon": 3.0}
    config = parse_config(doc)
    labels = torch.arange(10_000) % 10
    draw = batch_sampler(config, labels, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    share = torch.bincount(labels[torch.cat([draw(generator) for _ in range(200)])], minlength=10).float()
    share /= share.sum()
    hexagon = config.model.class_names.index("hexagon")
    assert share[hexagon] == pytest.approx(3 / 12, abs=0.02)  # 3 of 12 weight units
    assert all(share[c] == pytest.approx(1 / 12, abs=0.015) for c in range(10) if c != hexagon)


def test_shipped_configs_parse(tmp_path, monkeypatch):
    from conftest import tiny_vae

    monkeypatch.chdir(tmp_path)  # relative paths in configs resolve here
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        vae = (yaml.safe_load(path.read_text()).get("data") or {}).get("vae")
        if vae:  # a latent config reads its VAE's channels: give it one (the walk-through's script writes it)
            tiny_vae().save_pretrained(tmp_path / vae)
        if is_pipeline(str(path)):
            _, configs = load_pipeline(str(path))
            assert configs, path
            continue
        config = load_config(str(path))
        assert config.optim.steps >= 1, path


def test_ddp_two_gloo_processes_hold_identical_weights(tmp_path):
    cfg = tmp_path / "ddp.yaml"
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["optim"].update(steps=6, checkpoint_every=6, sample_every=1000, log_every=3)
    cfg.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "racedit.cli",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    digests = [(tmp_path / "out" / f"weights-rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    assert load(tmp_path / "out" / "checkpoint").metadata["history"][0]["world_size"] == 2


def test_train_on_an_image_folder_names_the_classes(tmp_path):
    from PIL import Image

    names = [f"class{i:02d}" for i in range(10)]
    for i, name in enumerate(names):
        (tmp_path / "images" / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (20, 20), (25 * i, 100, 40 * j)).save(tmp_path / "images" / name / f"{j}.png")
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["data"] = {"name": "imagefolder", "root": str(tmp_path / "images")}
    doc["optim"].update(steps=3, checkpoint_every=3, sample_every=100)
    path = train(parse_config(doc), tmp_path / "run", progress=False)
    assert load(path).config.class_names == names
    doc["model"]["num_classes"] = 12
    with pytest.raises(ConfigError, match="model.num_classes is 12 but data.root .* has 10 class folders"):
        train(parse_config(doc), tmp_path / "run2", progress=False)


def test_calibrate_sets_thresholds_from_the_models_own_sampling(tiny_checkpoint, tmp_path):
    from racedit.cli import main as cli
    from racedit.model import generate

    out = tmp_path / "calibrated"
    assert (
        cli(
            [
                "calibrate",
                str(tiny_checkpoint),
                "--out",
                str(out),
                "--num-images",
                "20",
                "--num-steps",
                "10",
                "--iterations",
                "3",
            ]
        )
        == 0
    )
    before, after = load(tiny_checkpoint), load(out)
    record = after.metadata["threshold_calibration"]
    assert record["thresholds"] == [float(layer.threshold) for layer in after.moe_layers]
    assert record["thresholds_before"] == [float(layer.threshold) for layer in before.moe_layers]
    labels = [i % 10 for i in range(20)]
    seeds = list(range(10_000, 10_020))
    k = after.config.moe.k
    _, usage = generate(after, labels, cfg_scale=4.0, num_steps=10, seeds=seeds)
    calibrated = sum(u.mean_experts_per_token for u in usage) / len(usage)
    _, usage = generate(before, labels, cfg_scale=4.0, num_steps=10, seeds=seeds)
    uncalibrated = sum(u.mean_experts_per_token for u in usage) / len(usage)
    assert abs(calibrated - k) <= 0.05 * k and abs(calibrated - k) < abs(uncalibrated - k), (calibrated, uncalibrated)
    # The compute dial's table travels in the checkpoint, its 1.0 row the thresholds just calibrated.
    table = after.metadata["budget_table"]
    assert table["budgets"] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert table["thresholds"][3] == record["thresholds"]
    assert table["mean_experts_per_token"] == sorted(table["mean_experts_per_token"])


def test_training_calibrates_the_saved_ema_thresholds(tmp_path):
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["optim"].update(steps=10, checkpoint_every=10, sample_every=1000)
    doc["calibration"] = {"num_images": 10, "num_steps": 5, "iterations": 1}
    train(parse_config(doc), tmp_path, progress=False)
    record = load(tmp_path / "checkpoint").metadata["threshold_calibration"]
    assert record["num_images"] == 10 and len(record["thresholds"]) == 2
    assert record["thresholds"] != record["thresholds_before"]  # the live model's values were replaced
    doc["calibration"] = {"images": 10}
    with pytest.raises(ConfigError, match="calibration.images"):
        parse_config(doc)


def test_pipeline_chains_stages_resumes_and_ships(tmp_path):
    """`stages`: each stage fine-tunes the last one's checkpoint; a finished stage is kept, an
    unfinished one resumed; `ship` packs the result with the compute dial's table."""
    base = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    base["optim"].update(steps=20, checkpoint_every=20, sample_every=20)
    tune = yaml.safe_load(yaml.safe_dump(base))
    tune["data"]["class_weights"] = {"hexagon": 3.0}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    pipeline = {
        "stages": [{"name": "base", "config": "base.yaml"}, {"name": "tune", "config": "tune.yaml"}],
        "ship": {"weights_dtype": "float16"},
    }
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(pipeline))
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "train", "--config", str(tmp_path / "all.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage base: started" in done.stdout and "stage tune: started" in done.stdout
    history = load(out / "tune" / "checkpoint").metadata["history"]
    assert history[-1]["initialised_from"] == str(out / "base" / "checkpoint") and len(history) == 2
    shipped = load(out / "shipped")
    assert next(shipped.parameters()).dtype == torch.float32  # loaded for use in fp32 ...
    assert read_config(out / "shipped")["weights_dtype"] == "float16"  # ... stored in fp16
    assert 1.0 in [float(b) for b in shipped.metadata["budget_table"]["budgets"]]
    # Run again with a longer last stage: the first is kept, the second resumed where it stopped.
    base_mtime = (out / "base" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    tune["optim"].update(steps=30, checkpoint_every=10)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    again = subprocess.run(
        [sys.executable, "-m", "racedit.cli", "train", "--config", str(tmp_path / "all.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage base: finished (20 steps), kept" in again.stdout and "stage tune: resumed at step 20" in again.stdout
    assert (out / "base" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == base_mtime
    assert [(h["from_step"], h["to_step"]) for h in load(out / "tune" / "checkpoint").metadata["history"]][-2:] == [
        (0, 20),
        (20, 30),
    ]
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "racedit.cli",
            "train",
            "--config",
            str(tmp_path / "all.yaml"),
            "--init",
            str(out / "shipped"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "is a pipeline (stages)" in refused.stderr


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(stages=[]), "stages is empty"),
        (lambda d: d["stages"].append({"name": "a", "config": "tiny.yaml"}), "stage names must be distinct"),
        (lambda d: d["stages"][0].update(config="missing.yaml"), "stage a: config file .*missing.yaml not found"),
        (lambda d: d.update(ship={"weights_dtype": "int8"}), "ship.weights_dtype must be float32, float16 or bfloat16"),
        (lambda d: d.update(extra=1), r"unknown key extra \(allowed: ship, stages\)"),
    ],
)
def test_bad_pipeline_fails_before_training(tmp_path, mutate, message):
    (tmp_path / "tiny.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    doc = {"stages": [{"name": "a", "config": "tiny.yaml"}]}
    mutate(doc)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(str(tmp_path / "p.yaml"))

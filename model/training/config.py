"""Every section of a training config, typed in one place.

A training config is a YAML mapping with sections `model` (model/config.py: the network, which
serving reads too), `data`, `optim`, `loss` and `calibration`; a pipeline is a mapping of `stages`
and `ship`. Each section is a dataclass typed by pydantic (`parse_section`): strict types, choices
as `Literal`, ranges as `Field` bounds, unknown keys refused; errors name the key in the file's terms
(`optim.steps must be >= 1, got 0`). What one field cannot say alone (a cool-down that must fit
in its run, a VAE's channels against the model's) is checked in `parse_config`, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field

from .. import checkpoint
from ..autoencoder import Autoencoder, AutoencoderError, read_vae_config
from ..config import FORBID_UNKNOWN, Bool, ConfigError, Float, Int, ModelConfig, Str, parse_section, preset_config
from .data import ShapesStyle

Positive = Annotated[int, Field(strict=True, ge=1)]
Count = Annotated[int, Field(strict=True, ge=0)]
NonNegative = Annotated[float, Field(strict=True, ge=0)]


@dataclass
class DataConfig:
    __pydantic_config__ = FORBID_UNKNOWN

    name: Literal["shapes10", "imagefolder"] = "shapes10"
    root: Optional[Str] = None  # imagefolder only
    # imagefolder in latent space: a diffusers AutoencoderKL folder (save_pretrained). Images are
    # encoded once at start; the checkpoint carries the VAE (folder/vae) so it serves pictures.
    vae: Optional[Str] = None
    length: Positive = 50_000
    seed: Int = 0
    style: ShapesStyle = field(default_factory=ShapesStyle)  # nuisance variance of shapes10
    class_weights: dict[Str, Float] = field(default_factory=dict)  # class name -> sampling weight (others 1.0)


@dataclass(frozen=True)
class Restart:
    """A warm restart (SGDR): from step `at` a new piece holds `lr`, then cools down to
    `min_lr` over its own last `decay_steps`; the piece before it ends at `at`."""

    __pydantic_config__ = FORBID_UNKNOWN

    at: Int
    lr: Float
    decay_steps: Count
    min_lr: NonNegative


@dataclass
class OptimConfig:
    __pydantic_config__ = FORBID_UNKNOWN

    steps: Positive = 1000
    batch_size: Positive = 64
    lr: Float = 4e-4
    weight_decay: NonNegative = 0.0
    warmup_steps: Count = 100
    decay_steps: Count = 0  # cosine decay over the last decay_steps steps; 0 keeps lr constant
    min_lr: NonNegative = 0.0  # where the cosine decay ends
    restarts: list[Restart] = field(default_factory=list)  # in order
    grad_clip: Float = 1.0
    ema_decay: Float = 0.999
    seed: Int = 0
    log_every: Positive = 50
    checkpoint_every: Positive = 1000
    sample_every: Positive = 1000
    threads: Count = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class LossConfig:
    """The training objective: loss weights and where the timesteps fall."""

    __pydantic_config__ = FORBID_UNKNOWN

    plr: Float = 1.0  # per-layer regularisation
    similarity: Float = 0.01  # router similarity
    balance: Float = 0.0  # Switch-style balance (token-choice baselines)
    # t = sigmoid(t_mean + t_std * n), n ~ N(0, 1) (SD3's logit-normal); t_mean > 0 trains the
    # noisy steps, where the sampler decides a shape's outline, more often.
    t_mean: Float = 0.0
    t_std: Annotated[float, Field(strict=True, gt=0)] = 1.0


@dataclass
class Calibration:
    """How thresholds were estimated; stored in checkpoint metadata under `threshold_calibration`."""

    __pydantic_config__ = FORBID_UNKNOWN

    num_images: Positive = 40
    cfg_scale: Float = 4.0
    num_steps: Positive = 25
    iterations: Positive = 2  # `racedit calibrate --iterations 0` keeps the thresholds (not a training config)
    seed: Int = 10_000  # seeds of the calibration samples: apart from evaluation's 0..N-1


@dataclass
class TrainConfig:
    __pydantic_config__ = FORBID_UNKNOWN

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    calibration: Calibration = field(default_factory=Calibration)  # thresholds re-estimated on each saved EMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "loss": dataclasses.asdict(self.loss),
            "calibration": dataclasses.asdict(self.calibration),
        }


# ---------------------------------------------------------- cross-field ----
def check_restarts(o: OptimConfig) -> None:
    """Each restart comes in order and leaves room for the cool-down before it."""
    start, cooldown = 0, o.decay_steps  # the piece before the restart being checked
    for i, r in enumerate(o.restarts):
        name = f"optim.restarts[{i}]"
        earliest = start + max(1, cooldown)
        if r.at < earliest:
            raise ConfigError(
                f"{name}.at must be >= {earliest} (the previous piece's start plus its cool-down), got {r.at}"
            )
        if r.min_lr > r.lr:
            raise ConfigError(f"{name} needs min_lr in 0..lr, got {dataclasses.asdict(r)}")
        start, cooldown = r.at, r.decay_steps
    if start + max(1, cooldown) > o.steps:
        raise ConfigError(
            f"optim.steps ({o.steps}) must leave room for the last piece, which starts at "
            f"{start} and cools down over {cooldown} steps"
        )


def check_latent_data(data: DataConfig, model: ModelConfig) -> None:
    """data.vae names a readable VAE folder whose latents the model's input shape fits."""
    if data.name != "imagefolder":
        raise ConfigError("data.vae is for data.name imagefolder (shapes10 is drawn in pixel space)")
    try:
        Autoencoder(path=Path(data.vae), scaling_factor=1.0).check()
    except AutoencoderError as exc:
        raise ConfigError(f"data.vae: {exc}") from None
    channels = read_vae_config(Path(data.vae)).get("latent_channels", 4)
    if model.in_channels != channels:
        raise ConfigError(
            f"model.in_channels is {model.in_channels} but the VAE {data.vae} makes {channels}-channel latents"
        )


def check_class_weights(data: DataConfig, class_names: list[str]) -> None:
    """`data.class_weights` names classes of the model, each with a weight > 0."""
    for name, weight in data.class_weights.items():
        if name not in class_names:
            raise ConfigError(f"data.class_weights: {name!r} is not a class of the model ({', '.join(class_names)})")
        if not weight > 0:
            raise ConfigError(f"data.class_weights.{name} must be a number > 0, got {weight!r}")


def parse_config(document: dict[str, Any]) -> TrainConfig:
    """Validate a training config before anything is built; errors name the key."""
    if not isinstance(document, dict):
        raise ConfigError("a training config is a mapping with keys model, data, optim, loss, calibration")
    model_doc = document.get("model") or {}
    if not isinstance(model_doc, dict):
        raise ConfigError(f"model must be a mapping, got {model_doc!r}")
    model_doc = dict(model_doc)
    preset = model_doc.pop("preset", None)
    source = model_doc.pop("checkpoint", None)
    if source is not None:  # the architecture of an existing checkpoint (e.g. racedit import-dit's), trained as flow
        if preset is not None or model_doc:
            raise ConfigError(
                "model.checkpoint takes the whole architecture from the checkpoint: "
                f"drop the other model keys ({', '.join(['preset'] * bool(preset) + list(model_doc))})"
            )
        # trained as racedit's flow: its own objective and conventions (t = 1 noise, t * 1000 embedded)
        model_doc = {**checkpoint.read_config(source)["model"], "objective": "rectified_flow", "conventions": None}
    model = preset_config(preset, **model_doc) if preset else ModelConfig.from_dict(model_doc)
    config = parse_section(TrainConfig, {**{k: ({} if v is None else v) for k, v in document.items()}, "model": model})
    data = config.data
    if data.name == "imagefolder" and not data.root:
        raise ConfigError("data.root is required for data.name imagefolder")
    if data.vae is not None:
        check_latent_data(data, model)
    elif data.name == "imagefolder" and model.in_channels != 3:
        raise ConfigError(
            "training on an ImageFolder in pixel space needs model.in_channels 3 "
            "(or data.vae, a VAE folder, to train in its latent space)"
        )
    if model.class_names is not None:  # an ImageFolder's classes are known once it is read
        check_class_weights(data, model.class_names)
    optim = config.optim
    if optim.decay_steps > optim.steps:
        raise ConfigError(f"optim.decay_steps must be in 0..optim.steps ({optim.steps}), got {optim.decay_steps}")
    if optim.min_lr > optim.lr:
        raise ConfigError(f"optim.min_lr must be in 0..optim.lr ({optim.lr}), got {optim.min_lr}")
    check_restarts(optim)
    return config


def load_config(path: str) -> TrainConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    return parse_config(yaml.safe_load(p.read_text()))


# ------------------------------------------------------------- pipeline ----
@dataclass
class Stage:
    __pydantic_config__ = FORBID_UNKNOWN

    name: Str  # its output folder under the pipeline's
    config: Str  # a training config file, relative to the pipeline file


@dataclass
class Ship:
    """What `racedit pack` and `racedit calibrate --iterations 0` do to the last stage's checkpoint."""

    __pydantic_config__ = FORBID_UNKNOWN

    weights_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    budget_table: Bool = True  # the compute dial's table (model/training/calibrate.py)


@dataclass
class Pipeline:
    __pydantic_config__ = FORBID_UNKNOWN

    stages: list[Stage]
    ship: Optional[Ship] = None


def is_pipeline(path: str) -> bool:
    p = Path(path)
    return p.is_file() and isinstance(doc := yaml.safe_load(p.read_text()), dict) and "stages" in doc


def load_pipeline(path: str) -> tuple[Pipeline, list[TrainConfig]]:
    """A pipeline and every stage's training config, all checked before anything trains."""
    p = Path(path)
    pipeline = parse_section(Pipeline, yaml.safe_load(p.read_text()))
    if not pipeline.stages:
        raise ConfigError(f"{p}: stages is empty")
    names = [stage.name for stage in pipeline.stages]
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ConfigError(f"{p}: stage names must be distinct folder names, got {names}")
    configs = []
    for stage in pipeline.stages:
        try:
            configs.append(load_config(str(p.parent / stage.config)))
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name}: {exc}") from None
    return pipeline, configs

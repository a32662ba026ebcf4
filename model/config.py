"""Typed configuration of a Race-DiT network and its presets.

A config is plain data: it round-trips through JSON (checkpoints) and YAML
(training configs). `parse_section` types it with pydantic (unknown keys, missing
keys and wrong types are refused, naming the key) and `validate()` rejects
impossible shapes before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError

# Field types of every config dataclass: strict, so YAML's "32" or `true` is not taken for 32.
# A float field takes an integer (lr: 1 is 1.0); nothing else is converted.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Positive = Annotated[int, Field(strict=True, ge=1)]
Fraction = Annotated[float, Field(strict=True, ge=0, lt=1)]  # in [0, 1)
FORBID_UNKNOWN = ConfigDict(extra="forbid")

Routing = Literal["token_choice", "expert_choice", "expert_race", "threshold"]
Gating = Literal["identity", "sigmoid", "softmax"]
RouterKind = Literal["linear", "mlp"]
InferenceMode = Literal["threshold", "topk"]
ExpertKind = Literal["gelu", "swiglu"]
Objective = Literal["rectified_flow", "ddpm_eps"]
Prediction = Literal["velocity", "noise", "noise_learned_range"]
TimeConvention = Literal["noise_at_1", "noise_at_0", "timesteps"]
Family = Literal["racedit", "dit", "diffusers", "sit", "repa", "dit-moe"]
Spacing = Literal["leading", "trailing", "linspace"]
# Every sampler racedit has (model/samplers.py registers one class for each name).
SAMPLER_NAMES = ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "sde_euler")
SamplerName = Literal["euler", "heun", "ddim", "ddpm", "dpmpp_2m", "sde_euler"]
FLOW_SAMPLERS = SAMPLER_NAMES  # a velocity network on the linear path: every sampler's mathematics is defined
DISCRETE_SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")  # a network of integer timesteps: only the discrete chain's

SHAPES10_CLASSES = [
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
    "heart",
]


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


Section = TypeVar("Section")
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
    "list_type": "a list",
    "int_from_float": "an integer",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def parse_section(cls: type[Section], data: Any, prefix: str = "") -> Section:
    """`data` typed into the config dataclass `cls` by pydantic; the first problem becomes a
    ConfigError naming its key in the file's terms (`optim.restarts[0].lr must be a number, got 'x'`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [p for p in error["loc"] if not str(p).startswith("function-")]
        key = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)).lstrip(".")
        kind = error["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            allowed = _field_names(cls, loc[:-1])
            raise ConfigError(f"unknown key {key}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")) from None
        if kind in ("missing", "missing_argument"):
            raise ConfigError(f"{key} is missing") from None
        if kind == "literal_error":  # one of a fixed set of words: name them as a reader writes them
            expected = error["ctx"]["expected"].replace("'", "")
        elif kind in _BOUNDS:  # a Field bound: ">= 1"
            bound = next(iter(error["ctx"].values()))
            expected = f"{_BOUNDS[kind]} {bound:g}"
        else:
            expected = _EXPECTED.get(kind, error["msg"].lower())
        raise ConfigError(f"{key} must be {expected}, got {error['input']!r}") from None


def _field_names(cls: Any, path: list) -> list[str]:
    """Field names of the dataclass found at `path` below `cls` (through Optional and list)."""
    for step in path:
        if isinstance(step, int):
            continue
        if not dataclasses.is_dataclass(cls):
            return []
        cls = typing.get_type_hints(cls, include_extras=True).get(step)
        while typing.get_origin(cls) in (typing.Union, list, Annotated):
            cls = next((a for a in typing.get_args(cls) if a is not type(None)), None)
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


@dataclass
class MoEConfig:
    """Mixture-of-Experts layer that replaces each block's MLP.

    `spec` is "{k}in{E}": E experts, k activated per token on average.
    `hidden_split` (S) divides the dense MLP width among activated experts:
    each expert has width mlp_ratio * D / S, so S = k (the default) keeps the
    activated parameter count equal to the dense MLP.

    `routing` "threshold" is threshold routing given to a checkpoint trained with another
    routing (a token-choice DiT-MoE, `calibrate`'s routing choice): at inference a pair is
    selected iff its gate beats the layer's calibrated threshold (`inference: topk` gives the
    checkpoint's own top-k back); training it races and keeps the threshold as expert race does.

    DiT-MoE's pieces (feizc/DiT-MoE; `model/training/import_dit_moe.py`): `expert_kind`
    "swiglu" experts D -> (gate, up) -> silu(gate) * up -> D, `expert_bias` false, a
    `shared_expert` of its own width `shared_expert_hidden` (default: the experts' width) in
    the experts' kind, a `router_bias`-less linear router, softmax gating with token choice
    (the gate values weigh the experts as they are: not renormalised over the top k).
    """

    __pydantic_config__ = FORBID_UNKNOWN

    spec: Str = "2in8"
    hidden_split: Optional[Positive] = None
    routing: Routing = "expert_race"
    gating: Gating = "identity"
    router: RouterKind = "mlp"
    shared_expert: Bool = False
    threshold_momentum: Fraction = 0.99
    inference: InferenceMode = "threshold"
    expert_kind: ExpertKind = "gelu"
    expert_bias: Bool = True
    shared_expert_hidden: Optional[Positive] = None
    router_bias: Bool = True

    @property
    def num_experts(self) -> int:
        return _parse_spec(self.spec)[1]

    @property
    def k(self) -> int:
        return _parse_spec(self.spec)[0]

    @property
    def split(self) -> int:
        return self.hidden_split or self.k

    def validate(self) -> None:
        """What the field types cannot say: the spec's k and E."""
        k, e = _parse_spec(self.spec)
        if not 1 <= k <= e:
            raise ConfigError(f"moe.spec {self.spec!r}: need 1 <= k <= E")
        if self.shared_expert_hidden is not None and not self.shared_expert:
            raise ConfigError("moe.shared_expert_hidden is set but moe.shared_expert is false")


@dataclass
class NoiseSchedule:
    """The discrete DDPM noise schedule of a family whose network takes integer timesteps (DiT), and
    where a sampler's steps fall on it.

    `arithmetic` says whose reference the samplers follow to the bit: "dit" is facebookresearch/DiT's
    GaussianDiffusion (betas and their products in float64, rounded to fp32 where they meet the sample;
    every sampler on DiT's respaced chain, `space_timesteps`), "diffusers" is the folder's scheduler
    config as diffusers reads it back (fp32 products; `spacing` is the `timestep_spacing` that
    DDIMScheduler and DDPMScheduler read from it, `multistep_spacing` DPMSolverMultistepScheduler's).
    """

    __pydantic_config__ = FORBID_UNKNOWN

    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: Float = 1e-4
    beta_end: Float = 0.02
    num_train_timesteps: Positive = 1000
    arithmetic: Literal["dit", "diffusers"] = "dit"
    spacing: Spacing = "leading"
    multistep_spacing: Spacing = "linspace"
    steps_offset: Annotated[int, Field(strict=True, ge=0)] = 0
    clip_sample_range: Optional[Annotated[float, Field(strict=True, gt=0)]] = None  # ddim, ddpm: x0 clipped to +-r
    set_alpha_to_one: Bool = True  # ddim's last step ends at alpha_bar 1 (else at alpha_bar[0])


@dataclass
class Conventions:
    """How a published family's network is driven: what it predicts, how it reads time, how guidance
    applies, and the family's own defaults. A checkpoint without this section is racedit's own
    (`RACEDIT_CONVENTIONS`): velocity of rectified flow, t = 1 at noise, embedded as t * 1000.

    - `prediction`: "velocity" is dx/d(model time) on the linear path x = (1 - s) x0 + s eps (s = 1 at
      noise); "noise" is DDPM's eps; "noise_learned_range" is eps plus DiT's learned-range variance
      (the second half of the output, which the samplers then receive).
    - `time`: what the network is given: s itself ("noise_at_1": racedit, REPA), 1 - s ("noise_at_0":
      SiT), or the integer timestep of `schedule` ("timesteps": DiT), passed through exactly.
    - `time_scale`: the embedding's multiplier of that input (racedit 1000; the published families 1).
    - guidance acts on the first `guidance_channels` channels (None: all; DiT and SiT: 3), the rest of
      the output is the conditional row's, and only where `guidance_low <= s <= guidance_high` (REPA's
      interval: s <= 0.7); elsewhere the image runs its conditional row alone.
    """

    __pydantic_config__ = FORBID_UNKNOWN

    family: Family = "racedit"
    prediction: Prediction = "velocity"
    time: TimeConvention = "noise_at_1"
    time_scale: Annotated[float, Field(strict=True, gt=0)] = 1000.0
    schedule: Optional[NoiseSchedule] = None
    guidance_channels: Optional[Positive] = None
    guidance_low: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.0
    guidance_high: Annotated[float, Field(strict=True, ge=0, le=1)] = 1.0
    default_sampler: SamplerName = "euler"
    default_steps: Positive = 25
    default_cfg_scale: Annotated[float, Field(strict=True, ge=0)] = 4.0

    @property
    def discrete(self) -> bool:
        """The network takes the integer timesteps of a DDPM chain."""
        return self.time == "timesteps"

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers whose mathematics is defined for this family (the first is listed first)."""
        return DISCRETE_SAMPLERS if self.discrete else FLOW_SAMPLERS

    def guides_at(self, s: float) -> bool:
        """Whether guidance applies at s (1 noise, 0 data)."""
        return self.guidance_low <= s <= self.guidance_high

    def validate(self) -> None:
        """What the field types cannot say: the combinations that make sense."""
        if self.discrete != (self.prediction != "velocity"):
            raise ConfigError(
                f"model.conventions: prediction {self.prediction!r} with time {self.time!r}: a velocity network "
                "reads continuous time (noise_at_1, noise_at_0), a noise network a DDPM chain's timesteps"
            )
        if self.discrete != (self.schedule is not None):
            raise ConfigError("model.conventions.schedule is required with time 'timesteps', and only there")
        if self.default_sampler not in self.samplers:
            raise ConfigError(
                f"model.conventions.default_sampler {self.default_sampler!r} is not one of this family's "
                f"samplers ({', '.join(self.samplers)})"
            )
        if self.guidance_low > self.guidance_high:
            raise ConfigError("model.conventions: guidance_low is above guidance_high")


RACEDIT_CONVENTIONS = Conventions()  # what a checkpoint without a conventions section is


@dataclass
class ModelConfig:
    """Architecture of a (Race-)DiT. `moe=None` gives a dense DiT baseline."""

    __pydantic_config__ = FORBID_UNKNOWN

    image_size: Positive = 32
    in_channels: Positive = 3
    patch_size: Positive = 4
    hidden_size: Positive = 192
    depth: Positive = 6
    num_heads: Positive = 6
    mlp_ratio: Float = 4.0
    num_classes: Positive = 10
    class_dropout_prob: Fraction = 0.1
    moe: Optional[MoEConfig] = field(default_factory=MoEConfig)
    class_names: Optional[list[Str]] = None
    # What the network predicts: "rectified_flow" (velocity; racedit trains and samples it) or
    # "ddpm_eps" (DDPM noise, as DiT's published weights do; `racedit train --init` converts it).
    objective: Objective = "rectified_flow"
    # DiT compatibility (`racedit import-dit`): a second output half (DiT's learned variance, dropped
    # by forward), the timestep-frequency divisor half - shift (diffusers' DiT uses 1), the eps of
    # the LayerNorm before the MLP (diffusers' DiT uses 1e-5) and DiT's order of position axes.
    learn_sigma: Bool = False
    timestep_freq_shift: Int = 0
    mlp_norm_eps: Float = 1e-6
    position_order: Literal["row_col", "col_row"] = (
        "row_col"  # which axis the first half of the sin-cos positions encodes; DiT: "col_row"
    )
    # qk_norm: LayerNorm (affine, eps 1e-6) over the head dim of q and k before attention (DiT-MoE XL/G).
    qk_norm: Bool = False
    # A published family's conventions (`racedit import`); None: racedit's own (RACEDIT_CONVENTIONS).
    conventions: Optional[Conventions] = None

    @property
    def family(self) -> Conventions:
        """The conventions the samplers, guidance and the network's time embedding follow."""
        return self.conventions if self.conventions is not None else RACEDIT_CONVENTIONS

    @property
    def out_channels(self) -> int:
        """Channels of the final layer: twice the input's when it also predicts DiT's variance."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def num_moe_layers(self) -> int:
        """Every block's MLP is an MoE layer when the model has MoE (a dense DiT has none)."""
        return self.depth if self.moe is not None else 0

    def validate(self) -> None:
        """Every field's type and range (a config built in code has not been parsed), then what the
        types cannot say."""
        parse_section(ModelConfig, self.to_dict(), "model")
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size {self.image_size} is not divisible by model.patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}"
            )
        if self.hidden_size % 2:
            raise ConfigError("model.hidden_size must be even (2-D sin-cos position embedding)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"model.class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        if self.moe is not None:
            self.moe.validate()
        if self.conventions is not None:
            self.conventions.validate()
            want = "rectified_flow" if self.conventions.prediction == "velocity" else "ddpm_eps"
            if self.objective != want:
                raise ConfigError(
                    f"model.objective {self.objective!r} contradicts conventions.prediction "
                    f"{self.conventions.prediction!r} (objective {want!r})"
                )
            if self.conventions.prediction == "noise_learned_range" and not self.learn_sigma:
                raise ConfigError("model.conventions.prediction noise_learned_range needs learn_sigma (its variance)")
            channels = self.conventions.guidance_channels
            if channels is not None and channels > self.in_channels:
                raise ConfigError(f"model.conventions.guidance_channels {channels} > in_channels {self.in_channels}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        config = parse_section(cls, data, "model")
        config._check_shapes()
        return config


def _parse_spec(spec: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)in(\d+)", str(spec))
    if not match:
        raise ConfigError(f"moe.spec {spec!r} is not of the form '{{k}}in{{E}}', e.g. '2in8'")
    return int(match.group(1)), int(match.group(2))


# Presets. Paper sizes follow Race-DiT Table 4 on 256x256 ImageNet latents (32x32x4).
PRESETS: dict[str, dict[str, Any]] = {
    # Runs a forward in milliseconds on CPU: for tests.
    "tiny": dict(
        image_size=16,
        in_channels=3,
        patch_size=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        moe=dict(spec="2in4"),
        class_names=SHAPES10_CLASSES,
    ),
    # The bundled default model trained on shapes10 (docs/training.md).
    "shapes10": dict(
        image_size=32,
        in_channels=3,
        patch_size=4,
        hidden_size=192,
        depth=6,
        num_heads=6,
        num_classes=10,
        moe=dict(spec="2in8"),
        class_names=SHAPES10_CLASSES,
    ),
    "B/2": dict(
        image_size=32,
        in_channels=4,
        patch_size=2,
        hidden_size=768,
        depth=12,
        num_heads=12,
        num_classes=1000,
        moe=dict(spec="4in32"),
    ),
    "M/2": dict(
        image_size=32,
        in_channels=4,
        patch_size=2,
        hidden_size=960,
        depth=16,
        num_heads=16,
        num_classes=1000,
        moe=dict(spec="4in32"),
    ),
    "L/2": dict(
        image_size=32,
        in_channels=4,
        patch_size=2,
        hidden_size=1024,
        depth=24,
        num_heads=16,
        num_classes=1000,
        moe=dict(spec="4in32"),
    ),
    "XL/2": dict(
        image_size=32,
        in_channels=4,
        patch_size=2,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        num_classes=1000,
        moe=dict(spec="4in32"),
    ),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """Config of a named preset; `overrides` replace model fields, `moe` may be a dict, a spec string or None."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    data = {**PRESETS[name]}
    moe_override = overrides.pop("moe", "keep")
    if "class_names" not in overrides and overrides.get("num_classes", data["num_classes"]) != data["num_classes"]:
        data["class_names"] = None  # the preset's names belong to its own class count
    data.update(overrides)
    if moe_override is None:
        data["moe"] = None
    elif isinstance(moe_override, str) and moe_override != "keep":
        data["moe"] = {**data["moe"], "spec": moe_override}
    elif isinstance(moe_override, dict):
        data["moe"] = {**data["moe"], **moe_override}
    elif isinstance(moe_override, MoEConfig):
        data["moe"] = dataclasses.asdict(moe_override)
    return ModelConfig.from_dict(data)

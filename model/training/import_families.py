"""`racedit import`: a published DiT-family checkpoint becomes a racedit checkpoint that serves as it is.

SOURCE is a diffusers `DiTPipeline` folder (`model_index.json`, `transformer/`, `vae/`, `scheduler/`;
its VAE, its scheduler config and its class names come along), a `DiTTransformer2DModel` folder, or a
`.pt` / `.safetensors` state dict with facebookresearch/DiT's keys: DiT's own weights, SiT's (the
same keys) or REPA's (the same, plus `projectors.*`, which only its training uses). The network is
racedit's (model/dit.py), dense, with the weights mapped by `import_dit`; what makes it serve as its
authors sample it is the checkpoint's `conventions` (model/config.py): what the network predicts,
how it reads time, where guidance acts, the noise schedule and its step placement, and the family's
default sampler, steps and guidance scale:

- dit: noise plus DiT's learned-range variance; DiT's integer timesteps; guidance on the first 3
  channels; ddpm, 250 steps, cfg 4 (DiT's sample.py).
- diffusers: noise (the variance half only for ddpm); the scheduler's integer timesteps and spacing;
  guidance on every channel; the folder scheduler's sampler, 50 steps, cfg 4 (DiTPipeline's).
- sit: velocity with t = 0 at noise (the network gets 1 - s, unscaled); guidance on the first 3
  channels; sde_euler, 250 steps, cfg 4 (SiT's sample.py SDE).
- repa: velocity with t = 1 at noise (s, unscaled); guidance on every channel, only for s <= 0.7;
  sde_euler, 250 steps, cfg 1.8 (REPA's README).

The command's flags are `racedit.cli.options.ImportOptions`; `import_checkpoint(**options)` does the
work. Nothing here unpickles code: `.pt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from ..checkpoint import CheckpointError, save
from ..config import ConfigError, Conventions, MoEConfig, NoiseSchedule
from ..dit import RaceDiT
from .import_dit import dense_model, read_source, upcycle, upcycling_report
from .import_dit_moe import import_dit_moe, read_state_dict

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
FAMILIES = ("dit", "diffusers", "sit", "repa")


@dataclass
class Source:
    """What a SOURCE holds: the transformer's tensors under its own names, and what came with it."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]  # a diffusers transformer's config.json ({} for a state dict)
    kind: str  # "diffusers" (a folder's names) or "dit" (facebookresearch/DiT's names)
    scheduler: Optional[dict[str, Any]] = None  # a pipeline's scheduler_config.json
    vae: Optional[Path] = None  # a pipeline's vae/
    class_names: Optional[list[str]] = None  # a pipeline's id2label
    ignored: list[str] = field(default_factory=list)  # tensors not used at inference (REPA's projectors)


# ----------------------------------------------------------------- reading --
def read_family_source(path: Path) -> Source:
    """The transformer, and a pipeline's VAE, scheduler and class names, of a SOURCE."""
    if path.is_dir():
        index = path / "model_index.json"
        if index.is_file():
            document = json.loads(index.read_text())
            if document.get("_class_name") != "DiTPipeline":
                raise CheckpointError(f"{index}: a {document.get('_class_name')}, not a DiTPipeline")
            state, config, kind = read_source(path / "transformer")
            scheduler_file = path / "scheduler" / "scheduler_config.json"
            scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
            labels = document.get("id2label")  # ImageNet's "tench, Tinca tinca": the first name of each
            names = [str(labels[str(i)]).split(",")[0].strip() for i in range(len(labels))] if labels else None
            vae = path / "vae" if (path / "vae" / "config.json").is_file() else None
            return Source(state, config, kind, scheduler, vae, names)
        if (path / "config.json").is_file():
            state, config, kind = read_source(path)
            return Source(state, config, kind)
        raise CheckpointError(
            f"{path}: an unknown layout: tried a diffusers DiTPipeline (no model_index.json) and a "
            "DiTTransformer2DModel folder (no config.json)"
        )
    if path.is_file():
        if path.suffix not in STATE_SUFFIXES:
            raise CheckpointError(f"{path}: expected a folder or a state dict ({', '.join(STATE_SUFFIXES)})")
        return Source(read_state_dict(path), {}, "dit")
    raise CheckpointError(f"{path}: no such file or folder")


DIT_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.adaLN_modulation.1.weight",
    "final_layer.linear.weight",
)
DIT_PREFIXES = ("x_embedder.", "pos_embed", "t_embedder.", "y_embedder.", "blocks.", "final_layer.")


def resolve_family(source: Source, requested: str, path: Path) -> str:
    """The family of a SOURCE: a diffusers folder's is diffusers; a state dict must have DiT's keys (DiT, SiT
    and REPA share them; REPA's projectors decide auto). Else an error naming what was tried and what did
    not fit."""
    if source.kind == "diffusers":
        if requested not in ("auto", "diffusers"):
            raise CheckpointError(f"{path}: a diffusers folder is the diffusers family, not {requested}")
        return "diffusers"
    state = source.state
    missing = [k for k in DIT_KEYS if k not in state]
    projectors = sorted(k for k in state if k.startswith("projectors."))
    unexpected = sorted(k for k in state if not k.startswith(DIT_PREFIXES) and not k.startswith("projectors."))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: an unknown layout: tried dit, sit and repa (facebookresearch/DiT's keys) -- "
            + "; ".join(
                part
                for part in (
                    f"missing {missing[:6]}" if missing else "",
                    f"not fitting {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "",
                )
                if part
            )
            + "; and diffusers (a folder with config.json, not a state dict)"
        )
    if requested == "diffusers":
        raise CheckpointError(f"{path}: a state dict with DiT's keys is dit, sit or repa, not diffusers")
    source.ignored = projectors
    if requested != "auto":
        return requested
    return "repa" if projectors else "dit"


# -------------------------------------------------------------- conventions --
DEFAULT_DIFFUSERS_SCHEDULER = {  # a bare transformer folder: a DDIMScheduler over DiT's chain, no clipping
    "_class_name": "DDIMScheduler",
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "clip_sample": False,
}
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m"}
# What racedit's dpmpp_2m is: DPMSolverMultistepScheduler with these settings (its defaults).
DPM_DEFAULTS = {
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "use_dynamic_shifting": False,
}


def diffusers_schedule(config: dict[str, Any], where: str) -> tuple[NoiseSchedule, str]:
    """A scheduler config read as diffusers reads it back into DDIMScheduler, DDPMScheduler and
    DPMSolverMultistepScheduler (`from_config`: a key the config lacks takes that class's default), and
    the sampler of the config's own class. What racedit's samplers do not compute is refused by name."""
    refused = {
        "prediction_type": ("epsilon", config.get("prediction_type", "epsilon")),
        "thresholding": (False, bool(config.get("thresholding", False))),
        "trained_betas": (None, config.get("trained_betas")),
        "rescale_betas_zero_snr": (False, bool(config.get("rescale_betas_zero_snr", False))),
    }
    if config.get("_class_name") == "DPMSolverMultistepScheduler":
        refused.update({k: (v, config.get(k, v)) for k, v in DPM_DEFAULTS.items()})
        lam = config.get("lambda_min_clipped", float("-inf"))
        refused["lambda_min_clipped"] = (float("-inf"), float(lam) if lam is not None else float("-inf"))
    bad = [f"{k} {got!r} (racedit computes {want!r})" for k, (want, got) in refused.items() if got != want]
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        bad.append(f"beta_schedule {beta_schedule!r}")
    if bad:
        raise CheckpointError(f"{where}: a scheduler racedit does not reproduce: {'; '.join(bad)}")
    spacing = config.get("timestep_spacing")
    clip = config.get("clip_sample", True)  # DDIMScheduler's and DDPMScheduler's default
    try:
        schedule = NoiseSchedule(
            beta_schedule=beta_schedule,
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            arithmetic="diffusers",
            spacing=spacing or "leading",  # DDIM's and DDPM's default
            multistep_spacing=spacing or "linspace",  # DPMSolverMultistep's default
            steps_offset=int(config.get("steps_offset", 0)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)) if clip else None,
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return schedule, SCHEDULER_SAMPLERS.get(config.get("_class_name"), "ddim")


def conventions_for(family: str, source: Source, learn_sigma: bool, in_channels: int) -> Conventions:
    """A family's conventions (the table at the top)."""
    three = min(3, in_channels)
    noise = "noise_learned_range" if learn_sigma else "noise"
    if family == "dit":
        schedule = NoiseSchedule(arithmetic="dit")  # linear betas 1e-4..0.02 over 1000, DiT's respacing
        return Conventions(
            family="dit",
            prediction=noise,
            time="timesteps",
            time_scale=1.0,
            schedule=schedule,
            guidance_channels=three,
            default_sampler="ddpm",
            default_steps=250,
            default_cfg_scale=4.0,
        )
    if family == "diffusers":
        schedule, sampler = diffusers_schedule(source.scheduler or DEFAULT_DIFFUSERS_SCHEDULER, "scheduler")
        return Conventions(
            family="diffusers",
            prediction=noise,
            time="timesteps",
            time_scale=1.0,
            schedule=schedule,
            default_sampler=sampler,
            default_steps=50,  # DiTPipeline's num_inference_steps
            default_cfg_scale=4.0,
        )
    if family == "sit":
        return Conventions(
            family="sit",
            prediction="velocity",
            time="noise_at_0",
            time_scale=1.0,
            guidance_channels=three,
            default_sampler="sde_euler",
            default_steps=250,
            default_cfg_scale=4.0,
        )
    return Conventions(  # repa
        family="repa",
        prediction="velocity",
        time="noise_at_1",
        time_scale=1.0,
        guidance_high=0.7,
        default_sampler="sde_euler",
        default_steps=250,
        default_cfg_scale=1.8,
    )


# ------------------------------------------------------------------ import --
def import_family(source: Path, family: str = "auto", num_heads: Optional[int] = None) -> tuple[RaceDiT, Source, str]:
    """The dense racedit network of a SOURCE with its family's conventions, what the source held, and the family."""
    held = read_family_source(Path(source))
    name = resolve_family(held, family, Path(source))
    state = {k: v for k, v in held.state.items() if k not in held.ignored}
    probe = dense_model(state, held.config, held.kind, num_heads, source)  # the shapes: learn_sigma, channels
    cfg = probe.config
    conventions = conventions_for(name, held, cfg.learn_sigma, cfg.in_channels)
    overrides: dict[str, Any] = {
        "conventions": conventions.__dict__ | {"schedule": conventions.schedule and conventions.schedule.__dict__},
        "objective": "rectified_flow" if conventions.prediction == "velocity" else "ddpm_eps",
    }
    if held.class_names is not None and len(held.class_names) == cfg.num_classes:
        overrides["class_names"] = held.class_names
    try:
        model = dense_model(state, held.config, held.kind, num_heads, source, **overrides)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    return model, held, name


def import_checkpoint(
    source: Path,
    out: Path,
    family: str = "auto",
    vae: Optional[Path] = None,
    num_heads: Optional[int] = None,
    moe: Optional[str] = None,
    hidden_split: int = 1,
    gating: str = "identity",
) -> tuple[Path, dict[str, Any]]:
    """`racedit import` (its flags: `racedit.cli.options.ImportOptions`): write the checkpoint; returns its
    folder and a record of what was imported (its metadata, as written into the checkpoint) and of how it
    serves (`serving`: samplers and defaults). DiT-MoE files (their keys, or `family="dit-moe"`) are mapped
    by `import_dit_moe`."""
    options = SimpleNamespace(
        source=Path(source),
        out=Path(out),
        family=family,
        vae=vae,
        num_heads=num_heads,
        moe=moe,
        hidden_split=hidden_split,
        gating=gating,
    )
    if family == "dit-moe" or (family == "auto" and is_dit_moe(Path(source))):
        return _save_imported(
            import_dit_moe(Path(source), num_heads), SimpleNamespace(vae=None, ignored=[]), "dit-moe", options
        )
    dense, held, family = import_family(options.source, options.family, options.num_heads)
    return _save_imported(dense, held, family, options)


def is_dit_moe(source: Path) -> bool:
    """A state-dict file with DiT-MoE's gates (`blocks.N.moe.gate.weight`)."""
    if source.is_dir() or source.suffix not in (".pt", ".pth", ".safetensors", ".bin"):
        return False
    return any(re.fullmatch(r"(?:.*\.)?blocks\.\d+\.moe\.gate\.weight", k) for k in read_state_dict(source))


def _save_imported(dense: RaceDiT, held: Any, family: str, options: SimpleNamespace) -> tuple[Path, dict[str, Any]]:
    model = dense
    record: dict[str, Any] = {
        **dense.metadata,
        "imported_from": str(options.source),
        "family": family,
        "objective": dense.config.objective,
    }
    if held.ignored:
        record["ignored_tensors"] = f"{len(held.ignored)} ({held.ignored[0].split('.')[0]}.*: training only)"
    if options.moe:
        moe = MoEConfig(spec=options.moe, hidden_split=options.hidden_split, gating=options.gating)
        moe.validate()
        model = upcycle(dense, moe)
        record["upcycling"] = upcycling_report(dense, model)
    vae = options.vae or held.vae
    path = save(model, options.out, metadata=record, autoencoder=vae)
    conventions = model.config.family
    record["serving"] = {
        "samplers": list(conventions.samplers),
        "default_sampler": conventions.default_sampler,
        "default_steps": conventions.default_steps,
        "default_cfg_scale": conventions.default_cfg_scale,
        "autoencoder": str(vae) if vae else None,
    }
    return path, record

"""Checkpoints: a folder with `model.safetensors` (weights and thresholds) and `config.json`.

Never pickle: a pickled file is refused with the command that converts it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .autoencoder import Autoencoder, AutoencoderError, copy_autoencoder
from .config import ConfigError, ModelConfig
from .dit import RaceDiT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "racedit-checkpoint"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

CONVERT_HINT = (
    "racedit reads only safetensors + JSON checkpoints. Convert a trusted pickle with:\n"
    '  python -c "import torch; from racedit.model import build, save; '
    "m = build('<preset>'); m.load_state_dict(torch.load('<file>', weights_only=True)); save(m, '<out dir>')\""
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, pickled or does not match its config."""


def save(
    model: RaceDiT,
    path: Union[str, os.PathLike],
    metadata: Optional[dict[str, Any]] = None,
    weights_dtype: Optional[torch.dtype] = None,
    autoencoder: Union[None, str, os.PathLike, torch.nn.Module, Autoencoder] = None,
) -> Path:
    """Write `path/model.safetensors` and `path/config.json`; returns the folder.

    `weights_dtype` (e.g. torch.float16) stores floating-point parameters in that
    type to halve the file; buffers such as the learned thresholds stay exact, and
    `load` upcasts to the model's float32.
    `autoencoder` makes a latent checkpoint: a diffusers AutoencoderKL, its save_pretrained folder,
    or a loaded checkpoint's `model.autoencoder`; it is copied to `path/vae` and named in config.json.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    vae = None
    if isinstance(autoencoder, Autoencoder):
        vae = copy_autoencoder(autoencoder.path, folder, autoencoder.scaling_factor, autoencoder.shift_factor)
    elif autoencoder is not None:
        vae = copy_autoencoder(autoencoder, folder)
    parameters = {name for name, _ in model.named_parameters()}
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if weights_dtype is not None and k in parameters and v.is_floating_point():
            v = v.to(weights_dtype)
        state[k] = v
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "class_names": model.config.class_names,
        "thresholds": [float(layer.threshold) for layer in model.moe_layers],
        "weights_dtype": str(weights_dtype or torch.float32).removeprefix("torch."),
        "metadata": metadata or {},
    }
    if vae is not None:
        document["autoencoder"] = vae.record(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return folder


def read_config(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint folder, with clear errors."""
    folder = _checkpoint_folder(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint folder holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT or "model" not in document:
        raise CheckpointError(f"{config_path}: not a racedit checkpoint config (no 'format': '{FORMAT}')")
    return document


def load(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> RaceDiT:
    """Rebuild the model of a checkpoint folder exactly, in eval mode."""
    folder = _checkpoint_folder(path)
    document = read_config(folder)
    try:
        config = ModelConfig.from_dict(document["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid model config: {exc}") from exc
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    _refuse_pickle(weights_path)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable or truncated safetensors file ({exc})") from exc
    with torch.device("meta"):  # shapes only: the file holds every weight (random init of XL/2 alone takes seconds)
        model = RaceDiT(config)
    _check_state(model, state, weights_path)
    # Parameters in fp32 as a built model has them, whatever dtype the file stores (weights_dtype).
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True
    )
    model.compute_buffers()  # the non-persistent buffers, computed from the config
    model.metadata = document.get("metadata", {})
    model.autoencoder = read_autoencoder(folder)
    return model.to(device).eval()


def read_autoencoder(path: Union[str, os.PathLike]) -> Optional[Autoencoder]:
    """The VAE a latent checkpoint names (checked to be there), or None for a pixel-space one."""
    folder = _checkpoint_folder(path)
    document = read_config(folder)
    if "autoencoder" not in document:
        return None
    try:
        autoencoder = Autoencoder.from_record(document["autoencoder"], folder)
        autoencoder.check()
    except AutoencoderError as exc:
        raise CheckpointError(f"{folder}: a latent checkpoint whose VAE cannot be used: {exc}") from exc
    return autoencoder


def _checkpoint_folder(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    if p.is_file():
        _refuse_pickle(p)
        if p.name in (WEIGHTS_FILE, CONFIG_FILE):
            return p.parent
        raise CheckpointError(f"{p}: a checkpoint is a folder holding {WEIGHTS_FILE} and {CONFIG_FILE}")
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles and not (p / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{p / pickles[0]}: pickle checkpoints are refused.\n{CONVERT_HINT}")
    return p


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(4)
    is_pickle = head[:1] == b"\x80" or path.suffix in PICKLE_SUFFIXES or zipfile.is_zipfile(path)
    if is_pickle:
        raise CheckpointError(f"{path}: pickle checkpoints are refused.\n{CONVERT_HINT}")


def _check_state(model: RaceDiT, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("shape mismatches " + "; ".join(wrong[:5]))
    if problems:
        raise CheckpointError(f"{weights_path}: does not match {CONFIG_FILE}: " + "; ".join(problems))

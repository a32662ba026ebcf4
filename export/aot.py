"""torch.export + AOTInductor package (.pt2) of the served denoiser forward.

The sparse dispatch's group sizes are data-dependent (unbacked) sizes in the
exported graph, so the compiled artifact computes only the selected pairs too.
Load it back with the public API: `torch._inductor.aoti_load_package(path)`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Union

import torch

from racedit.model.dit import RaceDiT

from .onnx_export import DTYPES, ExportError, ServedDenoiser, example_inputs, prepare_output


def export_program(model: RaceDiT, dtype: str = "float32", device: str = "cpu") -> torch.export.ExportedProgram:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    served = ServedDenoiser(model.to(device=device).set_precision(DTYPES[dtype]))
    inputs = tuple(i.to(device) for i in example_inputs(model, dtype=DTYPES[dtype]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(
        served, inputs, dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}}, strict=False
    )


def export_aot(model: RaceDiT, path: Union[str, os.PathLike], dtype: str = "float32", device: str = "cpu") -> Path:
    """Compile an AOTInductor package for `device` (cpu or cuda), with `<path>.json` saying what it holds."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device cuda requested but no CUDA device is available")
    path = prepare_output(path)
    program = export_program(model, dtype, device)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pickling of the program's tree specs trips torch's own deprecation: nothing to change here.
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    path.with_name(path.name + ".json").write_text(json.dumps(contents(model, dtype, device), indent=2) + "\n")
    return path


def contents(model: RaceDiT, dtype: str, device: str) -> dict:
    """What the package holds: one denoiser forward; the sampler, guidance and (latent models) the VAE
    decoder stay outside it."""
    cfg = model.config
    shape = [cfg.in_channels, cfg.image_size, cfg.image_size]
    autoencoder = getattr(model, "autoencoder", None)
    return {
        "holds": "one denoiser forward (threshold routing, sparse dispatch): x, t, y -> v, experts_per_token, "
        "expert_load; no sampler, no guidance, no VAE",
        "inputs": {"x": ["B", *shape], "t": ["B"], "y": ["B"]},
        "outputs": {
            "v": ["B", *shape],
            "experts_per_token": [len(model.moe_layers), "B", cfg.num_tokens],
            "expert_load": [len(model.moe_layers), "B", cfg.moe.num_experts if cfg.moe else 0],
        },
        "objective": cfg.objective,
        "dtype": dtype,
        "device": device,
        "thresholds": [float(layer.threshold) for layer in model.moe_layers],
        "space": "latent" if autoencoder is not None else "pixel",
        "decode": (
            f"v integrates to latents; decode them with the checkpoint's VAE folder (diffusers AutoencoderKL): "
            f"images = vae.decode(latents / {autoencoder.scaling_factor}"
            + (f" + {autoencoder.shift_factor}" if autoencoder.shift_factor is not None else "")
            + ").sample"
            if autoencoder is not None
            else "samples are images in [-1, 1]"
        ),
        "load": "torch._inductor.aoti_load_package(path)",
    }


def load_aot(path: Union[str, os.PathLike]):
    """The compiled forward: call it as `v, experts_per_token, expert_load = fn(x, t, y)`."""
    return torch._inductor.aoti_load_package(str(path))

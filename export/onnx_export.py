"""ONNX export of one denoiser forward, with true sparse dispatch.

Graph: x float [B, C, H, W], t float [B], y int64 [B] ->
       v [B, C, H, W], experts_per_token int32 [n_moe_layers, B, L], expert_load int32 [n_moe_layers, B, E].
Routing is the served one (threshold: batch-independent). Only selected
(token, expert) pairs are computed: per expert, NonZero picks its tokens,
Gather/Gemm run on that data-dependent group, ScatterElements adds back. The
per-layer-regularisation target head is unused at inference and is dropped.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import torch
from torch import nn

from racedit.model.dit import RaceDiT
from racedit.model.exact import EXPORT

MIN_OPSET, MAX_OPSET = 16, 20  # 16: ScatterElements with reduction; 20: newest the exporter writes
INPUT_NAMES = ["x", "t", "y"]
OUTPUT_NAMES = ["v", "experts_per_token", "expert_load"]
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ExportError(ValueError):
    """An export cannot be made as asked (bad option, unwritable folder, unsupported model)."""


class ServedDenoiser(nn.Module):
    """The forward that serving runs: velocity plus routing counts, in eval mode.

    `batch_first` puts the batch first in the routing outputs ([B, n_layers, ...]),
    which Triton's dynamic batcher needs.
    """

    def __init__(self, model: RaceDiT, batch_first: bool = False):
        super().__init__()
        # Traced graphs stay shape-generic: no row padding, and the per-expert NonZero loop
        # (data-dependent group sizes, no host sync) instead of the grouped GEMM.
        self.model, self.batch_first = model.eval().with_execution(EXPORT), batch_first

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        out = self.model(x, t, y, return_stats=True)
        v, stats = out.prediction.to(x.dtype), out.stats
        if self.batch_first:
            return v, stats.experts_per_token.transpose(0, 1), stats.expert_load.transpose(0, 1)
        return v, stats.experts_per_token, stats.expert_load


def example_inputs(model: RaceDiT, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return x, t, y


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
            f"(sparse dispatch scatter-adds with ScatterElements reduction, opset >= 16)"
        )


def prepare_output(path: Union[str, os.PathLike]) -> Path:
    """Create the parent folder and prove it is writable, with a clear error if not."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / ".racedit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    return path


def export_onnx(
    model: RaceDiT, path: Union[str, os.PathLike], opset: int = 17, dtype: str = "float32", batch_first: bool = False
) -> Path:
    """Write the ONNX file and validate it with onnx.checker (full check)."""
    import onnx

    check_opset(opset)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = prepare_output(path)
    served = ServedDenoiser(model.set_precision(DTYPES[dtype]), batch_first)
    stats_axis = 0 if batch_first else 1
    batch_axes = {
        "x": {0: "batch"},
        "t": {0: "batch"},
        "y": {0: "batch"},
        "v": {0: "batch"},
        "experts_per_token": {stats_axis: "batch"},
        "expert_load": {stats_axis: "batch"},
    }
    with torch.no_grad(), warnings.catch_warnings():
        # Two warnings the tracer prints that do not hold here (tests/export/test_export.py checks batches 1, 5
        # and 16 against eager): each expert's scatter-add index is unique (moe.loop_dispatch), and the
        # row-tile padding it sees as a constant is none, as exports run without row tiles.
        warnings.filterwarnings("ignore", "Warning: ONNX export does not support duplicated values in 'index'")
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        torch.onnx.export(
            served,
            example_inputs(model, dtype=DTYPES[dtype]),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=batch_axes,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


class ServedDecoder(nn.Module):
    """A latent checkpoint's VAE decoder as serving runs it: the model's latents (its scaling and
    shift undone) -> images in [-1, 1], fp32."""

    def __init__(self, vae: nn.Module, autoencoder):
        super().__init__()
        self.vae, self.autoencoder = vae.eval(), autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.autoencoder.to_vae_input(latents)).sample.clamp(-1, 1)


def export_vae_decoder(
    autoencoder, latent_shape: tuple[int, int, int], path: Union[str, os.PathLike], opset: int = 17
) -> Path:
    """Write the VAE decoder of a latent checkpoint (`model.autoencoder`) as ONNX: `latents` [B, C, h, w]
    -> `images` [B, 3, H, W] in [-1, 1], dynamic batch; validated with onnx.checker."""
    import onnx

    check_opset(opset)
    path = prepare_output(path)
    served = ServedDecoder(autoencoder.load("cpu"), autoencoder)
    example = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.onnx.export(
            served,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["latents"],
            output_names=["images"],
            dynamic_axes={"latents": {0: "batch"}, "images": {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path

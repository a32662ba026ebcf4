"""A Triton Inference Server model repository for a racedit checkpoint.

    <out>/racedit_denoiser/config.pbtxt   ONNX denoiser, onnxruntime backend, dynamic batching
    <out>/racedit_denoiser/1/model.onnx
    <out>/racedit/config.pbtxt            Python backend: guided sampling loop over BLS
    <out>/racedit/1/model.py              (export/triton_model.py)
    <out>/racedit/1/config.json           the checkpoint's config (classes, thresholds)
    <out>/racedit_vae_decoder/...         latent checkpoints: the VAE decoder (ONNX), which the
                                          sampling model calls, so Triton answers pictures

The `racedit` model's inputs and outputs match the service's KServe v2 routes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from racedit.model.dit import RaceDiT

from .onnx_export import export_onnx, export_vae_decoder

DENOISER = "racedit_denoiser"
PIPELINE = "racedit"
DECODER = "racedit_vae_decoder"


INSTANCE_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}


def denoiser_config(model: RaceDiT, device: str = "cuda", max_batch_size: int = 256, instances: int = 1) -> str:
    """The denoiser's config.pbtxt. One instance kind (from `device`), so Triton's batcher never
    sends a step of a GPU deployment to a CPU instance, and a CPU-only Triton loads it."""
    cfg = model.config
    layers = len(model.moe_layers)
    experts = cfg.moe.num_experts if cfg.moe else 0
    return f"""name: "{DENOISER}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "x" data_type: TYPE_FP32 dims: [ {cfg.in_channels}, {cfg.image_size}, {cfg.image_size} ] }},
  {{ name: "t" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "y" data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
output [
  {{ name: "v" data_type: TYPE_FP32 dims: [ {cfg.in_channels}, {cfg.image_size}, {cfg.image_size} ] }},
  {{ name: "experts_per_token" data_type: TYPE_INT32 dims: [ {layers}, {cfg.num_tokens} ] }},
  {{ name: "expert_load" data_type: TYPE_INT32 dims: [ {layers}, {experts} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{ count: {instances} kind: {INSTANCE_KINDS[device]} }}
]
"""


def decoder_config(
    latent_shape: tuple[int, int, int], image_size: int, device: str = "cuda", max_batch_size: int = 64
) -> str:
    c, h, w = latent_shape
    return f"""name: "{DECODER}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "latents" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }}
]
output [
  {{ name: "images" data_type: TYPE_FP32 dims: [ 3, {image_size}, {image_size} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{ count: 1 kind: {INSTANCE_KINDS[device]} }}
]
"""


def pipeline_config(model: RaceDiT, instances: int = 4, image_size: Optional[int] = None, decoder: bool = False) -> str:
    size = image_size or model.config.image_size
    decoder_parameter = (
        f"""
parameters {{
  key: "decoder"
  value: {{ string_value: "{DECODER}" }}
}}"""
        if decoder
        else ""
    )
    return f"""name: "{PIPELINE}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "class_label" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "cfg_scale" data_type: TYPE_FP32 dims: [ -1 ] optional: true }},
  {{ name: "num_steps" data_type: TYPE_INT32 dims: [ -1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ -1 ] optional: true }}
]
output [
  {{ name: "image" data_type: TYPE_UINT8 dims: [ -1, {size}, {size}, 3 ] }},
  {{ name: "mean_experts_per_token" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ -1 ] }}
]
instance_group [
  {{ count: {instances} kind: KIND_CPU }}
]
parameters {{
  key: "denoiser"
  value: {{ string_value: "{DENOISER}" }}
}}{decoder_parameter}
"""


def model_config_schema():
    """Triton's ModelConfig protobuf class, from the module that ships inside tritonclient."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("racedit_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


def parse_config(text: str):
    """Parse config.pbtxt text against Triton's schema; raises on unknown fields or bad values."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_schema()())


def build_triton_repo(
    model: RaceDiT,
    checkpoint: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    opset: int = 17,
    device: str = "cuda",
) -> Path:
    """Write the repository; `device` (cpu | cuda) is the denoiser's instance kind."""
    if device not in INSTANCE_KINDS:
        raise ValueError(f"device must be one of {', '.join(INSTANCE_KINDS)}, got {device!r}")
    out = Path(out)
    export_onnx(model, out / DENOISER / "1" / "model.onnx", opset=opset, batch_first=True)
    (out / DENOISER / "config.pbtxt").write_text(denoiser_config(model, device))
    version = out / PIPELINE / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
    shutil.copyfile(Path(checkpoint) / "config.json", version / "config.json")
    names = [DENOISER, PIPELINE]
    autoencoder = getattr(model, "autoencoder", None)
    image_size = None
    if autoencoder is not None:  # a latent checkpoint: Triton decodes too
        cfg = model.config
        latent_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        image_size = autoencoder.image_size(cfg.image_size)
        export_vae_decoder(autoencoder, latent_shape, out / DECODER / "1" / "model.onnx", opset=opset)
        (out / DECODER / "config.pbtxt").write_text(decoder_config(latent_shape, image_size, device))
        names.append(DECODER)
    (out / PIPELINE / "config.pbtxt").write_text(
        pipeline_config(model, image_size=image_size, decoder=autoencoder is not None)
    )
    for name in names:
        parse_config((out / name / "config.pbtxt").read_text())
    return out

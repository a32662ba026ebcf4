"""Triton Python-backend model `racedit`: the guided sampling loop, calling `racedit_denoiser` through BLS.

Copied into `<repo>/racedit/1/model.py` by `racedit export triton`. It runs
`racedit.model.generate` (the library's sampler, whose step functions the
serving engine also uses) with a denoiser that forwards each step to the ONNX
model over BLS, so Triton's dynamic batcher can merge steps of many requests.
Needs `racedit` installed in the Python backend's environment (see README).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np

try:  # inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported for tests or docs outside Triton
    pb_utils = None

import torch

from racedit.export.external import ExternalDenoiser
from racedit.model import generate
from racedit.model.sampling import to_uint8


class BLSDenoiser(ExternalDenoiser):
    """One batched forward of `racedit_denoiser` per call (outputs are batch-first there)."""

    def __init__(self, model_name: str, config, thresholds):
        super().__init__(config, thresholds)
        self.model_name = model_name

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray):
        request = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=["v", "experts_per_token", "expert_load"],
            inputs=[
                pb_utils.Tensor("x", x),
                pb_utils.Tensor("t", t.reshape(-1, 1)),
                pb_utils.Tensor("y", y.reshape(-1, 1)),
            ],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        out = {
            name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
            for name in ("v", "experts_per_token", "expert_load")
        }
        # batch-first [B, n_layers, ...] -> [n_layers, B, ...] as the samplers expect
        return out["v"], out["experts_per_token"].transpose(1, 0, 2), out["expert_load"].transpose(1, 0, 2)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        parameters = model_config.get("parameters", {})
        denoiser = parameters.get("denoiser", {}).get("string_value", "racedit_denoiser")
        checkpoint_config = Path(args["model_repository"]) / args["model_version"] / "config.json"
        config, thresholds = ExternalDenoiser.config_of(checkpoint_config)
        self.denoiser = BLSDenoiser(denoiser, config, thresholds)
        self.num_classes = config.num_classes
        # a latent checkpoint's repository has a VAE decoder model: samples are latents until it runs
        self.decoder = parameters.get("decoder", {}).get("string_value") or None
        image_dims = (
            next(o["dims"] for o in model_config.get("output", []) if o["name"] == "image")
            if model_config.get("output")
            else [-1, config.image_size, config.image_size, 3]
        )
        self.image_size = int(image_dims[-2])

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [N, C, h, w] -> images [N, 3, H, W] in [-1, 1], by the decoder model over BLS."""
        request = pb_utils.InferenceRequest(
            model_name=self.decoder,
            requested_output_names=["images"],
            inputs=[pb_utils.Tensor("latents", latents.astype(np.float32))],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return pb_utils.get_output_tensor_by_name(response, "images").as_numpy()

    def _input(self, request, name: str, default, n: int, dtype) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return np.full(n, default, dtype=dtype)
        values = tensor.as_numpy().reshape(-1).astype(dtype)
        if values.shape[0] != n:
            raise ValueError(f"input {name} has {values.shape[0]} entries, class_label has {n}")
        return values

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                labels = (
                    pb_utils.get_input_tensor_by_name(request, "class_label").as_numpy().reshape(-1).astype(np.int64)
                )
                n = labels.shape[0]
                if ((labels < 0) | (labels >= self.num_classes)).any():
                    raise ValueError(f"class_label must be in 0..{self.num_classes - 1}")
                scales = self._input(request, "cfg_scale", 4.0, n, np.float32)
                steps = self._input(request, "num_steps", 25, n, np.int32)
                # As the HTTP routes: a seed left out is drawn at random, and every seed is echoed.
                seeds = self._input(request, "seed", -1, n, np.int64)
                drawn = seeds < 0
                seeds[drawn] = [secrets.randbelow(2**31) for _ in range(int(drawn.sum()))]
                if (steps < 1).any():
                    raise ValueError("num_steps must be >= 1")
                images = np.zeros((n, self.image_size, self.image_size, 3), np.uint8)
                experts = np.zeros(n, np.float32)
                for count in np.unique(steps):  # one sampling loop per distinct step count
                    rows = np.nonzero(steps == count)[0]
                    out, usage = generate(
                        self.denoiser,
                        labels=labels[rows].tolist(),
                        cfg_scale=scales[rows].tolist(),
                        num_steps=int(count),
                        seeds=seeds[rows].tolist(),
                        as_float=True,
                    )
                    pictures = self._decode(out.numpy()) if self.decoder else out.numpy()
                    images[rows] = to_uint8(torch.from_numpy(pictures)).permute(0, 2, 3, 1).numpy()
                    experts[rows] = [u.mean_experts_per_token for u in usage]
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("image", images),
                            pb_utils.Tensor("mean_experts_per_token", experts),
                            pb_utils.Tensor("seed", seeds),
                        ]
                    )
                )
            except Exception as exc:  # answer every request, never drop it
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

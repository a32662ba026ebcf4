"""KServe v2 / Open Inference Protocol routes, so the stock `tritonclient.http` works unchanged.

Inputs: class_label INT64 [N], cfg_scale FP32 [N], num_steps INT32 [N], seed INT64 [N], expert_budget FP32 [N]
(all but class_label optional; a seed left out is drawn at random). Outputs: image
UINT8 [N, H, W, 3], mean_experts_per_token FP32 [N] and seed INT64 [N] (the seeds used). Tensors travel as JSON lists or through
Triton's binary tensor extension (`Inference-Header-Content-Length`).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Optional

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from pydantic import ValidationError
from racedit_client.models import GenerateRequest

from .calls import engine_error, run_on_engine
from .engine import Engine, EngineError
from .settings import ServeSettings
from .validation import build_request, describe

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INPUTS = [("class_label", "INT64"), ("cfg_scale", "FP32"), ("num_steps", "INT32"), ("seed", "INT64"),
          ("expert_budget", "FP32")]
HEADER = "inference-header-content-length"


class InferError(ValueError):
    """A malformed v2 request: answered 400 with {"error": ...} as KServe clients expect."""


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def parse_infer(body: bytes, header_length: Optional[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the input tensors of a v2 infer body (JSON or binary extension)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InferError(f"Inference-Header-Content-Length {header_length!r} does not fit the body")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        document = json.loads(head or b"{}")
    except json.JSONDecodeError as exc:
        raise InferError(f"request header is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InferError("request must be an object with an 'inputs' list")
    tensors, offset = {}, 0
    for item in document["inputs"]:
        if not isinstance(item, dict) or not {"name", "datatype", "shape"} <= set(item):
            raise InferError("each input needs name, datatype and shape")
        name, datatype, shape = item["name"], item["datatype"], item["shape"]
        if datatype not in DTYPES:
            raise InferError(f"input {name}: unsupported datatype {datatype}")
        size = (item.get("parameters") or {}).get("binary_data_size")
        try:
            if size is not None:
                chunk = binary[offset:offset + int(size)]
                if len(chunk) != int(size):
                    raise InferError(f"input {name}: binary data is shorter than binary_data_size {size}")
                offset += int(size)
                array = np.frombuffer(chunk, dtype=DTYPES[datatype]).reshape(shape)
            else:
                array = np.asarray(item.get("data", []), dtype=DTYPES[datatype]).reshape(shape)
        except (ValueError, TypeError) as exc:
            raise InferError(f"input {name}: data does not match shape {shape} and datatype {datatype} ({exc})") from exc
        tensors[name] = array
    return document, tensors


def encode_outputs(document: dict, outputs: dict[str, tuple[str, np.ndarray]], model: str, rid: str) -> Response:
    """Answer with the requested outputs, in binary where the request asked for it."""
    wanted = document.get("outputs") or [{"name": n} for n in outputs]
    all_binary = bool((document.get("parameters") or {}).get("binary_data_output"))
    entries, blobs = [], []
    for spec in wanted:
        name = spec.get("name")
        if name not in outputs:
            raise InferError(f"unknown output {name!r}; outputs are {', '.join(outputs)}")
        datatype, array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if all_binary or (spec.get("parameters") or {}).get("binary_data", False):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    head = json.dumps({"model_name": model, "model_version": "1", "id": document.get("id", rid),
                       "outputs": entries}).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def kserve_router(require_key: Callable, settings: ServeSettings, request_model: type[GenerateRequest]) -> APIRouter:
    """The v2 routes; each row of an infer request is validated by `request_model` as /generate's body is."""
    router = APIRouter(tags=["kserve-v2"])

    def check_model(request: Request, name: str) -> Optional[JSONResponse]:
        if name != request.app.state.model_name:
            return _error(404, f"unknown model {name!r}; this server serves {request.app.state.model_name!r}")
        return None

    @router.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready(request: Request) -> Any:
        eng: Optional[Engine] = getattr(request.app.state, "engine", None)
        if eng is None or not eng.ready:
            return _error(503, "not ready")
        return {"ready": True}

    @router.get("/v2", dependencies=[Depends(require_key)])
    async def server_metadata() -> dict:
        return {"name": "racedit", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @router.get("/v2/models/{name}", dependencies=[Depends(require_key)])
    @router.get("/v2/models/{name}/versions/{version}", dependencies=[Depends(require_key)])
    async def model_metadata(name: str, request: Request, version: Optional[str] = None) -> Any:
        if (missing := check_model(request, name)) is not None:
            return missing
        _, height, width = request.app.state.engine.runner.output_shape  # decoded pictures for latent models
        return {"name": name, "versions": ["1"], "platform": "racedit",
                "inputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in INPUTS],
                "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, height, width, 3]},
                            {"name": "mean_experts_per_token", "datatype": "FP32", "shape": [-1]},
                            {"name": "seed", "datatype": "INT64", "shape": [-1]}]}

    @router.get("/v2/models/{name}/ready", dependencies=[Depends(require_key)])
    @router.get("/v2/models/{name}/versions/{version}/ready", dependencies=[Depends(require_key)])
    async def model_ready(name: str, request: Request, version: Optional[str] = None) -> Any:
        if (missing := check_model(request, name)) is not None:
            return missing
        return {"name": name, "ready": request.app.state.engine.ready}

    @router.post("/v2/models/{name}/infer", dependencies=[Depends(require_key)])
    @router.post("/v2/models/{name}/versions/{version}/infer", dependencies=[Depends(require_key)])
    async def infer(name: str, request: Request, version: Optional[str] = None) -> Response:
        if (missing := check_model(request, name)) is not None:
            return missing
        try:
            document, tensors = parse_infer(await request.body(), request.headers.get(HEADER))
            if "class_label" not in tensors:
                raise InferError("input class_label (INT64 [N]) is required")
            labels = tensors["class_label"].reshape(-1)
            n = labels.shape[0]
            columns = {"cfg_scale": 4.0, "num_steps": 25, "seed": None, "expert_budget": 1.0}
            values = {}
            for key, default in columns.items():
                if key in tensors:
                    column = tensors[key].reshape(-1)
                    if column.shape[0] != n:
                        raise InferError(f"input {key} has {column.shape[0]} entries, class_label has {n}")
                    values[key] = [v.item() for v in column]
                else:
                    values[key] = [default] * n
            jobs = []
            for i in range(n):
                try:
                    body = request_model.model_validate(
                        {"class_label": int(labels[i]), "cfg_scale": float(values["cfg_scale"][i]),
                         "num_steps": int(values["num_steps"][i]), "seed": values["seed"][i], "num_images": 1,
                         "expert_budget": float(values["expert_budget"][i])})
                except ValidationError as exc:
                    raise InferError(f"row {i}: {describe(exc)}") from None
                jobs.append(build_request(request.app.state.limits, body))
            for i, job in enumerate(jobs):
                job.request_id = f"{request.state.request_id}/{i}"
        except InferError as exc:
            return _error(400, str(exc))
        engine: Engine = request.app.state.engine
        try:
            results = await asyncio.gather(*(run_on_engine(engine, job, request) for job in jobs))
        except EngineError as exc:
            for job in jobs:
                engine.cancel(job.request_id)
            status, message, headers = engine_error(exc, settings.retry_after_s)
            return _error(status, message, headers)
        if any(r is None for r in results):
            return Response(status_code=499)
        images = np.concatenate([r.images for r in results])
        ept = np.array([r.expert_usage.mean_experts_per_token for r in results], dtype=np.float32)
        seeds = np.array([job.seed for job in jobs], dtype=np.int64)
        try:
            return encode_outputs(document, {"image": ("UINT8", images), "mean_experts_per_token": ("FP32", ept),
                                             "seed": ("INT64", seeds)},
                                  name, request.state.request_id)
        except InferError as exc:
            return _error(400, str(exc))

    return router

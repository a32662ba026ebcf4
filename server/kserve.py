"""KServe v2 / Open Inference Protocol routes, so the stock `tritonclient.http` works unchanged.

Inputs: class_label INT64 [N], cfg_scale FP32 [N], num_steps INT32 [N], seed INT64 [N], expert_budget FP32 [N],
sampler BYTES [N] (UTF-8 names: euler, ddpm, ...; GET /v1/models lists the model's) -- all but class_label
optional; what is left out takes /generate's default, and a seed left out is drawn at random.
Outputs: image UINT8 [N, H, W, 3], mean_experts_per_token FP32 [N] and seed INT64 [N] (the seeds
used). Tensors travel as JSON lists or through Triton's binary tensor extension
(`Inference-Header-Content-Length`).

A request is checked whole before anything runs, as strictly as /generate's body: the JSON head against
`InferRequest`, each input's name, datatype (exactly the one above, as Triton requires), shape ([N],
1 <= N <= --max-images), data (integers for integer types, finite numbers for float types, within the
type's range) or binary size, and each row as a /generate body of one image (--max-steps, --max-cfg-scale,
the class names, the budget range). Any problem is a 400 {"error", "request_id"} naming it. The N rows
run as N engine jobs under the request's one id (`Engine.submit_all`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError

from racedit_client.models import GenerateRequest

from .calls import engine_jobs, run_on_engine
from .engine import Engine, GenerationRequest
from .settings import ServeSettings
from .validation import Limits, describe

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,  # strings: JSON strings, or in binary each a 4-byte little-endian length and its bytes
}
INPUTS = {
    "class_label": "INT64",
    "cfg_scale": "FP32",
    "num_steps": "INT32",
    "seed": "INT64",
    "expert_budget": "FP32",
    "sampler": "BYTES",
}
MAX_STRING = 64  # bytes of one BYTES element (sampler names are short)
OUTPUTS = ("image", "mean_experts_per_token", "seed")
HEADER = "inference-header-content-length"


def _elements(datatype: str) -> TypeAdapter:
    """A JSON tensor's values, as strict as /generate's fields: integers for integer types (no 6.9, no
    true) within the type's range, finite numbers for float types."""
    if datatype == "BYTES":
        return TypeAdapter(list[Annotated[str, Strict(), Field(max_length=MAX_STRING)]])
    dtype = np.dtype(DTYPES[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return TypeAdapter(list[Annotated[int, Strict(), Field(ge=int(info.min), le=int(info.max))]])
    return TypeAdapter(list[Annotated[float, Strict(), Field(allow_inf_nan=False)]])


ELEMENTS = {datatype: _elements(datatype) for datatype in set(INPUTS.values())}


class InferError(ValueError):
    """A malformed v2 request: answered 400 with {"error": ...} before any inference runs."""


class _Open(BaseModel):
    """v2 `parameters`: an object whose known keys are typed; others are ignored, as the protocol allows."""

    model_config = ConfigDict(extra="allow", strict=True)


class InputParameters(_Open):
    binary_data_size: Optional[Annotated[int, Field(ge=0)]] = None


class OutputParameters(_Open):
    binary_data: Optional[bool] = None


class RequestParameters(_Open):
    binary_data_output: Optional[bool] = None


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    parameters: Optional[InputParameters] = None
    data: Optional[list[Any]] = None


class InferOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Literal[OUTPUTS]  # type: ignore[valid-type]
    parameters: Optional[OutputParameters] = None


class InferRequest(BaseModel):
    """The JSON head of a v2 infer request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: Optional[str] = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: Optional[list[InferOutput]] = None
    parameters: Optional[RequestParameters] = None


def split_body(body: bytes, header_length: Optional[str]) -> tuple[bytes, bytes]:
    """(JSON head, binary tensor data) of a body, by `Inference-Header-Content-Length`."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise InferError(
            f"Inference-Header-Content-Length must be a byte count within the body's {len(body)} "
            f"bytes, got {header_length[:40]!r}"
        )
    return body[: int(header_length)], body[int(header_length) :]


def parse_infer(body: bytes, header_length: Optional[str], max_rows: int) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The head and the input tensors of a v2 infer body (JSON or binary extension), every input one of
    INPUTS with its datatype and shape [N], 1 <= N <= max_rows; InferError names the first problem."""
    head, binary = split_body(body, header_length)
    try:
        document = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        raise InferError(describe(exc)) from None
    tensors, offset, rows = {}, 0, None
    for item in document.inputs:
        name = item.name
        if name not in INPUTS:
            raise InferError(f"unknown input {name[:64]!r}; inputs are {', '.join(INPUTS)}")
        if name in tensors:
            raise InferError(f"input {name} is given twice")
        if item.datatype != INPUTS[name]:
            raise InferError(f"input {name}: datatype {item.datatype}, expected {INPUTS[name]}")
        if len(item.shape) != 1:
            raise InferError(f"input {name}: shape {item.shape}, expected [N] (one value per image)")
        n = item.shape[0]
        if rows is not None and n != rows:
            raise InferError(f"input {name} has {n} values, {next(iter(tensors))} has {rows}")
        rows = n
        size = item.parameters.binary_data_size if item.parameters is not None else None
        if (size is None) == (item.data is None):
            raise InferError(f"input {name}: give either data or parameters.binary_data_size")
        dtype = np.dtype(DTYPES[item.datatype])
        if size is not None and item.datatype == "BYTES":
            if offset + size > len(binary):
                raise InferError(f"input {name}: binary_data_size {size} with {len(binary) - offset} bytes left")
            tensors[name] = bytes_elements(name, binary[offset : offset + size], n)
            offset += size
        elif size is not None:
            if size != n * dtype.itemsize or offset + size > len(binary):
                raise InferError(
                    f"input {name}: binary_data_size {size} with {len(binary) - offset} bytes left; "
                    f"shape [{n}] of {item.datatype} is {n * dtype.itemsize} bytes"
                )
            tensors[name] = np.frombuffer(binary, dtype=dtype, count=n, offset=offset)
            offset += size
        else:
            if len(item.data) != n:
                raise InferError(f"input {name}: shape [{n}] but {len(item.data)} values")
            try:
                values = ELEMENTS[item.datatype].validate_python(item.data)
            except ValidationError as exc:
                raise InferError(f"input {name}: data {describe(exc)}") from None
            tensors[name] = np.array(values, dtype=dtype)
    if offset != len(binary):
        raise InferError(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    if "class_label" not in tensors:
        raise InferError("input class_label (INT64 [N]) is required")
    if not 1 <= rows <= max_rows:
        raise InferError(f"{rows} rows: a request holds 1 to {max_rows} images (--max-images)")
    return document, tensors


def bytes_elements(name: str, raw: bytes, n: int) -> np.ndarray:
    """n BYTES elements from Triton's binary layout (each a uint32 little-endian length, then that many
    bytes), decoded as UTF-8 strings; InferError unless they fill `raw` exactly."""
    values, offset = [], 0
    for _ in range(n):
        if offset + 4 > len(raw):
            raise InferError(f"input {name}: binary BYTES data ends inside an element's length")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        if length > MAX_STRING or offset + 4 + length > len(raw):
            raise InferError(f"input {name}: a BYTES element of {length} bytes (at most {MAX_STRING}, within the data)")
        try:
            values.append(raw[offset + 4 : offset + 4 + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise InferError(f"input {name}: BYTES elements must be UTF-8 text") from None
        offset += 4 + length
    if offset != len(raw):
        raise InferError(f"input {name}: {len(raw) - offset} bytes after its {n} BYTES elements")
    return np.array(values, dtype=np.object_)


def build_jobs(
    tensors: dict[str, np.ndarray], request_model: type[GenerateRequest], limits: Limits, request_id: str
) -> list[GenerationRequest]:
    """One engine job per row, each row validated as a /generate body of one image (its defaults, its ranges)."""
    bodies = []
    for i in range(len(tensors["class_label"])):
        try:
            body = request_model.model_validate(
                {name: _scalar(column[i]) for name, column in tensors.items()} | {"num_images": 1}
            )
        except ValidationError as exc:
            raise InferError(f"row {i}: {describe(exc)}") from None
        bodies.append(body)
    return engine_jobs(limits, bodies, request_id)  # one id for the request, however many rows


def _scalar(value: Any) -> Any:
    """A numpy element as the Python value /generate's body would hold (a BYTES element is already a str)."""
    return value.item() if isinstance(value, np.generic) else value


def encode_outputs(
    document: InferRequest, outputs: dict[str, tuple[str, np.ndarray]], model: str, rid: str
) -> Response:
    """Answer with the requested outputs, in binary where the request asked for it."""
    wanted = document.outputs or [InferOutput(name=n) for n in outputs]
    all_binary = bool(document.parameters is not None and document.parameters.binary_data_output)
    entries, blobs = [], []
    for spec in wanted:
        datatype, array = outputs[spec.name]
        entry: dict[str, Any] = {"name": spec.name, "datatype": datatype, "shape": list(array.shape)}
        if all_binary or (spec.parameters is not None and spec.parameters.binary_data):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    head = json.dumps(
        {"model_name": model, "model_version": "1", "id": document.id or rid, "outputs": entries}
    ).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def kserve_router(settings: ServeSettings, request_model: type[GenerateRequest]) -> APIRouter:
    """The v2 routes; each row of an infer request is validated by `request_model` as /generate's body is.
    Errors raise, and the app answers them as {"error", "request_id"} (middleware.error_document)."""
    router = APIRouter(tags=["kserve-v2"])

    def check_model(request: Request, name: str) -> None:
        if name != request.app.state.model_name:
            raise HTTPException(
                404, f"unknown model {name[:64]!r}; this server serves {request.app.state.model_name!r}"
            )

    @router.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready(request: Request) -> Any:
        eng: Optional[Engine] = getattr(request.app.state, "engine", None)
        if eng is None or not eng.ready:
            raise HTTPException(503, "not ready", headers={"Retry-After": str(settings.retry_after_s)})
        return {"ready": True}

    @router.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "racedit", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, request: Request, version: Optional[str] = None) -> Any:
        check_model(request, name)
        _, height, width = request.app.state.engine.runner.output_shape  # decoded pictures for latent models
        return {
            "name": name,
            "versions": ["1"],
            "platform": "racedit",
            "inputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in INPUTS.items()],
            "outputs": [
                {"name": "image", "datatype": "UINT8", "shape": [-1, height, width, 3]},
                {"name": "mean_experts_per_token", "datatype": "FP32", "shape": [-1]},
                {"name": "seed", "datatype": "INT64", "shape": [-1]},
            ],
        }

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request, version: Optional[str] = None) -> Any:
        check_model(request, name)
        return {"name": name, "ready": request.app.state.engine.ready}

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: Optional[str] = None) -> Response:
        check_model(request, name)
        limits: Limits = request.app.state.limits
        try:
            document, tensors = parse_infer(await request.body(), request.headers.get(HEADER), limits.max_images)
            jobs = build_jobs(tensors, request_model, limits, request.state.request_id)
        except InferError as exc:
            raise HTTPException(400, str(exc)) from None
        results = await run_on_engine(request.app.state.engine, jobs, request)  # engine errors: the app answers
        if results is None:
            return Response(status_code=499)
        images = np.concatenate([r.images for r in results])
        ept = np.array([r.expert_usage.mean_experts_per_token for r in results], dtype=np.float32)
        seeds = np.array([job.seed for job in jobs], dtype=np.int64)
        return encode_outputs(
            document,
            {"image": ("UINT8", images), "mean_experts_per_token": ("FP32", ept), "seed": ("INT64", seeds)},
            name,
            request.state.request_id,
        )

    return router

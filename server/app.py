"""The HTTP layer (FastAPI). It validates, submits to the engine, and encodes results; nothing more."""
import asyncio
import base64
import hmac
import io
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable, Optional

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .calls import engine_error, run_on_engine
from .engine import Engine, EngineError, GenerationResult
from .kserve import kserve_router
from .schemas import ErrorBody, GenerateResponse, Health, ModelCard, ModelList, ResolvedRequest
from .settings import ServeSettings
from .validation import Limits, build_request, request_model

log = logging.getLogger("racedit.server")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "npy": "application/x-npy"}
PUBLIC_PATHS = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}


def encode_npy(sample: np.ndarray) -> bytes:
    """A float32 sample [C, H, W] as a NumPy .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(sample, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def encode_result(result: GenerationResult, fmt: str) -> list[bytes]:
    """Each image of a result in the wire format asked for."""
    if fmt == "npy":
        return [encode_npy(sample) for sample in result.samples]
    return [encode_image(pixels, fmt) for pixels in result.images]


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless), JPEG or WebP bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


# -------------------------------------------------------------- middleware ----
class BodyLimit:
    """Refuse bodies above `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, {"detail": f"request body exceeds {self.max_bytes} bytes"})
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = JSONResponse(body).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def model_card(engine: Engine, name: str, backend: str) -> ModelCard:
    from racedit.model import parameter_counts

    cfg = engine.model.config
    total, activated = parameter_counts(cfg)
    return ModelCard(
        id=name, classes=class_names_of(cfg),
        image_size=cfg.image_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
        routing=cfg.moe.__dict__ if cfg.moe else None, parameters_total=total, parameters_activated=activated,
        thresholds=[float(layer.threshold) for layer in engine.model.moe_layers], backend=backend,
        dtype=str(engine.dtype).removeprefix("torch."), batch_invariant=engine.batch_invariant)


def build_engine(settings: ServeSettings) -> Engine:
    from racedit.model import load

    from .engine import pick_device
    from .metrics import EngineMetrics

    device, dtype = pick_device(settings.device, settings.dtype)
    if settings.backend == "onnxruntime":
        from racedit.export.external import load_onnx_model

        # onnxruntime picks its own provider (CUDA where present unless --device cpu); tensors cross on the CPU.
        model = load_onnx_model(settings.checkpoint, settings.onnx, device if device.type == "cpu" else None)
        device, dtype = torch.device("cpu"), torch.float32
    else:
        model = load(settings.checkpoint)
    return Engine(model, device, dtype, max_batch_rows=settings.max_batch_rows, max_queue=settings.max_queue,
                  mode=settings.batching, static_wait_ms=settings.static_wait_ms, metrics=EngineMetrics(),
                  batch_invariant=settings.batch_invariant)


# --------------------------------------------------------------------- app ----
def create_app(settings: Optional[ServeSettings] = None, engine: Optional[Engine] = None) -> FastAPI:
    settings = settings or ServeSettings()
    state: dict[str, Any] = {"engine": engine}
    limits = Limits.from_settings(settings, _class_names(settings, engine))
    GenerateRequest = request_model(limits)  # noqa: N806 -- the wire model, with this server's ranges

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["engine"] is None:
            state["engine"] = await run_in_threadpool(build_engine, settings)
        eng: Engine = state["engine"]
        if not eng.ready:
            await run_in_threadpool(eng.start)
        app.state.engine = eng
        app.state.model_name = settings.model_name or _default_name(settings)
        app.state.limits = limits
        log.info("racedit ready: model %s on %s", app.state.model_name, eng.device)
        yield
        await run_in_threadpool(eng.stop, True, settings.drain_timeout_s)

    app = FastAPI(title="racedit", version="0.1.0", lifespan=lifespan,
                  description="Class-conditional image generation with Race-DiT (Expert-Race MoE diffusion transformers).")
    app.state.settings = settings

    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = settings.api_key.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    http_registry = CollectorRegistry()  # HTTP series; the engine keeps its own racedit_* registry
    Instrumentator(excluded_handlers=["/metrics"], registry=http_registry).instrument(app)

    def error(request: Request, status: int, detail: Any, headers: Optional[dict] = None) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        return JSONResponse(ErrorBody(detail=detail, request_id=rid).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", [])), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error(request, 422, details)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(EngineError)
    async def on_engine(request: Request, exc: EngineError) -> JSONResponse:
        status, message, headers = engine_error(exc, settings.retry_after_s)
        return error(request, status, message, headers)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"])
    async def readyz(request: Request) -> Any:
        eng: Optional[Engine] = getattr(request.app.state, "engine", None)
        if eng is None or not eng.ready:
            state = ("not ready" if eng is None else "engine worker stopped" if eng.worker_died
                     else "not ready" if eng.accepting else "draining")
            return error(request, 503, state, {"Retry-After": str(settings.retry_after_s)})
        return Health(status="ready")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_key)], tags=["models"])
    async def models(request: Request) -> ModelList:
        return ModelList(data=[model_card(request.app.state.engine, request.app.state.model_name, settings.backend)])

    @app.post("/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)], tags=["generate"],
              responses={code: {"model": ErrorBody} for code in (401, 409, 413, 422, 429, 500, 503, 504)})
    async def generate(body: GenerateRequest, request: Request) -> Any:
        job = build_request(limits, body)
        job.request_id = request.state.request_id  # errors from the engine name the id the client sees
        result = await run_on_engine(request.app.state.engine, job, request)
        if result is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        encoded = await run_in_threadpool(encode_result, result, body.output_format)
        return GenerateResponse(
            id=request.state.request_id, model=request.app.state.model_name, seed=job.seed,
            request=ResolvedRequest(class_label=job.class_label, class_name=limits.class_names[job.class_label],
                                    cfg_scale=job.cfg_scale, num_steps=job.num_steps, num_images=job.num_images,
                                    seed=job.seed, output_format=body.output_format),
            images=[{"seed": s, "mime_type": MIME[body.output_format], "data": base64.b64encode(b).decode()}
                    for s, b in zip(result.seeds, encoded)],
            expert_usage=result.expert_usage,
            timing={"queue_ms": result.queue_ms, "inference_ms": result.inference_ms, "total_ms": result.total_ms})

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_key)])
    async def metrics(request: Request) -> Response:
        body = generate_latest(http_registry) + generate_latest(request.app.state.engine.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(kserve_router(require_key, settings, GenerateRequest))
    return app


def class_names_of(config: Any) -> list[str]:
    return list(config.class_names or [str(i) for i in range(config.num_classes)])


def _class_names(settings: ServeSettings, engine: Optional[Engine]) -> list[str]:
    """The served model's class names, known before it loads (the request schema names its ranges)."""
    from racedit.model import read_config
    from racedit.model.config import ModelConfig

    return class_names_of(engine.model.config if engine is not None
                          else ModelConfig.from_dict(read_config(settings.checkpoint)["model"]))


def _default_name(settings: ServeSettings) -> str:
    from racedit.model import read_config

    return read_config(settings.checkpoint).get("metadata", {}).get("name") or f"racedit-{settings.checkpoint.name.removeprefix('racedit-')}"

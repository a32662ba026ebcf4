"""The HTTP layer (FastAPI). It validates, submits to the engine, and encodes results; nothing more."""
import asyncio
import base64
import io
import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .calls import engine_error, run_on_engine
from .engine import Engine, EngineError, GenerationRequest, GenerationResult, StepProgress
from . import schemas
from .kserve import kserve_router
from .middleware import REQUEST_ID_MAX, RequireKey, error_document, send_error
from .schemas import (ErrorBody, GenerateResponse, Health, ModelCard, ModelList, PreviewEvent, ProgressEvent,
                      ResolvedRequest, StreamError)
from .settings import ServeSettings
from .validation import Limits, build_request, request_model

log = logging.getLogger("racedit.server")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "npy": "application/x-npy"}
STATIC = Path(__file__).resolve().parent / "static"
REFUSALS = (400, 401, 408, 413, 422, 431)  # what any route may answer before it runs (README: Errors)


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


def encode_preview(sample: np.ndarray) -> list[bytes]:
    """Predicted clean samples float [N, C, H, W] in [-1, 1] -> PNGs, quantised as final images are."""
    pixels = ((np.clip(sample, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return [encode_image(p, "png") for p in pixels]


def sse(event: str, data: BaseModel) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()


def progress_event(progress: StepProgress) -> bytes:
    return sse("progress", ProgressEvent(step=progress.step, num_steps=progress.num_steps, t=progress.t,
                                         mean_experts_per_token=progress.mean_experts_per_token,
                                         elapsed_ms=progress.elapsed_ms))


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
    """Refuse bodies above `max_bytes` with 413, whether or not Content-Length is sent, and bodies that do
    not arrive within `timeout_s` of the head with 408 (a slow sender holds no handler for long). What is
    read after the body (a disconnect) has no deadline."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(scope, send, 413, f"request body exceeds {self.max_bytes} bytes")
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class RequestId:
    """`request.state.request_id` from X-Request-ID (or a new one), echoed on every answer. An id longer
    than REQUEST_ID_MAX (431) or with other than visible ASCII characters (400), and a head larger than
    `max_head_bytes` (431, a head h11 got whole in one read) are refused, answered under a new id: a
    client's value is never echoed unchecked. Plain ASGI, not BaseHTTPMiddleware, which cancels a
    streaming answer whose body waits (the stream route's)."""

    def __init__(self, app: ASGIApp, max_head_bytes: int):
        self.app, self.max_head_bytes = app, max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        head = len(scope.get("raw_path") or b"") + len(scope["query_string"]) + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        refusal = (
            (431, f"request head (request line and headers) exceeds {self.max_head_bytes} bytes")
            if head > self.max_head_bytes else
            (431, f"X-Request-ID is longer than {REQUEST_ID_MAX} characters") if len(given) > REQUEST_ID_MAX else
            (400, "X-Request-ID must be visible ASCII characters (no spaces)")
            if given and not all(0x21 <= c <= 0x7E for c in given) else None)
        rid = given.decode("ascii") if given and refusal is None else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        if refusal is not None:
            return await send_error(scope, send_with_id, *refusal)
        await self.app(scope, receive, send_with_id)


def model_card(engine: Engine, name: str, backend: str) -> ModelCard:
    from racedit.model import parameter_counts

    cfg = engine.model.config
    total, activated = parameter_counts(cfg)
    return ModelCard(
        id=name, classes=class_names_of(cfg),
        image_size=cfg.image_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
        image_shape=list(engine.output_shape),
        latent_shape=list(engine.image_shape) if engine.decoder is not None else None,
        autoencoder=({"kind": engine.decoder.autoencoder.kind, "scaling_factor": engine.decoder.autoencoder.scaling_factor,
                      "shift_factor": engine.decoder.autoencoder.shift_factor} if engine.decoder is not None else None),
        routing=cfg.moe.__dict__ if cfg.moe else None, parameters_total=total, parameters_activated=activated,
        thresholds=engine.layer_thresholds, backend=backend,
        dtype=str(engine.dtype).removeprefix("torch."), batch_invariant=engine.batch_invariant,
        expert_budget_range=list(engine.budget_range or (1.0, 1.0)))


def build_engine(settings: ServeSettings) -> Engine:
    from racedit.model import load
    from racedit.model.autoencoder import Decoder
    from racedit.model.checkpoint import read_autoencoder

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
    autoencoder = read_autoencoder(settings.checkpoint)
    decoder = Decoder(autoencoder, device) if autoencoder is not None else None
    return Engine(model, device, dtype, max_batch_rows=settings.max_batch_rows, max_queue=settings.max_queue,
                  mode=settings.batching, static_wait_ms=settings.static_wait_ms, metrics=EngineMetrics(),
                  batch_invariant=settings.batch_invariant, decoder=decoder)


# --------------------------------------------------------------------- app ----
def create_app(settings: Optional[ServeSettings] = None, engine: Optional[Engine] = None) -> FastAPI:
    settings = settings or ServeSettings()
    state: dict[str, Any] = {"engine": engine}
    limits = Limits.from_settings(settings, *_served_model(settings, engine))
    GenerateRequest = request_model(limits)  # noqa: N806 -- the wire models, with this server's ranges
    GenerateStreamRequest = request_model(limits, schemas.GenerateStreamRequest)  # noqa: N806

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
        if settings.api_key is None:
            log.warning("serving WITHOUT authentication: no API key is set (--api-key or RACEDIT_API_KEY), so "
                        "anyone who reaches %s:%s can generate", settings.host, settings.port)
        yield
        await run_in_threadpool(eng.stop, True, settings.drain_timeout_s)

    app = FastAPI(title="racedit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Class-conditional image generation with Race-DiT (Expert-Race MoE diffusion transformers).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The playground page (static HTML, CSS and JS shipped in the package; no CDN)."""
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI from the package's own copy, so it works offline."""
        return get_swagger_ui_html(openapi_url="openapi.json", title="racedit API",
                                   swagger_js_url="static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="static/swagger/swagger-ui.css",
                                   swagger_favicon_url="static/swagger/favicon-32x32.png")
    app.state.settings = settings

    # The last added runs first: the request id, then the key (from the headers alone), then the body limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.read_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(RequestId, max_head_bytes=settings.max_header_bytes)
    http_registry = CollectorRegistry()  # HTTP series; the engine keeps its own racedit_* registry
    Instrumentator(excluded_handlers=["/metrics"], registry=http_registry).instrument(app)

    def error(request: Request, status: int, detail: Any, headers: Optional[dict] = None) -> JSONResponse:
        """Every error answer of the routes: the request id in the body (and, from RequestId, the header)."""
        document = error_document(request.url.path, detail, getattr(request.state, "request_id", None))
        return JSONResponse(document, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", [])), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error(request, 422, details)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's own 404/405
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        """An unexpected error (uvicorn logs its traceback): answered by Starlette's outermost middleware,
        outside RequestId, so the id header is set here."""
        rid = getattr(request.state, "request_id", None)
        return error(request, 500, f"internal error: {type(exc).__name__}", {"X-Request-ID": rid} if rid else None)

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

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models(request: Request) -> ModelList:
        return ModelList(data=[model_card(request.app.state.engine, request.app.state.model_name, settings.backend)],
                         authentication="none" if settings.api_key is None else "bearer")

    def answer(request: Request, body: GenerateRequest, job: GenerationRequest, result: GenerationResult,
               encoded: list[bytes]) -> GenerateResponse:
        """The /generate answer (also the stream's `result` event)."""
        return GenerateResponse(
            id=request.state.request_id, model=request.app.state.model_name, seed=job.seed,
            request=ResolvedRequest(class_label=job.class_label, class_name=limits.class_names[job.class_label],
                                    cfg_scale=job.cfg_scale, num_steps=job.num_steps, num_images=job.num_images,
                                    seed=job.seed, expert_budget=job.expert_budget, output_format=body.output_format),
            images=[{"seed": s, "mime_type": MIME[body.output_format], "data": base64.b64encode(b).decode()}
                    for s, b in zip(result.seeds, encoded)],
            expert_usage=result.expert_usage,
            timing={"queue_ms": result.queue_ms, "inference_ms": result.inference_ms, "total_ms": result.total_ms,
                    "decode_ms": result.decode_ms})

    @app.post("/generate", response_model=GenerateResponse, tags=["generate"],
              responses={code: {"model": ErrorBody} for code in (*REFUSALS, 409, 429, 500, 503, 504)})
    async def generate(body: GenerateRequest, request: Request) -> Any:
        job = build_request(limits, body)
        job.request_id = request.state.request_id  # errors from the engine name the id the client sees
        results = await run_on_engine(request.app.state.engine, [job], request)
        if results is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        result = results[0]
        return answer(request, body, job, result, await run_in_threadpool(encode_result, result, body.output_format))

    @app.post("/generate/stream", tags=["generate"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events progress, preview, then result (the /generate answer) or "
                                              "error; errors known before the stream starts are plain answers"},
                         **{code: {"model": ErrorBody} for code in (*REFUSALS, 409, 429, 503)}})
    async def generate_stream(body: GenerateStreamRequest, request: Request) -> StreamingResponse:
        job = build_request(limits, body)
        job.request_id = request.state.request_id
        job.preview_every = body.preview_every
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        job.on_step = lambda progress: loop.call_soon_threadsafe(steps.put_nowait, progress)
        engine: Engine = request.app.state.engine
        future = asyncio.wrap_future(engine.submit(job))  # a full queue or a drain answers 429/503 here

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                while True:
                    getter = asyncio.ensure_future(steps.get())
                    await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    progress: StepProgress = getter.result()
                    yield progress_event(progress)
                    if progress.preview is not None:
                        pngs = await run_in_threadpool(encode_preview, progress.preview)
                        yield sse("preview", PreviewEvent(step=progress.step, t=progress.t, images=[
                            {"seed": s, "mime_type": "image/png", "data": base64.b64encode(b).decode()}
                            for s, b in zip(job.seeds, pngs)]))
                while not steps.empty():  # steps reported just before the answer
                    yield progress_event(steps.get_nowait())
                try:
                    result = future.result()
                except EngineError as exc:
                    status, message, _ = engine_error(exc, settings.retry_after_s)
                    finished = True
                    yield sse("error", StreamError(status=status, detail=message, request_id=job.request_id))
                    return
                encoded = await run_in_threadpool(encode_result, result, body.output_format)
                finished = True
                yield sse("result", answer(request, body, job, result, encoded))
            finally:
                if not finished:  # the client left mid-stream: its rows leave at the next step
                    engine.cancel(job.request_id)
                    future.add_done_callback(lambda f: f.exception())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = generate_latest(http_registry) + generate_latest(request.app.state.engine.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(kserve_router(settings, GenerateRequest))
    document_stream_events(app)
    return app


def document_stream_events(app: FastAPI) -> None:
    """Put the stream's event models into /openapi.json (components), which FastAPI cannot infer from
    a text/event-stream answer."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas.STREAM_EVENTS.values():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in schema.pop("$defs", {}).items():  # ImageOut, ... are components too
                    components.setdefault(name, definition)
                components.setdefault(model.__name__, schema)
            stream = document["paths"]["/generate/stream"]["post"]["responses"]["200"]["content"]["text/event-stream"]
            stream["schema"] = {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"}
                                          for m in schemas.STREAM_EVENTS.values()]}
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def class_names_of(config: Any) -> list[str]:
    return list(config.class_names or [str(i) for i in range(config.num_classes)])


def _served_model(settings: ServeSettings, engine: Optional[Engine]) -> tuple[list[str], Optional[tuple[float, float]]]:
    """The served model's class names and budget range, known before it loads (the request schema
    names its ranges). An ONNX denoiser has no compute dial."""
    from racedit.model import read_config
    from racedit.model.config import ModelConfig

    if engine is not None:
        return class_names_of(engine.model.config), engine.budget_range
    from racedit.model.calibrate import budget_range

    document = read_config(settings.checkpoint)
    budgets = budget_range(document.get("metadata", {})) if settings.backend == "torch" else None
    return class_names_of(ModelConfig.from_dict(document["model"])), budgets


def _default_name(settings: ServeSettings) -> str:
    from racedit.model import read_config

    return read_config(settings.checkpoint).get("metadata", {}).get("name") or f"racedit-{settings.checkpoint.name.removeprefix('racedit-')}"

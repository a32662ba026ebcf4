"""The HTTP routes: generation (`/generate`, `/generate/stream`) and the service's own (health, the model
card, metrics, the playground page and the API docs). Each route decodes, takes the shared path into the
engine (server/calls.py) and encodes (server/encoding.py); KServe v2's routes are in server/kserve.py."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .calls import engine_error, engine_jobs, run_on_engine
from .encoding import encode_result, generate_response, model_card, preview_event, progress_event, sse
from .engine import Engine
from .middleware import error_document
from .requests import EngineError, StepProgress
from .schemas import ErrorBody, GenerateRequest, GenerateResponse, GenerateStreamRequest, Health, ModelList, StreamError
from .settings import ServeSettings
from .validation import Limits

STATIC = Path(__file__).resolve().parent / "static"
REFUSALS = (400, 401, 408, 413, 422, 431)  # what any route may answer before it runs (README: Errors)


def generation_routes(
    settings: ServeSettings,
    limits: Limits,
    body_model: type[GenerateRequest],
    stream_model: type[GenerateStreamRequest],
) -> APIRouter:
    """`body_model` and `stream_model` are the wire's request models with this server's limits."""
    router = APIRouter(tags=["generate"])

    @router.post(
        "/generate",
        response_model=GenerateResponse,
        responses={code: {"model": ErrorBody} for code in (*REFUSALS, 409, 429, 500, 503, 504)},
    )
    async def generate(body: body_model, request: Request) -> Any:
        jobs = engine_jobs(limits, [body], request.state.request_id)
        results = await run_on_engine(request.app.state.engine, jobs, request)
        if results is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        encoded = await run_in_threadpool(encode_result, results[0], body.output_format)
        return generate_response(
            request.state.request_id,
            request.app.state.model_name,
            jobs[0],
            body.output_format,
            results[0],
            encoded,
            limits.class_names,
        )

    @router.post(
        "/generate/stream",
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "events progress, preview, then result (the /generate answer) or "
                "error; errors known before the stream starts are plain answers",
            },
            **{code: {"model": ErrorBody} for code in (*REFUSALS, 409, 429, 503)},
        },
    )
    async def generate_stream(body: stream_model, request: Request) -> StreamingResponse:
        (job,) = engine_jobs(limits, [body], request.state.request_id)
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
                        yield await run_in_threadpool(preview_event, progress, job.seeds)
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
                yield sse(
                    "result",
                    generate_response(
                        job.request_id,
                        request.app.state.model_name,
                        job,
                        body.output_format,
                        result,
                        encoded,
                        limits.class_names,
                    ),
                )
            finally:
                if not finished:  # the client left mid-stream: its rows leave at the next step
                    engine.cancel(job.request_id)
                    future.add_done_callback(lambda f: f.exception())

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return router


def service_routes(settings: ServeSettings, limits: Limits, http_registry: CollectorRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, tags=["health"])
    async def readyz(request: Request) -> Any:
        engine: Optional[Engine] = getattr(request.app.state, "engine", None)
        if engine is None or not engine.ready:
            state = (
                "not ready"
                if engine is None
                else "engine worker stopped"
                if engine.worker_died
                else "not ready"
                if engine.accepting
                else "draining"
            )
            document = error_document(request.url.path, state, request.state.request_id)
            return JSONResponse(document, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return Health(status="ready")

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models(request: Request) -> ModelList:
        card = model_card(request.app.state.engine, request.app.state.model_name, settings.backend, limits)
        return ModelList(data=[card], authentication="none" if settings.api_key is None else "bearer")

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = generate_latest(http_registry) + generate_latest(request.app.state.engine.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """The playground page (static HTML, CSS and JS shipped in the package; no CDN)."""
        return FileResponse(STATIC / "index.html")

    @router.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI from the package's own copy, so it works offline."""
        return get_swagger_ui_html(
            openapi_url="openapi.json",
            title="racedit API",
            swagger_js_url="static/swagger/swagger-ui-bundle.js",
            swagger_css_url="static/swagger/swagger-ui.css",
            swagger_favicon_url="static/swagger/favicon-32x32.png",
        )

    return router

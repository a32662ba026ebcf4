"""The app: assembly of the HTTP layer (server/middleware.py, server/routes.py, server/kserve.py) around one
engine. The HTTP layer validates, submits to the engine and encodes results; nothing more."""

import logging
from contextlib import asynccontextmanager
from typing import Any, Optional

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.concurrency import run_in_threadpool

from . import middleware, schemas
from .encoding import class_names_of
from .engine import Engine
from .kserve import kserve_router
from .routes import STATIC, generation_routes, service_routes
from .settings import ServeSettings
from .validation import Limits, ServedModel, request_model

log = logging.getLogger("racedit.server")


def create_app(settings: Optional[ServeSettings] = None, engine: Optional[Engine] = None) -> FastAPI:
    settings = settings or ServeSettings()
    limits = Limits.from_settings(settings, served_model(settings, engine))
    body_model, stream_model = request_model(limits), request_model(limits, schemas.GenerateStreamRequest)

    built: dict[str, Engine] = {}  # the engine, once built: a second lifespan (a restarted app) reuses it

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = engine or built.get("engine") or await run_in_threadpool(build_engine, settings)
        built["engine"] = app.state.engine
        if not app.state.engine.ready:
            await run_in_threadpool(app.state.engine.start)
        app.state.model_name = settings.model_name or _default_name(settings)
        log.info("racedit ready: model %s on %s", app.state.model_name, app.state.engine.runner.device)
        if settings.api_key is None:
            log.warning(
                "serving WITHOUT authentication: no API key is set (--api-key or RACEDIT_API_KEY), so "
                "anyone who reaches %s:%s can generate",
                settings.host,
                settings.port,
            )
        yield
        await run_in_threadpool(app.state.engine.stop, True, settings.drain_timeout_s)

    app = FastAPI(
        title="racedit",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Class-conditional image generation with Race-DiT (Expert-Race MoE diffusion transformers).",
    )
    app.state.settings, app.state.limits = settings, limits
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    middleware.install(app, settings)
    http_registry = CollectorRegistry()  # HTTP series; the engine keeps its own racedit_* registry
    Instrumentator(excluded_handlers=["/metrics"], registry=http_registry).instrument(app)
    app.include_router(service_routes(settings, limits, http_registry))
    app.include_router(generation_routes(settings, limits, body_model, stream_model))
    app.include_router(kserve_router(settings, body_model))
    document_stream_events(app)
    return app


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
    return Engine.build(
        model,
        device,
        dtype,
        max_batch_rows=settings.max_batch_rows,
        max_queue=settings.max_queue,
        mode=settings.batching,
        static_wait_ms=settings.static_wait_ms,
        metrics=EngineMetrics(),
        batch_invariant=settings.batch_invariant,
        decoder=decoder,
        cuda_graphs=settings.cuda_graphs,
    )


def served_model(settings: ServeSettings, engine: Optional[Engine]) -> ServedModel:
    """What the request schema needs of the served model, known before it loads: its class names, budget
    range, and its family's samplers and defaults (model/config.py `Conventions`). An ONNX denoiser
    has no compute dial."""
    from racedit.model import read_config
    from racedit.model.budget import BudgetTable, budget_range
    from racedit.model.config import ModelConfig

    if engine is not None:
        config, budgets = engine.config, engine.runner.budget_range
    else:
        document = read_config(settings.checkpoint)
        config = ModelConfig.from_dict(document["model"])
        table = BudgetTable.from_metadata(document.get("metadata", {})) if settings.backend == "torch" else None
        budgets = budget_range(table)
    family = config.family  # the checkpoint's conventions: its samplers and defaults
    return ServedModel(
        class_names_of(config),
        budgets,
        tuple(family.samplers),
        family.default_sampler,
        family.default_steps,
        family.default_cfg_scale,
        family.family,
    )


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
            stream["schema"] = {
                "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in schemas.STREAM_EVENTS.values()]
            }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def _default_name(settings: ServeSettings) -> str:
    from racedit.model import read_config

    return (
        read_config(settings.checkpoint).get("metadata", {}).get("name")
        or f"racedit-{settings.checkpoint.name.removeprefix('racedit-')}"
    )

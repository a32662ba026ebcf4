"""racedit on Ray Serve: the same FastAPI app, one engine per replica, behind Ray's HTTP proxy.

Ray Serve routes each HTTP request to a replica (power of two choices on ongoing requests),
autoscales replicas on ongoing requests and runs on a cluster (KubeRay on Kubernetes). Each
replica builds its own engine from the same ServeSettings and answers every route exactly as
`racedit serve` does alone; answers name their replica in `x-racedit-replica`.

Queue bounds agree: a replica takes at most `max_queue + max_batch_rows` ongoing requests
(every active request holds at least one row, so its engine can still queue `max_queue`),
and when every replica is at that bound Ray's proxy holds up to `max_queue` more, then answers
429 with Retry-After itself -- the status and header the engine gives for a full queue.

Start it with `racedit serve --ray --replicas N`, or `serve run deploy/ray/racedit.yaml`
(whose `import_path` is `racedit.server.ray_serve:app_builder`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from .settings import ServeSettings

log = logging.getLogger("racedit.server")
REPLICA_HEADER = "x-racedit-replica"


def _replica_app(settings: ServeSettings) -> Any:
    """Runs inside each replica: its engine, its metrics port, the app with the replica header."""
    import torch
    from prometheus_client import start_http_server

    from .app import build_engine, create_app

    torch.set_num_threads(max(1, int(settings.replica_cpus)))  # the CPUs Ray reserved for this replica
    context = serve.get_replica_context()
    replica = context.replica_id.unique_id
    engine = build_engine(settings)
    if settings.replica_metrics_port is not None:
        port = settings.replica_metrics_port + context.rank.local_rank
        start_http_server(port, addr=settings.host, registry=engine.metrics.registry)
        log.info("replica %s: engine metrics on port %d", replica, port)
    app = create_app(settings, engine)
    app.add_middleware(NameTheReplica, replica=replica)
    return app


class NameTheReplica:
    """Adds `x-racedit-replica` to every answer and drops the app's X-Request-ID, which Ray's proxy
    sends itself (the app took the same id from the request). Plain ASGI, so streams are untouched."""

    def __init__(self, app: Any, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)


def deployment_options(settings: ServeSettings) -> dict[str, Any]:
    """Ray deployment options that follow from the serving settings (a config file may override them)."""
    gpu = settings.device.startswith("cuda")
    return dict(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_queue + settings.max_batch_rows,
        max_queued_requests=settings.max_queue,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=settings.retry_after_s),
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
        ray_actor_options={"num_gpus": 1 if gpu else 0, "num_cpus": settings.replica_cpus},
    )


def build_application(settings: ServeSettings) -> serve.Application:
    """A bound Ray Serve application of racedit replicas, each serving `settings`."""

    @serve.deployment(name="racedit", **deployment_options(settings))
    @serve.ingress(lambda: _replica_app(settings))
    class Racedit:
        """One racedit engine and its FastAPI app per replica."""

    return Racedit.bind()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run` / RayService entry: `args` are ServeSettings fields (RACEDIT_* variables fill the rest)."""
    return build_application(ServeSettings(**args))


def run(settings: ServeSettings) -> int:
    """`racedit serve --ray`: join RAY_ADDRESS or start a local Ray, serve until SIGTERM/SIGINT, then drain.

    Ray's proxy listens on --host/--port; `serve.shutdown()` lets in-flight requests finish
    (graceful_shutdown_timeout_s = --drain-timeout-s) before the replicas stop.
    """
    import ray

    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    stop = threading.Event()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings), name="racedit", route_prefix="/", blocking=False)
        # Ours last: ray.init and Serve's start-up install handlers of their own.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        log.warning(
            "racedit on Ray Serve: %d replica(s) on http://%s:%d", settings.replicas, settings.host, settings.port
        )
        print(
            f"racedit ready on Ray Serve: http://{settings.host}:{settings.port} ({settings.replicas} replica(s))",
            flush=True,
        )
        while not stop.wait(0.5):  # a timed wait, so the handler runs soon after the signal
            pass
        log.warning("draining replicas (up to %.0f s)", settings.drain_timeout_s)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0

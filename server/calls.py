"""The one path every generating route takes, from decoded bodies to engine requests to results:
`/generate` (one body), `/generate/stream` (one body, with a progress listener) and KServe v2's infer
(one body per row, all under the request's one id). Also the one mapping from engine errors to statuses."""

import asyncio
from collections.abc import Sequence
from typing import Optional

from fastapi import Request

from racedit_client.models import GenerateRequest

from .engine import Engine
from .requests import (
    DeadlineExceeded,
    DuplicateRequest,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    ShuttingDown,
    StepFailed,
)
from .validation import Limits, build_request


def engine_jobs(limits: Limits, bodies: Sequence[GenerateRequest], request_id: str) -> list[GenerationRequest]:
    """Validated bodies as engine requests under the request's one id (errors from the engine name the
    id the client sees)."""
    jobs = [build_request(limits, body) for body in bodies]
    for job in jobs:
        job.request_id = request_id
    return jobs


def engine_error(exc: Exception, retry_after: int) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) for an engine error; one mapping for every route."""
    if isinstance(exc, QueueFull):
        return 429, str(exc), {"Retry-After": str(retry_after)}
    if isinstance(exc, ShuttingDown):
        return 503, str(exc), {"Retry-After": str(retry_after)}
    if isinstance(exc, DeadlineExceeded):
        return 504, str(exc), {}
    if isinstance(exc, StepFailed):
        return 500, str(exc), {}
    if isinstance(exc, DuplicateRequest):
        return 409, str(exc), {}
    return 500, f"internal error: {type(exc).__name__}", {}


async def run_on_engine(
    engine: Engine, jobs: Sequence[GenerationRequest], request: Request
) -> Optional[list[GenerationResult]]:
    """Submit the jobs of one request (under its one id: all or none) and wait for all of them.

    If one fails, or the client disconnects, or this handler is cancelled (a shutdown past its grace), the
    request's other jobs are cancelled so their rows leave at the next step; only this request's id is
    cancelled, which no other request can hold while it is in flight. Returns None when the client is gone.
    """
    futures = [asyncio.wrap_future(f) for f in engine.submit_all(jobs)]  # 409/429/503 here: nothing queued

    async def client_gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(client_gone())
    pending: set[asyncio.Future] = {*futures, watcher}
    try:
        while pending != {watcher}:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                return None
            for future in done:
                if future.exception() is not None:
                    raise future.exception()
        return [future.result() for future in futures]
    finally:
        watcher.cancel()
        if not all(future.done() for future in futures):
            engine.cancel(jobs[0].request_id)  # this request's other jobs: their rows leave at the next step
        for future in futures:  # every outcome consumed (cancelled jobs answer Cancelled)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

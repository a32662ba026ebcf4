"""Calls into the engine shared by every route (the HTTP routes and the KServe v2 routes):
submit and wait with disconnect handling, and one mapping from engine errors to statuses."""
import asyncio
from typing import Optional

from fastapi import Request

from .engine import Engine
from .requests import (DeadlineExceeded, DuplicateRequest, GenerationRequest, GenerationResult, QueueFull,
                       ShuttingDown, StepFailed)


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


async def run_on_engine(engine: Engine, job: GenerationRequest, request: Request) -> Optional[GenerationResult]:
    """Submit and wait; if the client disconnects first, cancel so its rows leave at the next step.

    Returns None when the client is gone (nobody to answer).
    """
    future = asyncio.wrap_future(engine.submit(job))

    async def client_gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if future in done:
        return future.result()
    engine.cancel(job.request_id)
    future.add_done_callback(lambda f: f.exception())  # consumed: the engine answers Cancelled
    return None

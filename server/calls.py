"""Calls into the engine shared by every route (the HTTP routes and the KServe v2 routes):
submit and wait with disconnect handling, and one mapping from engine errors to statuses."""
import asyncio
from typing import Optional, Sequence

from fastapi import Request

from .engine import (DeadlineExceeded, DuplicateRequest, Engine, GenerationRequest, GenerationResult, QueueFull,
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


async def run_on_engine(engine: Engine, jobs: Sequence[GenerationRequest],
                        request: Request) -> Optional[list[GenerationResult]]:
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

"""Sync and async clients. Both share `_Core`: request building, error mapping and retry policy."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import httpx
from PIL import Image

from . import errors
from .models import (
    ExpertUsage,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamRequest,
    Health,
    ModelList,
    PreviewEvent,
    ProgressEvent,
    ResolvedRequest,
    StreamError,
    Timing,
)

RETRY_STATUSES = {429, 503}
NPY_MIME = "application/x-npy"
RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


@dataclass
class GenerateResult:
    """A typed answer of POST /generate, with decoded PIL images (or, for output_format npy,
    NumPy float32 arrays [C, H, W] in `arrays`)."""

    id: str
    model: str
    images: list[Image.Image]
    seeds: list[int]
    expert_usage: ExpertUsage
    timing: Timing
    raw: GenerateResponse
    arrays: list[Any] = field(default_factory=list)
    request: Optional[ResolvedRequest] = None  # what was generated: class resolved, defaults and seed filled in
    replica: Optional[str] = None  # the Ray Serve replica that answered (x-racedit-replica), if any


def _body(model: type[GenerateRequest], **fields: Any) -> dict[str, Any]:
    """A request body checked by the wire model; what is None is left out, so the server's defaults (the
    model family's sampler, steps and guidance scale: GET /v1/models) apply."""
    given = {k: v for k, v in fields.items() if v is not None}
    return model(**given).model_dump(exclude_unset=True)


class _Core:
    def __init__(
        self,
        base_url: str,
        api_key: Optional[str],
        timeout: float,
        max_retries: int,
        max_retry_seconds: float,
        backoff: float,
    ):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.max_retries = timeout, max_retries
        self.max_retry_seconds, self.backoff = max_retry_seconds, backoff

    def retry_delay(self, attempt: int, started: float, response: Optional[httpx.Response]) -> Optional[float]:
        """Seconds to wait before the next try, or None to give up. Honours Retry-After; full jitter."""
        if attempt >= self.max_retries:
            return None
        delay = random.uniform(0, self.backoff * 2**attempt)
        if response is not None:
            header = response.headers.get("retry-after", "")
            if header.replace(".", "", 1).isdigit():
                delay = max(delay, float(header))
        if time.monotonic() - started + delay > self.max_retry_seconds:
            return None
        return delay

    def decide(
        self, attempt: int, started: float, response: Optional[httpx.Response] = None, error: Optional[Exception] = None
    ) -> Union[httpx.Response, float]:
        """The response to return, or seconds to sleep before retrying; raises the typed error on giving up."""
        if response is not None and response.status_code not in RETRY_STATUSES:
            self.raise_for(response)
            return response
        delay = self.retry_delay(attempt, started, response)
        if delay is not None:
            return delay
        if response is not None:
            self.raise_for(response)
        raise errors.ConnectionFailed(f"cannot reach {self.base_url}: {error}") from error

    @staticmethod
    def raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text}
        detail = body.get("detail", body.get("error")) if isinstance(body, dict) else body
        rid = (body.get("request_id") if isinstance(body, dict) else None) or response.headers.get("x-request-id")
        retry_after = response.headers.get("retry-after")
        raise error_for(
            response.status_code,
            detail,
            rid,
            _describe(detail) or response.reason_phrase,
            float(retry_after) if retry_after else None,
        )

    @staticmethod
    def generate_body(
        class_label: Union[int, str],
        cfg_scale: Optional[float],
        num_steps: Optional[int],
        seed: Optional[int],
        num_images: int,
        output_format: str,
        expert_budget: float = 1.0,
        sampler: Optional[str] = None,
    ) -> dict[str, Any]:
        return _body(
            GenerateRequest,
            class_label=class_label,
            cfg_scale=cfg_scale,
            num_steps=num_steps,
            seed=seed,
            num_images=num_images,
            output_format=output_format,
            expert_budget=expert_budget,
            sampler=sampler,
        )

    @staticmethod
    def stream_body(
        class_label: Union[int, str],
        cfg_scale: Optional[float],
        num_steps: Optional[int],
        seed: Optional[int],
        num_images: int,
        output_format: str,
        preview_every: int,
        expert_budget: float,
        sampler: Optional[str] = None,
    ) -> dict[str, Any]:
        return _body(
            GenerateStreamRequest,
            class_label=class_label,
            cfg_scale=cfg_scale,
            num_steps=num_steps,
            seed=seed,
            num_images=num_images,
            output_format=output_format,
            preview_every=preview_every,
            expert_budget=expert_budget,
            sampler=sampler,
        )

    @staticmethod
    def parse_generate(response: httpx.Response) -> GenerateResult:
        return _Core.result_of(
            GenerateResponse.model_validate(response.json()), response.headers.get("x-racedit-replica")
        )

    @staticmethod
    def stream_event(name: str, data: str, response: httpx.Response) -> StreamEvent:
        """A typed event from one server-sent event; an `error` event raises as /generate's answer would."""
        if name == "progress":
            return ProgressEvent.model_validate_json(data)
        if name == "preview":
            raw = PreviewEvent.model_validate_json(data)
            return Preview(step=raw.step, t=raw.t, images=[_decode_image(base64.b64decode(i.data)) for i in raw.images])
        if name == "result":
            return _Core.result_of(
                GenerateResponse.model_validate_json(data), response.headers.get("x-racedit-replica")
            )
        if name == "error":
            raw = StreamError.model_validate_json(data)
            raise error_for(raw.status, raw.detail, raw.request_id, _describe(raw.detail))
        raise errors.ServerError(f"unknown stream event {name!r}", response.status_code, None, data)

    @staticmethod
    def result_of(raw: GenerateResponse, replica: Optional[str]) -> GenerateResult:
        images, arrays = [], []
        for item in raw.images:
            data = base64.b64decode(item.data)
            if item.mime_type == NPY_MIME:
                import numpy as np

                arrays.append(np.load(io.BytesIO(data), allow_pickle=False))
                continue
            images.append(_decode_image(data))
        return GenerateResult(
            id=raw.id,
            model=raw.model,
            images=images,
            seeds=[i.seed for i in raw.images],
            expert_usage=raw.expert_usage,
            timing=raw.timing,
            raw=raw,
            arrays=arrays,
            request=raw.request,
            replica=replica,
        )


@dataclass
class Preview:
    """A stream's `preview` event: the predicted clean sample after `step`, one image per requested image."""

    step: int
    t: float
    images: list[Image.Image]


StreamEvent = Union[ProgressEvent, Preview, GenerateResult]


class _ServerSentEvents:
    """Lines of a text/event-stream -> (event, data) pairs."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> Optional[tuple[str, str]]:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        elif not line and self.data:
            done = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return done
        return None


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


def error_for(
    status: int, detail: Any, request_id: Optional[str], message: str, retry_after: Optional[float] = None
) -> errors.RaceditError:
    """The typed error of an HTTP status (one mapping for answers and stream `error` events)."""
    kind: type[errors.RaceditError]
    if status in (400, 413, 422, 431):
        kind = errors.ValidationError
    elif status in (401, 403):
        kind = errors.AuthError
    elif status == 404:
        kind = errors.NotFound
    elif status in RETRY_STATUSES:
        return errors.Overloaded(message, status, request_id, detail, retry_after=retry_after)
    elif status == 504:
        kind = errors.DeadlineExceeded
    else:
        kind = errors.ServerError
    return kind(message, status, request_id, detail)


def _describe(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}"
            if isinstance(d, dict)
            else str(d)
            for d in detail
        )
    return "" if detail is None else str(detail)


class Client(_Core):
    """Blocking client: `Client("http://host:8000").generate("star", seed=1).images[0].save("star.png")`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: Optional[str] = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        max_retry_seconds: float = 60.0,
        backoff: float = 0.25,
    ):
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_seconds, backoff)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                outcome = self.decide(attempt, started, response=self._http.request(method, path, **kwargs))
            except RETRY_EXCEPTIONS as exc:
                outcome = self.decide(attempt, started, error=exc)
            if isinstance(outcome, httpx.Response):
                return outcome
            time.sleep(outcome)
            attempt += 1

    def generate(
        self,
        class_label: Union[int, str],
        cfg_scale: Optional[float] = None,
        num_steps: Optional[int] = None,
        seed: Optional[int] = None,
        num_images: int = 1,
        output_format: str = "png",
        expert_budget: float = 1.0,
        sampler: Optional[str] = None,
    ) -> GenerateResult:
        body = self.generate_body(
            class_label, cfg_scale, num_steps, seed, num_images, output_format, expert_budget, sampler
        )
        return self.parse_generate(self._request("POST", "/generate", json=body))

    def stream(
        self,
        class_label: Union[int, str],
        cfg_scale: Optional[float] = None,
        num_steps: Optional[int] = None,
        seed: Optional[int] = None,
        num_images: int = 1,
        output_format: str = "png",
        preview_every: int = 0,
        expert_budget: float = 1.0,
        sampler: Optional[str] = None,
    ) -> Iterator[StreamEvent]:
        """POST /generate/stream: a ProgressEvent per step, a Preview every `preview_every` steps, then the
        GenerateResult (byte-identical to generate()'s). Errors raise as generate() raises them."""
        body = self.stream_body(
            class_label, cfg_scale, num_steps, seed, num_images, output_format, preview_every, expert_budget, sampler
        )
        started, attempt = time.monotonic(), 0
        while True:
            try:
                with self._http.stream("POST", "/generate/stream", json=body) as response:
                    if response.status_code == 200:
                        parser = _ServerSentEvents()
                        for line in response.iter_lines():
                            if (event := parser.feed(line)) is not None:
                                yield self.stream_event(*event, response)
                        return
                    response.read()
                    outcome = self.decide(attempt, started, response=response)
            except RETRY_EXCEPTIONS as exc:
                outcome = self.decide(attempt, started, error=exc)
            time.sleep(outcome)
            attempt += 1

    def models(self) -> ModelList:
        return ModelList.model_validate(self._request("GET", "/v1/models").json())

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/healthz").json())

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Core):
    """asyncio client: `async with AsyncClient(url) as c: await c.generate("star")`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: Optional[str] = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        max_retry_seconds: float = 60.0,
        backoff: float = 0.25,
    ):
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_seconds, backoff)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                outcome = self.decide(attempt, started, response=await self._http.request(method, path, **kwargs))
            except RETRY_EXCEPTIONS as exc:
                outcome = self.decide(attempt, started, error=exc)
            if isinstance(outcome, httpx.Response):
                return outcome
            await asyncio.sleep(outcome)
            attempt += 1

    async def generate(
        self,
        class_label: Union[int, str],
        cfg_scale: Optional[float] = None,
        num_steps: Optional[int] = None,
        seed: Optional[int] = None,
        num_images: int = 1,
        output_format: str = "png",
        expert_budget: float = 1.0,
        sampler: Optional[str] = None,
    ) -> GenerateResult:
        body = self.generate_body(
            class_label, cfg_scale, num_steps, seed, num_images, output_format, expert_budget, sampler
        )
        return self.parse_generate(await self._request("POST", "/generate", json=body))

    async def stream(
        self,
        class_label: Union[int, str],
        cfg_scale: Optional[float] = None,
        num_steps: Optional[int] = None,
        seed: Optional[int] = None,
        num_images: int = 1,
        output_format: str = "png",
        preview_every: int = 0,
        expert_budget: float = 1.0,
        sampler: Optional[str] = None,
    ) -> AsyncIterator[StreamEvent]:
        """`async for event in client.stream(...)`: as Client.stream."""
        body = self.stream_body(
            class_label, cfg_scale, num_steps, seed, num_images, output_format, preview_every, expert_budget, sampler
        )
        started, attempt = time.monotonic(), 0
        while True:
            try:
                async with self._http.stream("POST", "/generate/stream", json=body) as response:
                    if response.status_code == 200:
                        parser = _ServerSentEvents()
                        async for line in response.aiter_lines():
                            if (event := parser.feed(line)) is not None:
                                yield self.stream_event(*event, response)
                        return
                    await response.aread()
                    outcome = self.decide(attempt, started, response=response)
            except RETRY_EXCEPTIONS as exc:
                outcome = self.decide(attempt, started, error=exc)
            await asyncio.sleep(outcome)
            attempt += 1

    async def models(self) -> ModelList:
        return ModelList.model_validate((await self._request("GET", "/v1/models")).json())

    async def health(self) -> Health:
        return Health.model_validate((await self._request("GET", "/healthz")).json())

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

"""Guards in front of the routes, cheapest first: the connection (how large and how slow a request head may
be), then the API key, both before any body is read or any header echoed; and the one JSON error shape
that every refusal uses, wherever it is made.

- `GuardedH11Protocol` (uvicorn's h11 protocol, chosen explicitly so the limits hold whether or not
  httptools is installed): h11 buffers at most `--max-header-bytes` of an incomplete head, then the
  connection is answered 431 and closed; a head must be complete within `--read-timeout-s` of the
  connection opening or of the previous answer (slowloris), else 408 and close.
- `RequestId` (ASGI): the request's id, from X-Request-ID (bounded, visible ASCII) or new, on every answer.
- `RequireKey` (ASGI): with `--api-key`, 401 for every path but `OPEN_PATHS` and `OPEN_PREFIXES`, from
  the headers alone.
- `BodyLimit` (ASGI): bodies bounded in size (413) and in time (408).
- `install`: the three in that order, and the exception handlers that give every error answer of the
  routes the same JSON shape and the request id.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Optional

import h11
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .calls import engine_error
from .requests import EngineError
from .settings import ServeSettings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/"})
OPEN_PREFIXES = ("/static/",)  # the playground's own scripts and styles: it loads before it asks for the key
KSERVE_PREFIX = "/v2"
REQUEST_ID_MAX = 128  # characters of a client's X-Request-ID
LINGER_S = 1.0  # after a refusal, how long what the client still sends is read and dropped, so it reads the answer


def error_document(path: str, detail: Any, request_id: Optional[str]) -> dict[str, Any]:
    """The JSON body of every error answer: {"detail", "request_id"} (the SDK's ErrorBody), or on the KServe
    v2 routes {"error", "request_id"}, the key `tritonclient` reads."""
    if path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/"):
        return {"error": detail if isinstance(detail, str) else json.dumps(detail), "request_id": request_id}
    return {"detail": detail, "request_id": request_id}


def error_bytes(document: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[list, bytes]:
    """(headers, body) of a JSON error answer."""
    body = json.dumps(document, separators=(",", ":")).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers], body


async def send_error(
    scope: Scope, send: Send, status: int, detail: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer from an ASGI middleware, before the routes, in the shape the routes use."""
    document = error_document(scope["path"], detail, scope.get("state", {}).get("request_id"))
    head, body = error_bytes(document, headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    """`Authorization: Bearer <key>` on every path but the open ones, checked (in constant time) from the
    headers alone: nothing of the body is read before it, so a malformed or oversized body without the
    key is a 401 too."""

    def __init__(self, app: ASGIApp, key: SecretStr):
        self.app, self.key = app, key.get_secret_value().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token, self.key):
            return await self.app(scope, receive, send)
        await send_error(
            scope,
            send,
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
            [(b"www-authenticate", b"Bearer")],
        )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a bounded request head: at most `h11_max_incomplete_event_size` bytes
    of it are buffered (h11's own limit; answered 431 here, not uvicorn's plain-text 400), and it must
    arrive within `read_timeout_s` of the connection opening or of the previous answer. Set
    `read_timeout_s` on the class (`with_read_timeout`): uvicorn builds a protocol from its config alone."""

    read_timeout_s: float = 10.0

    @classmethod
    def with_read_timeout(cls, seconds: float) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"read_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._refused = False
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered: the rest is dropped unread, never buffered
            return
        super().data_received(data)
        if self._in_flight():  # a whole head arrived: the request runs under its own deadlines now
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if not self._in_flight() and not self.transport.is_closing():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request; 431 when its head outgrew the limit, else 400, both in JSON."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(self.conn.trailing_data[0]) > limit:
            self._refuse(431, f"request head (request line and headers) exceeds {limit} bytes")
        else:
            self._refuse(400, "invalid HTTP request (malformed request line or headers)")

    def _in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._in_flight():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head came
            self._refuse(408, f"request head not complete within {self.read_timeout_s:g} s")
        else:  # nothing came (an idle connection), or the rest of a body already answered: just close
            self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer and close, outside h11's state machine (the connection ends here). The close lingers: what
        the client is still sending is dropped for LINGER_S, so its kernel does not discard our answer on a
        reset before it reads it."""
        self._disarm_head_timer()
        self._refused = True
        request_id = uuid.uuid4().hex
        headers, body = error_bytes(
            {"detail": detail, "request_id": request_id},
            [(b"x-request-id", request_id.encode()), (b"connection", b"close")],
        )
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode() + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        self.logger.info("refused a connection's request with %d: %s", status, detail)
        self.transport.write(head + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


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
        head = (
            len(scope.get("raw_path") or b"")
            + len(scope["query_string"])
            + sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        )
        refusal = (
            (431, f"request head (request line and headers) exceeds {self.max_head_bytes} bytes")
            if head > self.max_head_bytes
            else (431, f"X-Request-ID is longer than {REQUEST_ID_MAX} characters")
            if len(given) > REQUEST_ID_MAX
            else (400, "X-Request-ID must be visible ASCII characters (no spaces)")
            if given and not all(0x21 <= c <= 0x7E for c in given)
            else None
        )
        rid = given.decode("ascii") if given and refusal is None else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        if refusal is not None:
            return await send_error(scope, send_with_id, *refusal)
        await self.app(scope, receive, send_with_id)


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
                raise HTTPException(
                    408, f"request body not received within {self.timeout_s:g} s", headers={"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI, settings: ServeSettings) -> None:
    """The guards (the last added runs first: the request id, then the key from the headers alone, then
    the body limit) and the handlers that answer every error in the JSON shape with the request id."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.read_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(RequestId, max_head_bytes=settings.max_header_bytes)

    def error(request: Request, status: int, detail: Any, headers: Optional[dict] = None) -> JSONResponse:
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

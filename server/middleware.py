"""Guards in front of the routes, cheapest first: the connection (how large and how slow a request head may
be), then the API key, both before any body is read or any header echoed; and the one JSON error shape
that every refusal uses, wherever it is made.

- `GuardedH11Protocol` (uvicorn's h11 protocol, chosen explicitly so the limits hold whether or not
  httptools is installed): h11 buffers at most `--max-header-bytes` of an incomplete head, then the
  connection is answered 431 and closed; a head must be complete within `--read-timeout-s` of the
  connection opening or of the previous answer (slowloris), else 408 and close.
- `RequireKey` (ASGI): with `--api-key`, 401 for every path but `OPEN_PATHS` and `OPEN_PREFIXES`, from
  the headers alone.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from http import HTTPStatus
from typing import Any, Optional, Sequence

import h11
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

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


async def send_error(scope: Scope, send: Send, status: int, detail: Any,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
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
        await send_error(scope, send, 401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                         [(b"www-authenticate", b"Bearer")])


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a bounded request head: at most `h11_max_incomplete_event_size` bytes
    of it are buffered (h11's own limit; answered 431 here, not uvicorn's plain-text 400), and it must
    arrive within `read_timeout_s` of the connection opening or of the previous answer. Set
    `read_timeout_s` on the class (`with_read_timeout`): uvicorn builds a protocol from its config alone."""

    read_timeout_s: float = 10.0

    @classmethod
    def with_read_timeout(cls, seconds: float) -> type["GuardedH11Protocol"]:
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
        headers, body = error_bytes({"detail": detail, "request_id": request_id},
                                    [(b"x-request-id", request_id.encode()), (b"connection", b"close")])
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode() + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers)
        self.logger.info("refused a connection's request with %d: %s", status, detail)
        self.transport.write(head + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

"""Typed errors carrying the server's message, status and request id."""

from __future__ import annotations

from typing import Any, Optional


class RaceditError(Exception):
    def __init__(
        self, message: str, status: Optional[int] = None, request_id: Optional[str] = None, detail: Any = None
    ):
        super().__init__(message if request_id is None else f"{message} (request id {request_id})")
        self.message, self.status, self.request_id, self.detail = message, status, request_id, detail


class ValidationError(RaceditError):
    """The request was invalid (422/400/413): fix it, do not retry."""


class AuthError(RaceditError):
    """Missing or wrong API key (401/403)."""


class NotFound(RaceditError):
    """Unknown route or model (404)."""


class Overloaded(RaceditError):
    """The server was busy or draining (429/503) and retries ran out."""

    def __init__(self, *args: Any, retry_after: Optional[float] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class DeadlineExceeded(RaceditError):
    """The server did not finish the request before its deadline (504)."""


class ServerError(RaceditError):
    """The server failed while handling the request (5xx)."""


class ConnectionFailed(RaceditError):
    """The server could not be reached and retries ran out."""

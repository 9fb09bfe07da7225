"""The one shape of every error body the service writes: `{"error": <message>, "status": <code>}`.

Handlers answer errors through Tornado's `write_error`, the connection cap answers its 503 before
any handler exists (service/http/server.py): both build the body here, so a client parses one shape.
This module is a leaf: it imports nothing from the service.
"""

from __future__ import annotations

import http

import orjson
from tornado.web import HTTPError


class ApiError(HTTPError):
    """An error whose message is safe to show the client (HTTPError's log_message is not)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.message = message


def error_json(status: int, exc: BaseException | None = None, message: str | None = None) -> bytes:
    """The body for `status`: an ApiError's own message, else `message`, else the status phrase."""
    if isinstance(exc, ApiError):
        message = exc.message
    if message is None:
        try:
            message = http.HTTPStatus(status).phrase
        except ValueError:
            message = "Error"
    return orjson.dumps({"error": message, "status": status})

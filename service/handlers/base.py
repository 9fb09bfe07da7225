"""What every HTTP handler shares: JSON bodies, JSON errors, worker identity, in-flight tracking.

Built on Tornado's documented hooks (`prepare`, `on_finish`, `write_error`,
`set_default_headers`) rather than on anything private, so an upgrade of Tornado keeps working.
"""

from __future__ import annotations

import http
from typing import TYPE_CHECKING, Any, cast

import orjson
from tornado.web import HTTPError, RequestHandler

if TYPE_CHECKING:
    from service.app import ServiceApp


class ApiError(HTTPError):
    """An error whose message is safe to show the client (HTTPError's log_message is not)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.message = message


def error_body(status_code: int, exc_info: Any = None) -> dict[str, Any]:
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, ApiError):
        message = exc.message
    else:
        try:
            message = http.HTTPStatus(status_code).phrase
        except ValueError:
            message = "Error"
    return {"error": message, "status": status_code}


class ServiceMixin:
    """Identity headers and JSON errors, for HTTP handlers and WebSocket handlers alike."""

    application: Any

    @property
    def app(self) -> ServiceApp:
        return cast("ServiceApp", self.application)

    def set_default_headers(self) -> None:
        handler = cast(RequestHandler, self)
        handler.clear_header("Server")
        state = self.app.state
        handler.set_header("X-Worker-Id", str(state.worker_id))
        handler.set_header("X-Worker-PID", str(state.pid))

    def compute_etag(self) -> str | None:
        """No ETag: hashing every body costs more than these small, changing answers gain."""
        return None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """ApiErrors are the client's mistake and already in the access line; log the rest."""
        if not isinstance(value, ApiError):
            RequestHandler.log_exception(cast(RequestHandler, self), typ, value, tb)

    def write_json(self, body: Any, status: int = 200) -> None:
        handler = cast(RequestHandler, self)
        handler.set_status(status)
        handler.set_header("Content-Type", "application/json")
        handler.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is a small JSON body; no traceback ever reaches a client."""
        handler = cast(RequestHandler, self)
        handler.set_header("Content-Type", "application/json")
        handler.finish(orjson.dumps(error_body(status_code, kwargs.get("exc_info"))))


class BaseHandler(ServiceMixin, RequestHandler):
    """An HTTP handler counted as in flight from `prepare` to `on_finish` (what the drain waits for)."""

    _counted = False

    def prepare(self) -> None:
        self.app.state.request_started()
        self._counted = True

    def on_finish(self) -> None:
        if self._counted:
            self._counted = False
            self.app.state.request_finished()

    def int_arg(self, name: str, low: int, high: int, default: int | None = None) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            if default is None:
                raise ApiError(400, f"query parameter '{name}' is required ({low}..{high})")
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ApiError(400, f"query parameter '{name}' must be an integer from {low} to {high}")
        return value

    def seconds_arg(self, name: str, low: float, high: float, default: float) -> float:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails this too
            raise ApiError(400, f"query parameter '{name}' must be seconds from {low:g} to {high:g}")
        return value


class NotFoundHandler(BaseHandler):
    """Every unknown path, every method: a JSON 404 (and one shared route label for metrics)."""

    def prepare(self) -> None:
        raise ApiError(404, f"no route for {self.request.path}")

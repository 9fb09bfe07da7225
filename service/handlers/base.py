"""What every handler shares: route label, request id, JSON bodies and errors, in-flight tracking.

Built on Tornado's documented hooks (`initialize`, `prepare`, `on_finish`, `write_error`,
`set_default_headers`, `log_exception`, `compute_etag`) rather than on anything private, so an
upgrade of Tornado keeps working.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
import structlog
from tornado.escape import utf8
from tornado.web import HTTPError, RequestHandler

from service import logs, requestid
from service.context import SETTING, WorkerContext
from service.errors import ApiError, error_json

_log = logs.get_logger("service.handlers")


class ServiceHandler(RequestHandler):
    """Identity headers, request ids and JSON errors, for HTTP and WebSocket handlers alike."""

    route = "not_found"
    request_id = ""
    response_bytes = 0

    def initialize(self, route: str = "not_found") -> None:
        self.route = route

    @property
    def worker(self) -> WorkerContext:
        """This worker's state, tick bus and metrics renderer (see service.context)."""
        return cast(WorkerContext, self.application.settings[SETTING])

    def set_default_headers(self) -> None:
        """Runs when the handler is made (and again if an error resets the response)."""
        if not self.request_id:
            self.request_id = requestid.choose(self.request.headers.get(requestid.HEADER, ""))
        self.clear_header("Server")
        state = self.worker.state
        self.set_header("X-Worker-Id", state.worker_id_header)
        self.set_header("X-Worker-PID", state.pid_header)
        self.set_header(requestid.HEADER, self.request_id)

    def prepare(self) -> None:
        """Every log line written while handling this request carries its id."""
        structlog.contextvars.bind_contextvars(request_id=self.request_id)

    def compute_etag(self) -> str | None:
        """No ETag: hashing every body costs more than these small, changing answers gain."""
        return None

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """One JSON line with the traceback, for a bug; none for an HTTPError (the access line has it).

        Tornado's own version logs `repr(request)`, headers and all (cookies, tokens): not here.
        """
        if isinstance(value, HTTPError):
            return
        _log.error(
            "uncaught exception", method=self.request.method, path=self.request.path,
            handler=self.route, request_id=self.request_id, exc_info=(typ, value, tb),
        )

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Any:
        """Counts the body's bytes for the access log (every handler here answers through finish)."""
        if isinstance(chunk, str | bytes):
            self.response_bytes += len(utf8(chunk))
        return super().finish(chunk)

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is a small JSON body; no traceback ever reaches a client."""
        self.set_header("Content-Type", "application/json")
        exc_info = kwargs.get("exc_info")
        self.finish(error_json(status_code, exc_info[1] if exc_info else None))


class BaseHandler(ServiceHandler):
    """An HTTP handler counted as in flight from `prepare` to `on_finish` (what the drain waits for)."""

    _counted = False

    def prepare(self) -> None:
        super().prepare()
        self.worker.state.request_started()
        self._counted = True

    def on_finish(self) -> None:
        if self._counted:
            self._counted = False
            self.worker.state.request_finished()

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

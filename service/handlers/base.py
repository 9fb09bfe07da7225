"""What every handler shares: route label, request id, JSON bodies and errors, in-flight tracking.

Built on Tornado's documented hooks (`initialize`, `prepare`, `on_finish`, `write_error`,
`log_exception`, `compute_etag`, `check_etag_header`) rather than on anything private, so an
upgrade of Tornado keeps working; with one exception, `clear`, below, which sets two private
attributes because nothing public can reset a response (tests/test_contracts.py pins what
Tornado's own `clear` does, tests/test_endpoints.py the headers every response carries, and
constraints.txt pins Tornado).
"""

from __future__ import annotations

import time
from typing import Any, cast

import orjson
from tornado.escape import utf8
from tornado.httputil import HTTPHeaders, format_timestamp
from tornado.web import HTTPError, RequestHandler

from service.http import requestid
from service.http.context import SETTING, WorkerContext
from service.http.errors import ApiError, error_json
from service.telemetry import logs

_log = logs.get_logger("service.handlers")
_date = [-1, ""]  # [second, its HTTP date]: the Date header changes once a second, not per response


def http_date() -> str:
    """The Date header for now (RFC 9110's IMF-fixdate), formatted once per second."""
    now = int(time.time())
    if now != _date[0]:
        _date[1] = format_timestamp(now)
        _date[0] = now
    return cast(str, _date[1])


class ServiceHandler(RequestHandler):
    """Identity headers, request ids and JSON errors, for HTTP and WebSocket handlers alike."""

    route = "not_found"
    request_id = ""
    response_bytes = 0

    def initialize(self, route: str = "not_found") -> None:
        self.route = route

    @property
    def worker(self) -> WorkerContext:
        """This worker's state, tick bus and metrics renderer (see service.http.context)."""
        return cast(WorkerContext, self.application.settings[SETTING])

    def clear(self) -> None:
        """Tornado's `RequestHandler.clear` with this service's headers: runs when the handler is made,
        and again when an error resets the response.

        Tornado's own builds a Date string (email.utils.formatdate) and a `Server: TornadoServer/x`
        banner for every response, then `set_default_headers` would remove the banner and set
        four more headers, each through `set_header`'s validation: a few percent of a small
        request. Here the Date is made once a second (`http_date`), no Server header is made
        at all (no version banner for anyone probing), and the identity headers, whose values
        are the worker's own and a request id already checked by `requestid`, are set directly.
        Tornado's version also sets `_write_buffer` and the status, as this does (the contract
        test fails if an upgrade makes it set anything else); `set_default_headers` is still
        called, as Tornado does, for any subclass that uses it.
        """
        if not self.request_id:  # get_list: no KeyError raised when the header is absent
            self.request_id = requestid.from_headers(self.request.headers.get_list(requestid.HEADER))
        state = self.worker.state
        headers = HTTPHeaders()
        headers["Content-Type"] = "text/html; charset=UTF-8"  # Tornado's default, as in its clear()
        headers["Date"] = http_date()
        headers["X-Worker-Id"] = state.worker_id_header
        headers["X-Worker-Pid"] = state.pid_header
        headers["X-Request-Id"] = self.request_id
        self._headers = headers
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self.set_status(200)

    def prepare(self) -> None:
        """Every log line written while handling this request carries its id."""
        logs.bind_request(self.request_id)

    def compute_etag(self) -> str | None:
        """No ETag: hashing every body costs more than these small, changing answers gain."""
        return None

    def check_etag_header(self) -> bool:
        """With no ETag there is nothing for an If-None-Match to match: skip Tornado's regex over it."""
        return False

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
        if chunk.__class__ is bytes:  # the usual case, without utf8() or isinstance() against a union
            self.response_bytes += len(chunk)
        elif isinstance(chunk, str | bytes):
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

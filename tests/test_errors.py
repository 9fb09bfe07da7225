"""A bug in a handler: the client gets a JSON 500 without the traceback; the log gets it, as JSON.

No endpoint of the service fails on purpose, so this one test serves the application in-process
with one extra route added through Tornado's public `add_handlers`.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from service.app import ServiceApp
from service.config import Settings
from service.handlers.base import BaseHandler
from service.http.context import WorkerContext
from service.http.state import WorkerState
from service.telemetry import logs, metrics
from service.ws.ticker import Ticker


class Boom(BaseHandler):
    def get(self) -> None:
        raise RuntimeError("kaboom: secret-value-in-exception")


async def _fetch_boom() -> HTTPResponse:
    app = ServiceApp(Settings(), WorkerContext(WorkerState(0), Ticker(1.0, 0), metrics.renderer(None)))
    app.add_handlers(r".*", [(r"/boom", Boom, {"route": "boom"})])
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    try:
        return await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/boom", raise_error=False,
            headers={"X-Request-ID": "boom-1", "Authorization": "Bearer do-not-log-me"},
        )
    finally:
        server.stop()


def test_uncaught_exception_is_a_json_500_and_one_json_log_line(capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    response = asyncio.run(_fetch_boom())
    assert response.code == 500
    assert json.loads(response.body) == {"error": "Internal Server Error", "status": 500}
    assert b"kaboom" not in response.body and b"Traceback" not in response.body

    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.strip()]
    [error] = [e for e in lines if e["event"] == "uncaught exception"]
    assert error["level"] == "error" and error["request_id"] == "boom-1" and error["handler"] == "boom"
    [exc] = error["exception"]
    assert exc["exc_type"] == "RuntimeError" and "kaboom" in exc["exc_value"]
    assert any(frame["name"] == "get" for frame in exc["frames"])
    assert "do-not-log-me" not in json.dumps(lines)
    [access] = [e for e in lines if e["event"] == "request"]
    assert access["status"] == 500 and access["request_id"] == "boom-1"

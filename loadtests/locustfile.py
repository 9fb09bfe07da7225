"""Locust scenarios: an HTTP user and a WebSocket ticker user, for people who drive load from Python.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless -u 20 -r 10 -t 30s \
        --csv out/locust --html out/locust.html
    locust -f loadtests/locustfile.py --master --headless --expect-workers 2 ...   # and twice:
    locust -f loadtests/locustfile.py --worker --master-host 127.0.0.1

`make load SCENARIO=locust` runs it through `python -m loadtests.run` (headless, CSV and HTML in
the report folder, `LOCUST_WORKERS=2` for master and workers). Users split between the classes
by weight (`LOCUST_HTTP_WEIGHT`, `LOCUST_WS_WEIGHT`, 1 and 1 by default).

- `ApiUser` (geventhttpclient): GET /api/hello, and one time in `LOCUST_SLEEP_EVERY` (4) GET
  /api/sleep?ms=`LOCUST_SLEEP_MS` (100); `LOCUST_WAIT` seconds between requests (0.1).
- `TickerUser` (websocket-client, cooperative under Locust's gevent): opens `WS_PATH`
  (/ws/ticker) once and reads ticks until the test ends. Reported as Locust request events of
  type `WS`: `connect` (the handshake time; a failure when it fails), `tick` (response time =
  the tick's fan-out latency, receive time - its `ts`), `close` (a failure: the server or the
  network closed the socket; the user reconnects on its next turn).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import websocket
from locust import FastHttpUser, User, constant, task
from locust.env import Environment


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


SLEEP_MS = int(_env_float("LOCUST_SLEEP_MS", 100))
SLEEP_EVERY = max(1, int(_env_float("LOCUST_SLEEP_EVERY", 4)))
WAIT = _env_float("LOCUST_WAIT", 0.1)
WS_PATH = os.environ.get("WS_PATH", "/ws/ticker")
RECV_TIMEOUT = 1.0  # seconds a read waits before the task yields its turn (a tick is every second)


def ws_url(host: str, path: str) -> str:
    base = host.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[len("http"):]
    return base + path


class ApiUser(FastHttpUser):
    weight = int(_env_float("LOCUST_HTTP_WEIGHT", 1))
    wait_time = constant(WAIT)
    turns = 0

    @task
    def api(self) -> None:
        self.turns += 1
        if self.turns % SLEEP_EVERY == 0:
            self.client.get(f"/api/sleep?ms={SLEEP_MS}", name="/api/sleep")
        else:
            self.client.get("/api/hello", name="/api/hello")


class TickerUser(User):
    weight = int(_env_float("LOCUST_WS_WEIGHT", 1))
    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.ws: websocket.WebSocket | None = None

    def _fire(self, name: str, started: float, response_time: float, length: int = 0,
              exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, start_time=started, response_time=response_time,
            response_length=length, exception=exception, context={},
        )

    def _connect(self) -> None:
        started = time.time()
        try:
            # With an Origin, as a browser sends it: Nginx passes the Host with its port, so
            # Tornado's same-origin check passes through it as well as directly.
            self.ws = websocket.create_connection(ws_url(self.host or "", WS_PATH), timeout=10)
        except Exception as exc:  # any failure to open is one failed `connect`
            self.ws = None
            self._fire("connect", started, (time.time() - started) * 1000, exception=exc)
            time.sleep(1)  # not a tight loop of failures
            return
        self.ws.settimeout(RECV_TIMEOUT)
        self._fire("connect", started, (time.time() - started) * 1000)

    def on_start(self) -> None:
        self._connect()

    def on_stop(self) -> None:
        if self.ws is not None:
            ws, self.ws = self.ws, None
            ws.close()

    @task
    def listen(self) -> None:
        if self.ws is None:
            self._connect()
            return
        try:
            message = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        except Exception as exc:  # closed by the server or the network: a failure
            self.ws = None
            self._fire("close", time.time(), 0, exception=exc)
            return
        received = time.time()
        try:
            tick: Any = json.loads(message)
        except (TypeError, ValueError):
            return
        if not isinstance(tick, dict) or tick.get("type") != "tick":
            return
        if not isinstance(tick.get("ts"), int | float):
            return
        self._fire("tick", received, max(0.0, (received - tick["ts"]) * 1000), len(message))


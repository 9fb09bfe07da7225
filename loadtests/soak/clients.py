"""The churn's clients: WebSockets that open, hold and close (or drop), keep-alive and one-shot HTTP
clients over the service's request mix, long polls, a publisher and aborters, all sharing one
tally of what went right and what failed (`Clients`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtests.soak.common import IDEMPOTENT
from loadtests.soak.wire import (
    TEXT,
    WIRE_ERRORS,
    HttpConnection,
    ProtocolError,
    Refused,
    WebSocket,
    abort_connection,
    request_bytes,
)


@dataclass
class Failure:
    t: float  # seconds since the churn began
    kind: str  # the client that saw it (ws_ticker, http_keepalive, ...)
    what: str  # the request or socket
    error: str
    pid: int | None  # the worker it was talking to, when known
    cause: str = "unexpected"  # or "worker kill": decided once the run is over (attribute_failures)


SLEEPS_MS = (0, 0, 10, 50, 100, 250)
# weight, method, target (from a random source), statuses expected: the HTTP clients' mix
MIX: tuple[tuple[int, str, Callable[[random.Random], str], frozenset[int]], ...] = (
    (30, "GET", lambda _: "/api/hello", frozenset({200})),
    (20, "GET", lambda r: f"/api/sleep?ms={r.choice(SLEEPS_MS)}", frozenset({200})),
    (10, "GET", lambda _: "/", frozenset({200})),
    (10, "GET", lambda _: "/healthz", frozenset({200})),
    (5, "GET", lambda _: "/readyz", frozenset({200})),
    (10, "GET", lambda r: f"/api/poll?timeout={r.choice(('0', '0.2', '0.6'))}", frozenset({200, 204})),
    (10, "GET", lambda r: f"/api/poll?room=soak-{r.randrange(4)}&timeout=0.3", frozenset({200, 204})),
    (3, "GET", lambda r: f"/no/such/{r.randrange(10_000)}", frozenset({404})),
    (2, "GET", lambda _: "/api/sleep?ms=soon", frozenset({400})),
)
ROOMS = 4


class Clients:
    """Every client of the churn, sharing one tally; `stopping` ends them at their next step."""

    def __init__(self, port: int, args: argparse.Namespace, started: float) -> None:
        self.port = port
        self.args = args
        self.started = started  # loop time of the churn's start
        self.rng = random.Random(args.seed)
        self.stopping = asyncio.Event()
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: list[Failure] = []
        self.service_5xx = 0  # answers with 5xx carrying X-Worker-Id: the service's own
        self.proxy_5xx = 0  # 5xx without it: Nginx's
        self.seq = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.started

    def fail(self, kind: str, what: str, error: str, pid: int | None) -> None:
        self.counts[kind]["failed"] += 1
        self.failures.append(Failure(round(self.now(), 2), kind, what, error, pid))

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # -- HTTP ---------------------------------------------------------------------------------
    def pick(self) -> tuple[str, str, frozenset[int]]:
        rng = self.rng
        pick = rng.uniform(0, sum(w for w, *_ in MIX))
        for weight, method, target, expected in MIX:
            pick -= weight
            if pick <= 0:
                return method, target(rng), expected
        return MIX[0][1], MIX[0][2](rng), MIX[0][3]

    async def http(
        self,
        kind: str,
        conn: HttpConnection,
        method: str,
        target: str,
        expected: frozenset[int],
        body: bytes = b"",
        close: bool = False,
    ) -> None:
        """One request; a reused connection that the server had closed is retried once, idempotent only
        (what every HTTP client does, RFC 9112 section 9.3.1)."""
        what = f"{method} {target.split('?')[0]}"
        for attempt in (1, 2):
            reused = conn.reused
            try:
                response = await asyncio.wait_for(conn.request(method, target, body, close), 20)
            except WIRE_ERRORS as exc:
                # Through Nginx a client connection is no worker's: only directly does it name one.
                pid = conn.pid if self.args.direct else None
                conn.abort()
                if (
                    attempt == 1
                    and reused
                    and not conn.answered
                    and method in IDEMPOTENT
                    and not isinstance(exc, TimeoutError)
                ):
                    self.counts[kind]["retried"] += 1
                    continue
                self.fail(kind, what, type(exc).__name__, pid)
                return
            if response.status >= 500:
                if "x-worker-id" in response.headers:
                    self.service_5xx += 1
                else:
                    self.proxy_5xx += 1
            if response.status in expected:
                self.counts[kind]["ok"] += 1
            else:
                self.fail(kind, what, f"status {response.status}", response.pid)
            return

    async def keepalive_client(self) -> None:
        conn = HttpConnection(self.port)
        budget = self.rng.randint(20, 300)
        try:
            while not self.stopping.is_set():
                method, target, expected = self.pick()
                await self.http("http_keepalive", conn, method, target, expected)
                if conn.used >= budget:
                    await conn.close()
                    budget = self.rng.randint(20, 300)
                await self.pause(self.rng.uniform(0, self.args.think))
        finally:
            await conn.close()

    async def fresh_client(self) -> None:
        while not self.stopping.is_set():
            method, target, expected = self.pick()
            await self.http("http_new", HttpConnection(self.port), method, target, expected, close=True)
            await self.pause(self.rng.uniform(0, self.args.think * 2))

    async def poller(self) -> None:
        conn = HttpConnection(self.port)
        try:
            while not self.stopping.is_set():
                timeout = self.rng.choice(("1", "2", "3"))
                room = f"room=soak-{self.rng.randrange(ROOMS)}&" if self.rng.random() < 0.3 else ""
                await self.http(
                    "long_poll", conn, "GET", f"/api/poll?{room}timeout={timeout}", frozenset({200, 204})
                )
        finally:
            await conn.close()

    async def publisher(self) -> None:
        conn = HttpConnection(self.port)
        period = 1.0 / self.args.publish_rate
        try:
            while not self.stopping.is_set():
                self.seq += 1
                body = json.dumps({"data": f"soak publish {self.seq}"}).encode()
                await self.http(
                    "publish",
                    conn,
                    "POST",
                    f"/api/publish?room=soak-{self.seq % ROOMS}",
                    frozenset({202}),
                    body=body,
                )
                await self.pause(period)
        finally:
            await conn.close()

    async def aborter(self) -> None:
        """Requests the client gives up on mid-way: never a failure, unless the connect itself fails."""
        rng = self.rng
        ways = ("sleep", "poll", "half head", "half body", "ws upgrade")
        while not self.stopping.is_set():
            way = rng.choice(ways)
            rst = rng.random() < 0.5
            writer: asyncio.StreamWriter | None = None
            try:
                _, opened = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                writer = opened
                if way == "sleep":
                    opened.write(request_bytes("GET", "/api/sleep?ms=2000", self.port))
                elif way == "poll":
                    opened.write(request_bytes("GET", "/api/poll?timeout=20", self.port))
                elif way == "half head":
                    whole = request_bytes("GET", "/api/hello", self.port)
                    opened.write(whole[: len(whole) // 2])
                elif way == "half body":
                    body = json.dumps({"data": "x" * 64}).encode()
                    whole = request_bytes("POST", "/api/publish?room=soak-0", self.port, body)
                    opened.write(whole[: len(whole) - len(body) // 2])
                else:
                    key = base64.b64encode(os.urandom(16)).decode()
                    opened.write(
                        request_bytes(
                            "GET",
                            "/ws/ticker",
                            self.port,
                            extra=(
                                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                "Sec-WebSocket-Version: 13\r\n"
                            ),
                        )
                    )
                await opened.drain()
                await asyncio.sleep(rng.uniform(0.05, 0.8))
                self.counts["abort"]["aborted"] += 1
            except (OSError, TimeoutError) as exc:
                self.fail("abort", f"connect for {way}", type(exc).__name__, None)
            finally:
                abort_connection(writer, rst)
            await self.pause(rng.uniform(0.05, 0.3))

    # -- WebSockets ---------------------------------------------------------------------------
    async def websocket_seat(self, seat: int) -> None:
        rng = self.rng
        turn = 0
        while not self.stopping.is_set():
            turn += 1
            chat = rng.random() < 0.3
            path = f"/ws/chat?room=soak-{rng.randrange(ROOMS)}" if chat else "/ws/ticker"
            await self.websocket(
                "ws_chat" if chat else "ws_ticker",
                path,
                rng.uniform(1.5, 5.0),
                abort=rng.random() < 0.2,
                token=f"soak<{seat}.{turn}>" if chat else "",  # delimited: no token is part of another
            )
            await self.pause(rng.uniform(0, 0.2))

    async def websocket(self, kind: str, path: str, hold: float, abort: bool, token: str) -> None:
        what = path.split("?")[0]
        try:
            ws = await asyncio.wait_for(WebSocket.connect(self.port, path), 10)
        except Refused as exc:
            self.fail(kind, what, f"upgrade answered {exc.status}", exc.pid)
            return
        except WIRE_ERRORS as exc:
            self.fail(kind, what, f"upgrade: {type(exc).__name__}", None)
            return
        opened = self.now()
        pump = asyncio.ensure_future(ws.pump())
        try:
            if token:
                ws.token = token.encode()
                ws.send(TEXT, ws.token)
            stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
            waiting: list[asyncio.Future[Any]] = [pump, stop]
            await asyncio.wait(waiting, timeout=hold, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            held = self.now() - opened
            if pump.done():  # the server closed it, or the connection broke, before the client did
                error = pump.exception()
                self.fail(
                    kind,
                    what,
                    f"lost: {type(error).__name__}" if error else f"server closed it ({ws.close_code})",
                    ws.pid,
                )
                ws.abort()
                return
            if kind == "ws_ticker" and held >= 2 * self.args.tick_interval + 0.5 and not ws.ticks:
                self.fail(kind, what, f"no tick in {held:.1f} s", ws.pid)
            elif kind == "ws_chat" and held >= 1.5 and not ws.echoed:
                self.fail(kind, what, f"own message not back in {held:.1f} s", ws.pid)
            if abort:
                ws.abort(rst=self.rng.random() < 0.5)
                self.counts[kind]["aborted"] += 1
                return
            ws.start_close(1000)
            try:
                await asyncio.wait_for(pump, 10)
            except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError) as exc:
                self.fail(kind, what, f"closing: {type(exc).__name__}", ws.pid)
                ws.abort()
                return
            if ws.close_code != 1000:
                self.fail(kind, what, f"close answered {ws.close_code}", ws.pid)
            else:
                self.counts[kind]["ok"] += 1
            await ws.finish()
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if not ws.writer.is_closing():
                ws.abort()

    def tasks(self) -> list[asyncio.Task[None]]:
        a = self.args
        coros: list[Any] = [self.websocket_seat(i) for i in range(a.ws)]
        coros += [self.keepalive_client() for _ in range(a.keepalive)]
        coros += [self.fresh_client() for _ in range(a.fresh)]
        coros += [self.poller() for _ in range(a.pollers)]
        coros += [self.aborter() for _ in range(a.aborters)]
        if a.publish_rate > 0:
            coros.append(self.publisher())
        return [asyncio.ensure_future(c) for c in coros]

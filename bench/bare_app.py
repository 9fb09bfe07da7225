"""The baseline: Tornado's quick-start handlers, pre-forked the same way, with nothing else.

No metrics, no access log, no request ids; same event loop (uvloop) and the same pre-fork
machinery as the service, so a side-by-side run measures only what the instrumentation costs.
It is also the "bare Tornado" contestant of the shootout (loadtests/shootout.py), so it speaks
the peers' protocol: `/api/sleep?ms=N` (non-blocking) and a `/ws/ticker` broadcast every
TICK_INTERVAL seconds. `--port`/`--workers` default to PORT/WORKERS from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

import uvloop
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets
from tornado.process import fork_processes, task_id
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketClosedError, WebSocketHandler


class MainHandler(RequestHandler):
    def get(self) -> None:
        self.write("Hello, world")


class ApiHelloHandler(RequestHandler):
    def get(self) -> None:
        self.write({"message": "hello world"})


class ApiSleepHandler(RequestHandler):
    async def get(self) -> None:
        ms = int(self.get_argument("ms", "0"))
        await asyncio.sleep(ms / 1000)
        self.write({"slept_ms": ms})


CLIENTS: set[TickerSocket] = set()


class TickerSocket(WebSocketHandler):
    def open(self) -> None:
        CLIENTS.add(self)

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        CLIENTS.discard(self)


class Ticker:
    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.seq = 0

    def tick(self) -> None:
        self.seq += 1
        message = json.dumps({"type": "tick", "seq": self.seq, "ts": time.time(), "worker": self.worker})
        for client in list(CLIENTS):
            try:
                client.write_message(message)
            except WebSocketClosedError:
                CLIENTS.discard(client)


async def serve(sockets: list[socket.socket], tick_interval: float) -> None:
    app = Application(
        [(r"/", MainHandler), (r"/api/hello", ApiHelloHandler), (r"/api/sleep", ApiSleepHandler),
         (r"/ws/ticker", TickerSocket)],
        log_function=lambda _: None,
    )
    HTTPServer(app).add_sockets(sockets)
    PeriodicCallback(Ticker(task_id() or 0).tick, tick_interval * 1000).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=os.environ.get("PORT"), required="PORT" not in os.environ)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--tick-interval", type=float, default=float(os.environ.get("TICK_INTERVAL", "1.0")))
    args = parser.parse_args()
    sockets = bind_sockets(args.port, args.host, backlog=2048)
    fork_processes(args.workers, max_restarts=0)
    uvloop.run(serve(sockets, args.tick_interval))


if __name__ == "__main__":
    main()

"""The baseline: Tornado's quick-start handlers, pre-forked the same way, with nothing else.

No metrics, no access log, no request ids; same event loop (uvloop) and the same pre-fork
machinery as the service, so a side-by-side run measures only what the instrumentation costs.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.process import fork_processes
from tornado.web import Application, RequestHandler


class MainHandler(RequestHandler):
    def get(self) -> None:
        self.write("Hello, world")


class ApiHelloHandler(RequestHandler):
    def get(self) -> None:
        self.write({"message": "hello world"})


async def serve(sockets: list) -> None:  # type: ignore[type-arg]
    app = Application([(r"/", MainHandler), (r"/api/hello", ApiHelloHandler)], log_function=lambda _: None)
    HTTPServer(app).add_sockets(sockets)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sockets = bind_sockets(args.port, "127.0.0.1")
    fork_processes(args.workers, max_restarts=0)
    uvloop.run(serve(sockets))


if __name__ == "__main__":
    main()

"""aiohttp peer of the shootout (loadtests/shootout.py): the idiomatic aiohttp hello and broadcast.

Run as aiohttp documents a pre-forked deployment, under gunicorn with its uvloop worker:

    gunicorn --chdir loadtests/peers -k aiohttp.GunicornUVLoopWebWorker -w WORKERS -b HOST:PORT \
        aiohttp_app:app

`/ws/ticker` sends every client a tick every TICK_INTERVAL seconds (environment, default 1.0);
`/api/hello` and `/api/sleep?ms=N` (non-blocking) answer JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web
from ticks import tick_messages

TICK_INTERVAL = float(os.environ.get("TICK_INTERVAL", "1.0"))
CLIENTS = web.AppKey("clients", set[web.WebSocketResponse])


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"message": "hello world"})


async def sleep(request: web.Request) -> web.Response:
    ms = int(request.query.get("ms", "0"))
    await asyncio.sleep(ms / 1000)
    return web.json_response({"slept_ms": ms})


async def ticker_socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    clients = request.app[CLIENTS]
    clients.add(ws)
    try:
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
    finally:
        clients.discard(ws)
    return ws


async def tick(app: web.Application) -> None:
    clients = app[CLIENTS]
    async for message in tick_messages(TICK_INTERVAL):
        for ws in list(clients):
            with contextlib.suppress(ConnectionError):
                await ws.send_str(message)


async def ticker(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(tick(app))
    yield
    task.cancel()


app = web.Application()
app[CLIENTS] = set()
app.cleanup_ctx.append(ticker)
app.router.add_get("/api/hello", hello)
app.router.add_get("/api/sleep", sleep)
app.router.add_get("/ws/ticker", ticker_socket)

if __name__ == "__main__":
    web.run_app(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ["PORT"]), access_log=None)

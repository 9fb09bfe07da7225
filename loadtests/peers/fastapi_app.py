"""FastAPI peer of the shootout (loadtests/shootout.py), run the way FastAPI's deployment docs
describe a pre-forked server: gunicorn managing uvicorn workers (uvicorn picks uvloop and httptools).

    gunicorn --chdir loadtests/peers -k uvicorn_worker.UvicornWorker -w WORKERS -b HOST:PORT fastapi_app:app

`/api/hello`, `/api/sleep?ms=N` (async, non-blocking) and `/ws/ticker` (a tick every
TICK_INTERVAL seconds, environment, default 1.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from ticks import tick_messages

TICK_INTERVAL = float(os.environ.get("TICK_INTERVAL", "1.0"))
clients: set[WebSocket] = set()


async def tick() -> None:
    async for message in tick_messages(TICK_INTERVAL):
        for websocket in list(clients):
            with contextlib.suppress(Exception):
                await websocket.send_text(message)


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(tick())
    yield
    task.cancel()


app = FastAPI(lifespan=lifespan)


@app.get("/api/hello")
async def hello() -> dict[str, str]:
    return {"message": "hello world"}


@app.get("/api/sleep")
async def sleep(ms: int = 0) -> dict[str, int]:
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}


@app.websocket("/ws/ticker")
async def ticker(websocket: WebSocket) -> None:
    await websocket.accept()
    clients.add(websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        clients.discard(websocket)

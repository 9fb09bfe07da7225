"""FastAPI peer of the shootout (loadtests/shootout.py), run the way FastAPI's deployment docs
describe a pre-forked server: gunicorn managing uvicorn workers (uvicorn picks uvloop and httptools).

    gunicorn --chdir loadtests/peers -k uvicorn_worker.UvicornWorker -w WORKERS -b HOST:PORT fastapi_app:app

`/api/hello`, `/api/sleep?ms=N` (async, non-blocking) and `/ws/ticker` (a tick every
TICK_INTERVAL seconds, environment, default 1.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

TICK_INTERVAL = float(os.environ.get("TICK_INTERVAL", "1.0"))
clients: set[WebSocket] = set()


async def tick() -> None:
    loop = asyncio.get_running_loop()
    seq, due = 0, loop.time()
    while True:
        due += TICK_INTERVAL
        await asyncio.sleep(max(0.0, due - loop.time()))
        seq += 1
        message = json.dumps({"type": "tick", "seq": seq, "ts": time.time(), "worker": 0})
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

"""Python `websockets` peer of the shootout (loadtests/shootout.py): the broadcast as the library's
documentation writes it (a set of connections and `broadcast()`), on uvloop, one process.

    python loadtests/peers/websockets_app.py      # HOST (127.0.0.1), PORT, TICK_INTERVAL (1.0)

`websockets` is a WebSocket library, not an HTTP framework: `/api/hello` and `/api/sleep?ms=N`
are answered from `process_request`, only so that one client script can probe every peer alike.
"""

from __future__ import annotations

import asyncio
import json
import os
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import uvloop
from ticks import tick_messages
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

TICK_INTERVAL = float(os.environ.get("TICK_INTERVAL", "1.0"))
CONNECTIONS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    CONNECTIONS.add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        CONNECTIONS.discard(websocket)


def json_response(connection: ServerConnection, status: HTTPStatus, body: object) -> Response:
    response = connection.respond(status, json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    return response


async def process_request(connection: ServerConnection, request: Request) -> Response | None:
    url = urlsplit(request.path)
    if url.path == "/ws/ticker":
        return None
    if url.path == "/api/hello":
        return json_response(connection, HTTPStatus.OK, {"message": "hello world"})
    if url.path == "/api/sleep":
        ms = int(parse_qs(url.query).get("ms", ["0"])[0])
        await asyncio.sleep(ms / 1000)
        return json_response(connection, HTTPStatus.OK, {"slept_ms": ms})
    return json_response(connection, HTTPStatus.NOT_FOUND, {"error": "Not Found", "status": 404})


async def tick() -> None:
    async for message in tick_messages(TICK_INTERVAL):
        broadcast(CONNECTIONS, message)


async def main() -> None:
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])
    async with serve(handler, host, port, process_request=process_request, backlog=2048) as server:
        ticker = asyncio.create_task(tick())
        try:
            await server.serve_forever()
        finally:
            ticker.cancel()


if __name__ == "__main__":
    uvloop.run(main())

"""A small synchronous face on Tornado's real WebSocket client, for tests."""

from __future__ import annotations

import asyncio
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


async def connect(url: str | HTTPRequest, timeout: float = 10.0) -> WebSocketClientConnection:
    return await asyncio.wait_for(websocket_connect(url), timeout)


async def read_until_closed(conn: WebSocketClientConnection, timeout: float) -> list[str | bytes]:
    """Every message until the server closes the socket; the close code is on `conn.close_code`."""
    messages: list[str | bytes] = []
    while True:
        message = await asyncio.wait_for(conn.read_message(), timeout)
        if message is None:
            return messages
        messages.append(message)


def run(coro: Any) -> Any:
    return asyncio.run(coro)

"""The quick-start's hello world, as text and as JSON: the cheapest requests, for throughput."""

from __future__ import annotations

from service.handlers.base import BaseHandler

_HELLO_JSON = b'{"message":"hello world"}'


class HelloHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish("Hello, world")


class ApiHelloHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(_HELLO_JSON)

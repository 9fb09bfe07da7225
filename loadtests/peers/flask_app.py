"""Flask peer of the shootout (loadtests/shootout.py): the Flask hello on gunicorn's default sync
workers, the usual production setup, and so the "Tornado or Flask" comparison.

    gunicorn --chdir loadtests/peers -w WORKERS -b HOST:PORT flask_app:app

`/api/sleep?ms=N` sleeps in the worker (`time.sleep`): a sync worker serves one request at a time,
so C concurrent sleeps queue behind each other. That is the point of the comparison. A sync WSGI
worker has no WebSockets: this peer has no `/ws/ticker` and is not in the broadcast shootout.
"""

from __future__ import annotations

import time

from flask import Flask, request

app = Flask(__name__)


@app.get("/api/hello")
def hello() -> dict[str, str]:
    return {"message": "hello world"}


@app.get("/api/sleep")
def sleep() -> dict[str, int]:
    ms = request.args.get("ms", default=0, type=int)
    time.sleep(ms / 1000)
    return {"slept_ms": ms}

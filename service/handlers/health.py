"""Liveness and readiness, kept apart as Kubernetes expects.

/healthz answers as long as the event loop turns (a blocked or dead loop fails it, and the
kubelet restarts the pod); /readyz answers 503 while the worker starts or drains, so the load
balancer stops sending new requests before the listener closes.
"""

from __future__ import annotations

from service.handlers.base import BaseHandler


class HealthzHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyzHandler(BaseHandler):
    def get(self) -> None:
        state = self.worker.state
        if state.ready and not state.draining:
            self.write_json({"status": "ready"})
        else:
            self.write_json({"status": "draining" if state.draining else "starting"}, status=503)

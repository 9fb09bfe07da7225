"""/metrics: every worker's samples summed, in Prometheus text format (OpenMetrics when asked).

Merging reads one file per process, so it runs on a thread: a scrape must not stall the
requests this worker is serving (the metric that shows stalls would otherwise cause them).
"""

from __future__ import annotations

from tornado.ioloop import IOLoop

from service.handlers.base import BaseHandler


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        body, content_type = await IOLoop.current().run_in_executor(
            None, self.worker.render_metrics, self.request.headers.get("Accept")
        )
        self.set_header("Content-Type", content_type)
        self.finish(body)

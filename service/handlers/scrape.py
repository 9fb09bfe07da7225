"""/metrics: every worker's samples summed, in Prometheus text format (OpenMetrics when asked).

Workers keep their request counts in memory between flushes (service.telemetry.metrics): first this
worker flushes, asks every other worker to, and waits for them (at most 150 ms), so a scrape
shows every request finished before it. Merging reads one file per process, so it runs on a
thread: a scrape must not stall the requests this worker is serving (the metric that shows
stalls would otherwise cause them).
"""

from __future__ import annotations

from typing import cast

from tornado.ioloop import IOLoop

from service.handlers.base import BaseHandler
from service.telemetry import metrics


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        flusher = cast("metrics.Flusher | None", self.settings.get(metrics.FLUSHER_SETTING))
        if flusher is not None:
            await flusher.flush_everywhere()
        else:  # an application served without a worker (a test): its own counts only
            metrics.HTTP_TOTALS.flush()
        body, content_type = await IOLoop.current().run_in_executor(
            None, self.worker.render_metrics, self.request.headers.get("Accept")
        )
        self.set_header("Content-Type", content_type)
        self.finish(body)

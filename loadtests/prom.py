"""The server's view of a run, from Prometheus: series over the run's window and counter increases.

Every query names its job (`tornado` for the service, `nginx` for nginx-prometheus-exporter: the
names the local stack, compose and the Kubernetes PodMonitor all use). Rates use a window of four
scrape intervals, so each point of a chart averages a few seconds.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

Series = list[tuple[float, float]]  # (unix time, value)


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    url: str
    job: str = "tornado"
    nginx_job: str = "nginx"
    timeout: float = 30.0

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise PrometheusError(f"{path}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{path}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body}")
        return body["data"]

    def instant(self, query: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return list(self._get("/api/v1/query", params)["result"])

    def scalar(self, query: str, at: float | None = None) -> float | None:
        """The one value of a query that returns at most one series (None when it returns none)."""
        result = self.instant(query, at)
        if not result:
            return None
        return float(result[0]["value"][1])

    def range(self, query: str, start: float, end: float, step: float) -> dict[str, Series]:
        """Each series of the query over [start, end], keyed by its labels (`worker=0`, or `value`)."""
        data = self._get("/api/v1/query_range", {
            "query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}",
        })
        out: dict[str, Series] = {}
        for item in data["result"]:
            labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
            key = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
            points = [(float(t), float(v)) for t, v in item["values"]]
            out[key] = [(t, v) for t, v in points if not math.isnan(v)]
        return out

    def ready(self) -> bool:
        try:
            self.instant("vector(1)")
        except PrometheusError:
            return False
        return True


@dataclass
class ServerView:
    """What Prometheus saw over a run: series for the charts, and a few figures for the summary."""

    start: float
    end: float
    step: float
    series: dict[str, dict[str, Series]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def peak(self, name: str) -> float | None:
        values = [v for points in self.series.get(name, {}).values() for _, v in points]
        return max(values) if values else None

    def peak_by_key(self, name: str) -> dict[str, float]:
        return {key: max(v for _, v in points) for key, points in self.series.get(name, {}).items() if points}

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "step": self.step, "figures": self.figures,
                "errors": self.errors, "series": self.series}


def range_queries(job: str, nginx_job: str, window: str, handlers: str) -> dict[str, str]:
    """name -> PromQL for every chart's series (by worker where the service labels one);
    latency is over the scenario's routes (`handlers`, a regex of route labels)."""
    s = f'job="{job}"'
    n = f'job="{nginx_job}"'
    not_scrape = 'handler!~"metrics|healthz|readyz"'
    return {
        "connections_by_worker": f"sum by (worker) (tornado_connections_open{{{s}}})",
        "websockets": f"sum(tornado_websocket_connections_open{{{s}}})",
        "long_polls": f"sum(tornado_long_polls_waiting{{{s}}})",
        "requests_per_second": f"sum by (handler) (rate(http_requests_total{{{s},{not_scrape}}}[{window}]))",
        "latency_p50": "histogram_quantile(0.5, sum by (le) "
                       f'(rate(http_request_duration_seconds_bucket{{{s},handler=~"{handlers}"}}[{window}])))',
        "latency_p99": "histogram_quantile(0.99, sum by (le) "
                       f'(rate(http_request_duration_seconds_bucket{{{s},handler=~"{handlers}"}}[{window}])))',
        "loop_lag_p99_by_worker": "histogram_quantile(0.99, sum by (le, worker) "
                                  f"(rate(tornado_event_loop_lag_seconds_bucket{{{s}}}[{window}])))",
        "cpu_by_worker": f"sum by (worker) (rate(tornado_worker_cpu_seconds{{{s}}}[{window}]))",
        "memory_by_worker": f"sum by (worker) (tornado_worker_resident_memory_bytes{{{s}}})",
        "fds_by_worker": f"sum by (worker) (tornado_worker_open_fds{{{s}}})",
        "refused_by_worker": f"sum by (worker) (tornado_connections_refused_total{{{s}}})",
        "nginx_active": f"sum(nginx_connections_active{{{n}}})",
        "scrape_up": f"min(up{{{s}}})",
        "scrape_seconds": f"max(scrape_duration_seconds{{{s}}})",
        "nginx_waiting": f"sum(nginx_connections_waiting{{{n}}})",
    }


def collect(
    prom: Prometheus, start: float, end: float, step: float, handlers: str, counters_at: tuple[float, float],
) -> ServerView:
    """Every series over [start, end], and the counters' increase between the two `counters_at`.

    `handlers`: a regex of the route labels the scenario's requests are counted under
    (e.g. `api_hello|api_sleep`): the increase of http_requests_total over them is the server's
    count of the client's requests. Counters are read as raw sums at both times (no
    extrapolation): just before the load, and once a scrape has followed its end.
    """
    view = ServerView(start=start, end=end, step=step)
    before_at, after_at = counters_at
    window = f"{max(4 * step, 2 * step + 1):g}s"
    queries = range_queries(prom.job, prom.nginx_job, window, handlers)
    for name, query in queries.items():
        try:
            view.series[name] = prom.range(query, start, end, step)
        except PrometheusError as exc:
            view.errors.append(f"{name}: {exc}")
    s = f'job="{prom.job}"'

    def increase(query: str) -> float | None:
        try:
            before, after = prom.scalar(query, before_at), prom.scalar(query, after_at)
        except PrometheusError as exc:
            view.errors.append(f"{query}: {exc}")
            return None
        if after is None:
            return None
        return after - (before or 0.0)

    figures = view.figures
    figures["requests_counted"] = increase(f'sum(http_requests_total{{{s},handler=~"{handlers}"}})')
    figures["latency_by_handler"] = latency_over(prom, handlers, before_at, after_at, view.errors)
    figures["requests_5xx_counted"] = increase(
        f'sum(http_requests_total{{{s},handler=~"{handlers}",code=~"5.."}})') or 0.0
    figures["connections_refused"] = increase(f"sum(tornado_connections_refused_total{{{s}}})") or 0.0
    figures["slow_consumers_dropped"] = increase(
        f"sum(tornado_websocket_slow_consumers_total{{{s}}})") or 0.0
    figures["worker_restarts"] = increase(f"sum(tornado_worker_restarts_total{{{s}}})") or 0.0
    figures["ws_messages_out"] = increase(
        f'sum(tornado_websocket_messages_total{{{s},direction="out"}})') or 0.0
    try:
        figures["workers_alive"] = prom.scalar(f"sum(tornado_workers_alive{{{s}}})", after_at)
        figures["max_connections_setting"] = prom.scalar(f"max(tornado_max_connections{{{s}}})", after_at)
        figures["max_fds_setting"] = prom.scalar(f"max(tornado_worker_max_fds{{{s}}})", after_at)
    except PrometheusError as exc:
        view.errors.append(str(exc))
    up = [v for points in view.series.get("scrape_up", {}).values() for _, v in points]
    figures["scrapes_failed"] = sum(1 for v in up if v < 1)
    figures["scrape_seconds_peak"] = view.peak("scrape_seconds")
    figures["websockets_peak"] = view.peak("websockets")
    figures["long_polls_peak"] = view.peak("long_polls")
    figures["connections_peak_by_worker"] = view.peak_by_key("connections_by_worker")
    figures["connections_peak"] = _peak_of_sum(view.series.get("connections_by_worker", {}))
    figures["nginx_active_peak"] = view.peak("nginx_active")
    figures["memory_peak_by_worker"] = view.peak_by_key("memory_by_worker")
    figures["memory_start_by_worker"] = {
        key: points[0][1] for key, points in view.series.get("memory_by_worker", {}).items() if points
    }
    figures["cpu_peak_by_worker"] = view.peak_by_key("cpu_by_worker")
    figures["loop_lag_p99_peak_by_worker"] = view.peak_by_key("loop_lag_p99_by_worker")
    figures["latency_p50_peak"] = view.peak("latency_p50")
    figures["latency_p99_peak"] = view.peak("latency_p99")
    figures["requests_per_second_peak"] = _peak_of_sum(view.series.get("requests_per_second", {}))
    return view


def latency_over(
    prom: Prometheus, handlers: str, start: float, end: float, errors: list[str],
) -> dict[str, dict[str, float]]:
    """handler -> {p50, p95, p99} in seconds over the whole [start, end] (the histogram's
    increase, interpolated within its buckets as histogram_quantile does)."""
    window = f"{max(1, math.ceil(end - start))}s"
    selector = f'job="{prom.job}",handler=~"{handlers}"'
    out: dict[str, dict[str, float]] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        query = (f"histogram_quantile({q}, sum by (le, handler) "
                 f"(increase(http_request_duration_seconds_bucket{{{selector}}}[{window}])))")
        try:
            result = prom.instant(query, end)
        except PrometheusError as exc:
            errors.append(f"{name}: {exc}")
            continue
        for item in result:
            value = float(item["value"][1])
            if not math.isnan(value):
                out.setdefault(item["metric"].get("handler", ""), {})[name] = value
    return out


def _peak_of_sum(series: dict[str, Series]) -> float | None:
    """The peak over time of the sum of several series (e.g. connections of every worker)."""
    totals: dict[float, float] = {}
    for points in series.values():
        for t, v in points:
            totals[t] = totals.get(t, 0.0) + v
    return max(totals.values()) if totals else None

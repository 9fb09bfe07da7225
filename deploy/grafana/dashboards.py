"""Grafana dashboards as code, built with Grafana's own builder library (grafana-foundation-sdk).

The JSON files under `deploy/grafana/dashboards/` are what Grafana provisions; they are written
by this module and never edited by hand:

    python -m deploy.generate                     # (re)write every generated file, these included
    python -m deploy.generate --check             # exit 1 if a generated file on disk differs
    python -m deploy.grafana.dashboards [--check] # the dashboards only

Kubernetes gets the same files, not a copy: deploy/grafana/dashboards/kustomization.yaml (written
by deploy/k8s.py) makes them ConfigMaps, and k8s/base lists this folder as a resource. Grafana's
file provisioning reads only the *.json files of the folder.

The JSON is plain dashboard JSON (no `__inputs`, no numeric `id`), and every panel and query
names its datasource through the `${datasource}` template variable, so the same file loads
through Grafana's file provisioning (deploy/grafana/provisioning/) or a Kubernetes Grafana
sidecar, whatever the Prometheus datasource is called there.

Heavy queries read the recording rules of deploy/prometheus/rules/recording.yml (rates,
error ratios, latency buckets and quantiles, loop-lag quantiles, each keeping `job` and
`instance`); the rest read the service's own metrics (README.md, "Metrics") and
nginx-prometheus-exporter's. tests/test_grafana.py runs every query against a real Prometheus.

The SDK is pinned (pyproject.toml, constraints.txt) to its build for Grafana 11.3, the Grafana
of deploy/compose.yaml: its JSON has that Grafana's schemaVersion, which newer Grafanas migrate
on load. Moving to another Grafana means moving the pin and regenerating.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from deploy.generate import Generator, sync

DIRECTORY = Path(__file__).resolve().parent / "dashboards"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'job=~"$job", instance=~"$instance"'  # the service's series on the chosen instances
NGINX = 'job="nginx"'  # nginx-prometheus-exporter's scrape job
NOT_LONG_POLLS = 'handler!="api_poll"'  # a long poll waits for a tick by design: not latency

Query = cogbuilder.Builder[cogvariants.Dataquery]
Thresholds = list[tuple[float | None, str]]
GREEN: Thresholds = [(None, "green")]


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> Dataquery:
    built = Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        built = built.legend_format(legend)
    return built.instant() if instant else built.range()


def queries(*exprs: tuple[str, str], instant: bool = False) -> list[Query]:
    """(expression, legend) pairs as queries A, B, C..."""
    return [query(expr, legend, chr(ord("A") + i), instant) for i, (expr, legend) in enumerate(exprs)]


def thresholds(steps: Thresholds) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


class Layout:
    """Numbers panels 1, 2, 3... in the order they are added (rows included)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.last_id = 0

    def _next(self) -> int:
        self.last_id += 1
        return self.last_id

    def row(self, title: str) -> None:
        self.dashboard.with_row(Row(title).id(self._next()))

    def timeseries(
        self, title: str, description: str, unit: str, targets: Iterable[Query],
        width: int = 12, height: int = 8, steps: Thresholds = GREEN, min_val: float | None = 0,
    ) -> None:
        panel = (
            timeseries.Panel().id(self._next()).title(title).description(description)
            .datasource(DATASOURCE).targets(list(targets)).unit(unit).thresholds(thresholds(steps))
            .span(width).height(height).line_width(1).fill_opacity(10)
            .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                    .placement(LegendPlacement.BOTTOM).show_legend(True))
            .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
        )
        if min_val is not None:
            panel = panel.min(min_val)
        self.dashboard.with_panel(panel)

    def stat(
        self, title: str, description: str, unit: str, expr: str, steps: Thresholds = GREEN,
        width: int = 4, height: int = 4, legend: str = "",
        text_mode: BigValueTextMode = BigValueTextMode.AUTO, mappings: list[ValueMap] | None = None,
    ) -> None:
        panel = (
            stat.Panel().id(self._next()).title(title).description(description)
            .datasource(DATASOURCE).targets(queries((expr, legend), instant=True)).unit(unit)
            .thresholds(thresholds(steps)).span(width).height(height)
            .color_mode(BigValueColorMode.VALUE).graph_mode(BigValueGraphMode.NONE).text_mode(text_mode)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
        if mappings:
            panel = panel.mappings(list(mappings))
        self.dashboard.with_panel(panel)

    def heatmap(self, title: str, description: str, unit: str, target: Query, width: int = 8,
                height: int = 8) -> None:
        """A Prometheus histogram's buckets (query format "heatmap"), as Grafana draws them."""
        self.dashboard.with_panel(
            heatmap.Panel().id(self._next()).title(title).description(description)
            .datasource(DATASOURCE).targets([target]).span(width).height(height).unit(unit)
            .calculate(False).y_axis(heatmap.YAxisConfig().unit(unit))
            .color(heatmap.HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges")
                   .fill("dark-orange").scale(HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
        )

    def table(self, title: str, description: str, targets: Iterable[Query], hide: list[str],
              width: int = 24, height: int = 6) -> None:
        self.dashboard.with_panel(
            table.Panel().id(self._next()).title(title).description(description)
            .datasource(DATASOURCE).targets(list(targets)).span(width).height(height)
            .with_transformation(DataTransformerConfig(
                id_val="organize", options={"excludeByName": dict.fromkeys(hide, True)},
            ))
        )


def variables(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("job").label("Job").datasource(DATASOURCE)
            .query("label_values(up, job)")
            .current(VariableOption(text="tornado", value="tornado", selected=True))
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            QueryVariable("instance").label("Instance").datasource(DATASOURCE)
            .query('label_values(up{job=~"$job"}, instance)')
            .multi(True).include_all(True)
            .current(VariableOption(text=["All"], value=["$__all"], selected=True))
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        )
    )


def tornado_service() -> Dashboard:
    """RED (rate, errors, duration) per handler, USE (utilisation, saturation, errors) per worker."""
    board = (
        Dashboard("Tornado service").uid("tornado-service")
        .description("Pre-fork Tornado service: requests, latency, connections, workers, Nginx. "
                     "Generated by deploy/grafana/dashboards.py; edit that, not this JSON.")
        .tags(["tornado", "prometheus", "generated"])
        .time("now-1h", "now").refresh("30s").tooltip(DashboardCursorSync.CROSSHAIR)
        .annotation(
            AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard")
            .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)")
        )
    )
    board = variables(board)
    p = Layout(board)
    per_worker = "{{instance}} worker {{worker}}"

    # -- overview ----------------------------------------------------------------------------------
    p.row("Overview")
    p.stat("Requests/s", "Requests finished per second (1m rate), all handlers, chosen instances.",
           "reqps", f"sum(handler:http_requests:rate1m{{{SEL}}})")
    p.stat("5xx ratio (5m, worst instance)",
           "Share of requests answered 5xx over 5 minutes, on the worst instance "
           "(alert TornadoHigh5xxRatio: above 5% for 5 minutes).",
           "percentunit", f"max(job:http_requests_errors:ratio_rate5m{{{SEL}}})",
           [(None, "green"), (0.01, "orange"), (0.05, "red")])
    p.stat("p99 latency (5m, worst instance)",
           "99th percentile of request duration over 5 minutes, long polls and /api/sleep left out "
           "(they wait by design); alert TornadoHighP99Latency: above 500 ms for 10 minutes.",
           "s", f"max(job:http_request_duration_seconds:p99_5m{{{SEL}}})",
           [(None, "green"), (0.25, "orange"), (0.5, "red")])
    p.stat("Event-loop lag p99 (worst worker)",
           "How late a 250 ms timer fired (99th percentile over 5 minutes): how long the worst "
           "worker's event loop was blocked. /api/compute shows here; alert TornadoEventLoopLag: "
           "above 100 ms for 5 minutes.",
           "s", f"max(worker:tornado_event_loop_lag_seconds:p99_5m{{{SEL}}})",
           [(None, "green"), (0.05, "orange"), (0.1, "red")])
    p.stat("In-progress requests", "Requests being handled now, summed over workers (sampled every second).",
           "short", f"sum(http_requests_in_progress{{{SEL}}})")
    p.stat("Open connections", "Open TCP connections (HTTP and WebSocket), summed over workers.",
           "short", f"sum(tornado_connections_open{{{SEL}}})")
    p.stat("Open WebSockets", "Open WebSocket connections, all handlers.",
           "short", f"sum(tornado_websocket_connections_open{{{SEL}}})")
    p.stat("Long polls waiting", "/api/poll requests waiting for a tick.",
           "short", f"sum(tornado_long_polls_waiting{{{SEL}}})")
    p.stat("Workers alive", "Worker processes running, summed over the chosen instances.",
           "short", f"sum(tornado_workers_alive{{{SEL}}})", [(None, "red"), (1, "green")])
    p.stat("Worker restarts (time range)",
           "Workers restarted after dying (crash, SIGKILL, OOM, non-zero exit) within the dashboard's "
           "time range; alert TornadoWorkerRestarted fires on any.",
           "short", f"round(sum(increase(tornado_worker_restarts_total{{{SEL}}}[$__range])))",
           [(None, "green"), (1, "orange"), (5, "red")])
    p.stat("Alerts firing", 'Prometheus alerts in state "firing" (ALERTS), all jobs: listed below.',
           "short", 'count(ALERTS{alertstate="firing"}) or vector(0)', [(None, "green"), (1, "red")])
    p.stat("Version", "The service's version, from tornado_build_info (which also has the Tornado and "
           "Python versions and the worker count as labels).",
           "short", f"max by (version) (tornado_build_info{{{SEL}}})",
           legend="{{version}}", text_mode=BigValueTextMode.NAME)

    # -- requests: rate, errors, duration -----------------------------------------------------------
    p.row("Requests (RED)")
    p.timeseries("Requests/s by handler and code", "Requests finished per second (1m rate).", "reqps",
                 queries((f"sum by (handler, code) (handler_code:http_requests:rate1m{{{SEL}}})",
                          "{{handler}} {{code}}")))
    p.timeseries("5xx ratio by handler (5m)",
                 "Share of requests answered 5xx over 5 minutes, per handler (worst instance) and for "
                 "all handlers together. A handler without traffic in the window has no value.",
                 "percentunit",
                 queries((f"max by (handler) (handler:http_requests_errors:ratio_rate5m{{{SEL}}})",
                          "{{handler}}"),
                         (f"max(job:http_requests_errors:ratio_rate5m{{{SEL}}})", "all handlers")),
                 steps=[(None, "green"), (0.01, "orange"), (0.05, "red")])
    for quantile, steps in (("50", [(None, "green"), (0.1, "orange"), (0.25, "red")]),
                            ("95", [(None, "green"), (0.25, "orange"), (0.5, "red")]),
                            ("99", [(None, "green"), (0.5, "orange"), (1, "red")])):
        p.timeseries(f"Latency p{quantile} by handler",
                     f"{quantile}th percentile of request duration over 5 minutes, per handler, on the "
                     "slowest instance. Long polls (api_poll) are left out: they wait for a tick by design.",
                     "s", queries((f"max by (handler) (handler:http_request_duration_seconds:p{quantile}_5m"
                                   f"{{{SEL}, {NOT_LONG_POLLS}}})", "{{handler}}")),
                     width=8, steps=steps)
    p.heatmap("Latency distribution",
              "Requests per latency bucket (5m rate), all handlers but long polls and /api/sleep.", "s",
              query(f"sum by (le) (handler_le:http_request_duration_seconds_bucket:rate5m"
                    f'{{{SEL}, handler!~"api_poll|api_sleep"}})', "{{le}}").format(PromQueryFormat.HEATMAP))
    p.timeseries("Requests/s by instance", "Requests finished per second on each instance (1m rate).",
                 "reqps", queries((f"sum by (instance) (handler:http_requests:rate1m{{{SEL}}})",
                                   "{{instance}}")), width=8)
    p.timeseries("In-progress requests per worker",
                 "Requests being handled, per worker (sampled every second).", "short",
                 queries((f"sum by (instance, worker) (http_requests_in_progress{{{SEL}}})", per_worker)),
                 width=8)

    # -- connections --------------------------------------------------------------------------------
    p.row("Connections and WebSockets")
    p.timeseries("Open connections per worker", "Open TCP connections (HTTP and WebSocket) per worker.",
                 "short", queries((f"sum by (instance, worker) (tornado_connections_open{{{SEL}}})",
                                   per_worker)), width=8)
    p.timeseries("Connections used of MAX_CONNECTIONS",
                 "Open connections over the per-worker cap: at 100% new connections are refused with a "
                 "503 (alert TornadoConnectionsNearLimit: above 80% for 5 minutes).", "percentunit",
                 queries((f"max by (instance, worker) (tornado_connections_open{{{SEL}}} "
                          f"/ on (job, instance, worker) tornado_max_connections{{{SEL}}})", per_worker)),
                 width=8, steps=[(None, "green"), (0.8, "orange"), (0.95, "red")])
    p.timeseries("Connections refused/s",
                 "Connections refused with a 503 because a worker held MAX_CONNECTIONS (A; alert "
                 "TornadoConnectionsRefused), or its memory cap while its cgroup was over MEMORY_SHED_AT "
                 "(B; alert TornadoMemoryShedding; a flat 0 per worker until the first, and in a worker "
                 "with no memory limit). No request counter sees them.", "short",
                 queries((f"sum by (instance, worker) (rate(tornado_connections_refused_total{{{SEL}}}"
                          "[$__rate_interval]))", per_worker),
                         (f"sum by (instance, worker) (rate(tornado_connections_refused_memory_total{{{SEL}}}"
                          "[$__rate_interval])) or on (instance, worker) "
                          f"(max by (instance, worker) (tornado_workers_alive{{{SEL}}}) * 0)",
                          "{{instance}} worker {{worker}} (memory)")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Open WebSockets by handler",
                 "Open WebSocket connections. The service sums this gauge over its workers (it has a "
                 "handler label, not a worker label): per-worker counts are in Open connections.",
                 "short",
                 queries((f"sum by (instance, handler) (tornado_websocket_connections_open{{{SEL}}})",
                          "{{instance}} {{handler}}")), width=6)
    p.timeseries("WebSocket messages/s",
                 "WebSocket messages received (in) and sent (out) per second. The ticker counts each "
                 "tick once, not once per socket.", "short",
                 queries((f"sum by (handler, direction) (rate(tornado_websocket_messages_total{{{SEL}}}"
                          "[$__rate_interval]))", "{{handler}} {{direction}}")), width=6)
    p.timeseries("Slow WebSocket consumers dropped/s",
                 "WebSockets dropped because their reader fell MAX_WRITE_BUFFER behind. The counter "
                 "appears at the first drop: until then a flat 0 per instance.", "short",
                 queries((f"sum by (instance, handler) (rate(tornado_websocket_slow_consumers_total{{{SEL}}}"
                          "[$__rate_interval])) or on (instance) "
                          f"(sum by (instance) (tornado_workers_alive{{{SEL}}}) * 0)",
                          "{{instance}} {{handler}}")),
                 width=6, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Long polls waiting per worker", "/api/poll requests waiting for a tick, per worker.",
                 "short", queries((f"sum by (instance, worker) (tornado_long_polls_waiting{{{SEL}}})",
                                   per_worker)), width=6)

    # -- rooms and their backplane ------------------------------------------------------------------
    p.row("Rooms and backplane")
    no_room_counter = f"or on (instance) (sum by (instance) (tornado_workers_alive{{{SEL}}}) * 0)"
    p.timeseries("Room messages published/s",
                 "Messages published to rooms per second, by room class (ROOM_CLASSES, every other room "
                 "`other`): WebSocket messages and POST /api/publish, each counted once, by the worker "
                 "that took it.", "short",
                 queries((f"sum by (room_class) (rate(tornado_room_messages_published_total{{{SEL}}}"
                          "[$__rate_interval]))", "{{room_class}}")), width=8)
    p.timeseries("Room messages delivered/s",
                 "Room messages handed to members per second, by room class: one per WebSocket or long "
                 "poll reached, on every worker, so about published/s times the room's members.", "short",
                 queries((f"sum by (room_class) (rate(tornado_room_messages_delivered_total{{{SEL}}}"
                          "[$__rate_interval]))", "{{room_class}}")), width=8)
    p.timeseries("Room publishes rejected/s",
                 "Publishes refused, by reason: backplane_down and backplane_full answer 503 (alert "
                 "TornadoRoomPublishesRejected when they last), rate_limited 429 or close 4029, "
                 "too_large 413. The counter appears at the first refusal: until then a flat 0 per "
                 "instance.", "short",
                 queries((f"sum by (instance, room_class, reason) (rate(tornado_room_publishes_rejected_total"
                          f"{{{SEL}}}[$__rate_interval])) {no_room_counter}",
                          "{{instance}} {{room_class}} {{reason}}")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Backplane latency p50/p95/p99",
                 "From a message's publish to the end of its fan-out in a worker that got it over the "
                 "backplane (5m rate of the buckets, the chosen instances together), by backplane "
                 "(embedded or redis). Across machines only as good as their clocks. The target is a "
                 "p95 under 500 ms; alert TornadoHighBackplaneLatency: an instance's p95 above 500 ms "
                 "for 5 minutes. No messages between workers: no value.", "s",
                 queries(*[(f"histogram_quantile(0.{q}, sum by (backplane, le) "
                            f"(backplane_le:tornado_backplane_latency_seconds_bucket:rate5m{{{SEL}}}))",
                            f"p{q} {{{{backplane}}}}") for q in ("50", "95", "99")]),
                 width=8, steps=[(None, "green"), (0.25, "orange"), (0.5, "red")])
    p.timeseries("Backplane up per worker",
                 "1 while the worker's backplane takes publishes, 0 while it is down: its publishes get "
                 "a 503 and its members get nothing until it reconnects (alert TornadoBackplaneDown: 0 "
                 "for 2 minutes). The embedded bus is up for as long as its worker runs.", "short",
                 queries((f"max by (instance, worker, backplane) (tornado_backplane_up{{{SEL}}})",
                          "{{instance}} worker {{worker}} {{backplane}}")),
                 width=8, steps=[(None, "red"), (1, "green")])
    p.timeseries("Backplane records dropped/s",
                 "Records a backplane could not carry between workers, by reason: peer_down (a worker "
                 "being restarted), queue_full (a worker too slow to read), too_large, disconnected "
                 "(Redis lost with records queued), shutdown, malformed (not this service's). Members "
                 "of other workers missed those messages (alert TornadoBackplaneRecordsDropped for "
                 "queue_full, too_large, malformed). A flat 0 per instance until the first drop.",
                 "short",
                 queries((f"sum by (instance, backplane, reason) (rate(tornado_backplane_dropped_total"
                          f"{{{SEL}}}[$__rate_interval])) {no_room_counter}",
                          "{{instance}} {{backplane}} {{reason}}")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Slow room subscribers dropped/s",
                 "Room WebSockets disconnected because their reader fell MAX_WRITE_BUFFER behind, by room "
                 "class (they are in Slow WebSocket consumers dropped too). A flat 0 per instance until "
                 "the first drop.", "short",
                 queries((f"sum by (instance, room_class) (rate(tornado_room_slow_subscribers_dropped_total"
                          f"{{{SEL}}}[$__rate_interval])) {no_room_counter}",
                          "{{instance}} {{room_class}}")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Rooms active per worker",
                 "Rooms with at least one member in the worker (sampled every second). A room with "
                 "members on several workers counts once on each.", "short",
                 queries((f"sum by (instance, worker) (tornado_rooms_active{{{SEL}}})", per_worker)), width=8)
    p.timeseries("Room members per worker",
                 "Room members in the worker: WebSockets on /ws/chat and long polls waiting on a room "
                 "(sampled every second).", "short",
                 queries((f"sum by (instance, worker) (tornado_room_members{{{SEL}}})", per_worker)), width=8)

    # -- workers: utilisation, saturation, errors ---------------------------------------------------
    p.row("Workers (USE)")
    p.timeseries("CPU per worker",
                 "CPU seconds per second of each worker process (1 = one core). A worker runs one "
                 "event loop on one core: near 1 it is saturated. rate() of the CPU-seconds gauge; a "
                 "restarted worker starts again from 0, which rate() takes as a counter reset.",
                 "percentunit",
                 queries((f"sum by (instance, worker) (rate(tornado_worker_cpu_seconds{{{SEL}}}"
                          "[$__rate_interval]))", per_worker)),
                 width=8, steps=[(None, "green"), (0.8, "orange"), (0.95, "red")])
    p.timeseries("Event-loop lag p99 per worker",
                 "How late a 250 ms timer fired (99th percentile over 5 minutes): time the worker's "
                 "event loop was blocked.", "s",
                 queries((f"max by (instance, worker) "
                          f"(worker:tornado_event_loop_lag_seconds:p99_5m{{{SEL}}})", per_worker)),
                 width=8, steps=[(None, "green"), (0.05, "orange"), (0.1, "red")])
    p.timeseries("Resident memory per worker", "Resident set size of each worker process.", "bytes",
                 queries((f"sum by (instance, worker) (tornado_worker_resident_memory_bytes{{{SEL}}})",
                          per_worker)), width=8)
    p.timeseries("Open file descriptors per worker",
                 "Open file descriptors of each worker process (sockets included).", "short",
                 queries((f"sum by (instance, worker) (tornado_worker_open_fds{{{SEL}}})", per_worker)),
                 width=6)
    p.timeseries("File descriptors used of the limit",
                 "Open file descriptors over the worker's RLIMIT_NOFILE soft limit: at 100% it can accept "
                 "no connection (alert TornadoFileDescriptorsNearLimit: above 80% for 5 minutes).",
                 "percentunit",
                 queries((f"max by (instance, worker) (tornado_worker_open_fds{{{SEL}}} "
                          f"/ on (job, instance, worker) tornado_worker_max_fds{{{SEL}}})", per_worker)),
                 width=6, steps=[(None, "green"), (0.8, "orange"), (0.95, "red")])
    p.timeseries("Workers alive per instance", "Worker processes running on each instance.", "short",
                 queries((f"sum by (instance) (tornado_workers_alive{{{SEL}}})", "{{instance}}")), width=6)
    p.timeseries("Worker restarts",
                 "Restarts of each worker id (increase over the rate interval): a bump is a worker that "
                 "died and was restarted.", "short",
                 queries((f"sum by (instance, worker) (increase(tornado_worker_restarts_total{{{SEL}}}"
                          "[$__rate_interval]))", per_worker)),
                 width=6, steps=[(None, "green"), (1, "orange"), (5, "red")])

    # -- alerts -------------------------------------------------------------------------------------
    p.row("Alerts")
    p.table("Firing alerts", 'Every Prometheus alert in state "firing" now (the ALERTS series), all jobs.',
            [query('ALERTS{alertstate="firing"}', instant=True).format(PromQueryFormat.TABLE)],
            hide=["Time", "Value", "__name__", "alertstate"])

    # -- nginx --------------------------------------------------------------------------------------
    p.row("Nginx")
    nginx_note = (" From nginx-prometheus-exporter (scrape job \"nginx\"), which reads Nginx's "
                  "stub_status; the instance variable does not apply.")
    p.stat("Nginx up", "Whether the exporter could read Nginx's stub_status (1: up)." + nginx_note,
           "short", f"min(nginx_up{{{NGINX}}})", [(None, "red"), (1, "green")], width=4, height=8,
           mappings=[ValueMap({"0": ValueMappingResult(text="DOWN", color="red", index=0),
                               "1": ValueMappingResult(text="UP", color="green", index=1)})])
    p.stat("Nginx active connections", "Client connections open on Nginx now." + nginx_note,
           "short", f"sum(nginx_connections_active{{{NGINX}}})", width=4, height=8)
    p.timeseries("Nginx connections",
                 "Client connections: active (all open), reading (request head), writing (response, "
                 "including proxied requests and WebSockets), waiting (idle keep-alive)." + nginx_note,
                 "short",
                 queries(*[(f"sum by (instance) (nginx_connections_{state}{{{NGINX}}})",
                            f"{state} {{{{instance}}}}")
                           for state in ("active", "reading", "writing", "waiting")]), width=16)
    p.timeseries("Nginx requests/s", "Client requests Nginx received per second." + nginx_note, "reqps",
                 queries((f"sum by (instance) (rate(nginx_http_requests_total{{{NGINX}}}[$__rate_interval]))",
                          "{{instance}}")), width=8)
    p.timeseries("Nginx connections accepted and dropped/s",
                 "Connections accepted per second, and accepted minus handled: connections Nginx had to "
                 "drop (worker_connections or another resource limit reached)." + nginx_note, "short",
                 queries((f"sum by (instance) (rate(nginx_connections_accepted{{{NGINX}}}"
                          "[$__rate_interval]))", "accepted {{instance}}"),
                         (f"sum by (instance) (rate(nginx_connections_accepted{{{NGINX}}}[$__rate_interval]) "
                          f"- rate(nginx_connections_handled{{{NGINX}}}[$__rate_interval]))",
                          "dropped {{instance}}")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    p.timeseries("Server errors behind Nginx (5xx answered by the service)",
                 "The OSS nginx-prometheus-exporter exports no status codes and no upstream errors "
                 "(stub_status has connection and request counts only): a 502 or 504 that Nginx makes "
                 "itself, when the service is down or too slow, shows only in Nginx's access log. Shown "
                 "here: the 5xx the service answered (1m rate; a flat 0 when there are none). Read it "
                 "with Nginx up, Nginx connections and the dropped connections.", "reqps",
                 queries((f'sum by (handler, code) (handler_code:http_requests:rate1m{{{SEL}, code=~"5.."}}) '
                          f'or on () label_replace(sum(handler:http_requests:rate1m{{{SEL}}}) * 0, '
                          '"code", "5xx", "", "")', "{{handler}} {{code}}")),
                 width=8, steps=[(None, "green"), (0.01, "red")])
    return board


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "tornado-service.json": tornado_service,
}


def encode(build: Callable[[], Dashboard]) -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def render(directory: Path = DIRECTORY) -> dict[Path, str]:
    """Every dashboard's JSON file (absolute path) and its text."""
    return {directory / name: encode(build) for name, build in DASHBOARDS.items()}


def obsolete(files: Mapping[Path, str], directory: Path = DIRECTORY) -> list[Path]:
    """JSON in the folder that no dashboard writes any more (a renamed or removed dashboard)."""
    return [path for path in sorted(directory.glob("*.json")) if path not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs; write nothing")
    parser.add_argument("--dir", type=Path, default=DIRECTORY, help="where the JSON files are")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    dashboards = Generator("deploy.grafana.dashboards", functools.partial(render, directory))
    if directory.resolve() == DIRECTORY:  # another folder may hold JSON of its own: nothing is removed there
        dashboards = Generator(dashboards.name, dashboards.render, obsolete)
    return sync([dashboards], args.check, command="python -m deploy.grafana.dashboards")


if __name__ == "__main__":
    sys.exit(main())

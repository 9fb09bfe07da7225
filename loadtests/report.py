"""The report of one run: the client's figures beside the server's, charts over time, and checks.

Everything here works on plain data (k6's summary export, Locust's JSON stats, the series
`loadtests.prom` collected), so it can be rerun on a report folder's `report.json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.prom import Series, ServerView

CHARTS = ("connections", "requests", "latency", "cpu", "memory", "loop_lag")
TREND_KEYS = ("avg", "min", "med", "max", "p(90)", "p(95)", "p(99)")


# -- the client's view ---------------------------------------------------------------------------
def merge_k6(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """k6 summary exports of several processes as one: counters and rates add up; a trend's
    count adds up, its avg is weighted, min/max are the extremes and each percentile is the worst
    process's (an upper bound: percentiles do not add)."""
    merged: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for name, metric in summary.get("metrics", {}).items():
            values = {k: v for k, v in metric.items() if k != "thresholds"}
            failed = any(metric.get("thresholds", {}).values())
            if name not in merged:
                merged[name] = {**values, "threshold_failed": failed}
                continue
            into = merged[name]
            into["threshold_failed"] = into["threshold_failed"] or failed
            if "passes" in values:  # a Rate
                into["passes"] += values["passes"]
                into["fails"] += values["fails"]
                total = into["passes"] + into["fails"]
                into["value"] = into["passes"] / total if total else 0.0
            elif "avg" in values:  # a Trend
                n0, n1 = into.get("count", 0), values.get("count", 0)
                if n0 + n1:
                    into["avg"] = (into["avg"] * n0 + values["avg"] * n1) / (n0 + n1)
                into["count"] = n0 + n1
                into["min"] = min(into["min"], values["min"])
                into["max"] = max(into["max"], values["max"])
                for key in ("med", "p(90)", "p(95)", "p(99)"):
                    if key in values:
                        into[key] = max(into.get(key, 0.0), values[key])
                into["merged_percentiles"] = "worst process"
            elif "count" in values:  # a Counter
                into["count"] += values["count"]
                into["rate"] = into.get("rate", 0.0) + values.get("rate", 0.0)
            elif "max" in values:  # a Gauge
                into["max"] = max(into["max"], values["max"])
                into["min"] = min(into["min"], values["min"])
                into["value"] = into.get("value", 0) + values.get("value", 0)
    return merged


def count(metrics: dict[str, dict[str, Any]], name: str) -> float:
    return float(metrics.get(name, {}).get("count", 0) or 0)


def trend(metrics: dict[str, dict[str, Any]], name: str) -> dict[str, float] | None:
    metric = metrics.get(name)
    if not metric or not metric.get("count"):
        return None
    return {k: float(metric[k]) for k in (*TREND_KEYS, "count") if k in metric}


def close_codes(metrics: dict[str, dict[str, Any]]) -> dict[str, int]:
    prefix = "ws_unexpected_closes{code:"
    return {name[len(prefix):-1]: int(m["count"]) for name, m in metrics.items()
            if name.startswith(prefix) and m.get("count")}


def locust_totals(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Locust's JSON stats (`--json-file`) as the few figures the report needs."""
    out: dict[str, Any] = {"http_requests": 0, "http_failures": 0, "ws_connects": 0, "ws_connect_failures": 0,
                           "ws_closes": 0, "ticks": 0, "failures": 0, "entries": {}}
    for entry in stats:
        key = f"{entry['method']} {entry['name']}"
        requests, failures = int(entry["num_requests"]), int(entry["num_failures"])
        out["failures"] += failures
        out["entries"][key] = {"requests": requests, "failures": failures,
                               **_locust_percentiles(entry.get("response_times", {}))}
        if entry["method"] == "WS":
            if entry["name"] == "connect":
                out["ws_connects"] += requests - failures
                out["ws_connect_failures"] += failures
            elif entry["name"] == "close":
                out["ws_closes"] += requests
            elif entry["name"] == "tick":
                out["ticks"] += requests
        else:
            out["http_requests"] += requests
            out["http_failures"] += failures
    return out


def _locust_percentiles(histogram: dict[str, int]) -> dict[str, float]:
    """p50/p95/p99 (ms) from Locust's rounded response-time histogram {ms: count}."""
    points = sorted((float(k), int(v)) for k, v in histogram.items())
    total = sum(v for _, v in points)
    out: dict[str, float] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        if not total:
            break
        seen = 0
        for value, n in points:
            seen += n
            if seen >= q * total:
                out[name] = value
                break
    return out


# -- checks ----------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One row of the side-by-side table."""

    figure: str
    client: str
    server: str
    ok: bool | None = None  # None: shown, not checked

    @property
    def verdict(self) -> str:
        return {True: "match", False: "MISMATCH", None: ""}[self.ok]


@dataclass
class Outcome:
    client: dict[str, Any] = field(default_factory=dict)
    rows: list[Comparison] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # name -> count, all must be 0
    thresholds_failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not any(self.errors.values()) and not self.thresholds_failed
                and all(row.ok is not False for row in self.rows))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _trend_text(t: dict[str, float] | None) -> str:
    if not t:
        return "-"
    return " / ".join(_ms(t.get(k)) for k in ("med", "p(95)", "p(99)", "max")) + " (p50 / p95 / p99 / max)"


def compare(
    scenario: str, client: dict[str, Any], view: ServerView | None, params: dict[str, Any],
) -> Outcome:
    """The client's figures against the server's, per scenario."""
    out = Outcome(client=client)
    fig = view.figures if view else {}
    metrics: dict[str, dict[str, Any]] = client.get("k6", {})
    out.thresholds_failed = sorted(  # the per-code submetrics' thresholds are always true
        name for name, m in metrics.items()
        if m.get("threshold_failed") and not name.startswith("ws_unexpected_closes{")
    )
    requests_counted = fig.get("requests_counted")

    def request_row(label: str, sent: float) -> None:
        ok = None if requests_counted is None else round(requests_counted) == int(sent)
        out.rows.append(Comparison(label, f"{_n(sent)} requests answered",
                                   f"{_n(requests_counted)} (increase of http_requests_total)", ok))

    def open_row(label: str, opened: float, what: str) -> None:
        """Sockets the client opened against the peak of the server's WebSocket gauge."""
        peak = fig.get("websockets_peak")
        out.rows.append(Comparison(
            label, f"{_n(opened)} {what}", f"{_n(peak)} (peak of tornado_websocket_connections_open)",
            None if view is None else peak is not None and int(peak) == int(opened)))

    if scenario == "websockets":
        open_row("WebSockets open at once", count(metrics, "ws_sockets_opened"), "opened (ws_sockets_opened)")
        out.rows.append(Comparison("connections per worker, peak", "-", _per_worker(fig.get(
            "connections_peak_by_worker", {}))))
        out.rows.append(Comparison("connect time", _trend_text(trend(metrics, "ws_connect_time")), "-"))
        out.rows.append(Comparison(
            "failed to connect", _n(count(metrics, "ws_connect_failures")),
            f"{_n(fig.get('connections_refused'))} refused at MAX_CONNECTIONS"))
        codes = close_codes(metrics)
        out.rows.append(Comparison(
            "closed unexpectedly", _n(count(metrics, "ws_unexpected_closes"))
            + (f" (codes: {', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))})" if codes else ""),
            f"{_n(fig.get('slow_consumers_dropped'))} slow consumers dropped, "
            f"{_n(fig.get('worker_restarts'))} worker restarts"))
        out.rows.append(Comparison(
            "ticks",
            f"{_n(count(metrics, 'ticks_received'))} received, {_n(count(metrics, 'ticks_missed'))} missed",
            f"{_n(fig.get('ws_messages_out'))} sent (tornado_websocket_messages_total out)"))
        out.rows.append(Comparison(
            "tick fan-out latency, whole run", _trend_text(trend(metrics, "tick_latency")), "-"))
        out.rows.append(Comparison(
            "tick fan-out latency, all held", _trend_text(trend(metrics, "tick_latency_held")), "-"))
        out.errors = {"ws_connect_failures": count(metrics, "ws_connect_failures"),
                      "ws_unexpected_closes": count(metrics, "ws_unexpected_closes"),
                      "ws_errors": count(metrics, "ws_errors")}
    elif scenario == "rooms":
        members = count(metrics, "room_members_opened")
        accepted = count(metrics, "room_publishes_accepted")
        refused = count(metrics, "room_publishes_refused")
        received = count(metrics, "room_messages_received")
        expected = accepted * members
        lost = max(0.0, expected - received)
        out.client["rooms"] = {"members": members, "accepted": accepted, "expected": expected,
                               "received": received, "loss": lost / expected if expected else 0.0}
        request_row("publishes", accepted + refused)
        open_row("members open at once", members, "opened (room_members_opened)")
        out.rows.append(Comparison("connections per worker, peak", "-", _per_worker(fig.get(
            "connections_peak_by_worker", {}))))
        out.rows.append(Comparison(
            "messages delivered", f"{_n(received)} of {_n(accepted)} x {_n(members)} = {_n(expected)} "
            f"(loss {lost / expected if expected else 0.0:.2%})",
            f"{_n(fig.get('slow_consumers_dropped'))} slow consumers dropped"))
        out.rows.append(Comparison("delivery latency (publish to member)",
                                   _trend_text(trend(metrics, "room_delivery")), "-"))
        out.rows.append(Comparison("publish latency", _trend_text(trend(metrics, "http_req_duration")),
                                   _server_latency(fig, "api_publish")))
        out.errors = {"room_connect_failures": count(metrics, "room_connect_failures"),
                      "room_unexpected_closes": count(metrics, "room_unexpected_closes"),
                      "room_publishes_refused": refused, "messages_lost": lost}
    elif scenario == "longpoll":
        polls = sum(count(metrics, k) for k in ("polls_200", "polls_204", "poll_errors"))
        request_row("polls", polls)
        out.rows.append(Comparison(
            "long polls waiting at once", f"{_n(count(metrics, 'poll_clients_started'))} clients",
            f"{_n(fig.get('long_polls_peak'))} (peak of tornado_long_polls_waiting)"))
        out.rows.append(Comparison(
            "answers", f"{_n(count(metrics, 'polls_200'))} ticks (200), {_n(count(metrics, 'polls_204'))} "
            f"timeouts (204), {_n(count(metrics, 'poll_errors'))} errors", "-"))
        out.rows.append(Comparison("tick delivery latency", _trend_text(trend(metrics, "tick_latency")), "-"))
        out.rows.append(Comparison("poll duration", _trend_text(trend(metrics, "http_req_duration")),
                                   _server_latency(fig, "api_poll")))
        out.errors = {"poll_errors": count(metrics, "poll_errors"),
                      "http_req_failed": float(metrics.get("http_req_failed", {}).get("passes", 0))}
    elif scenario == "http":
        request_row("requests", count(metrics, "http_reqs"))
        out.rows.append(Comparison(
            "latency /api/hello", _trend_text(trend(metrics, "http_req_duration{scenario:hello}")),
            _server_latency(fig, "api_hello")))
        out.rows.append(Comparison(
            "latency /api/sleep", _trend_text(trend(metrics, "http_req_duration{scenario:sleep}")),
            _server_latency(fig, "api_sleep")))
        mean_rate = metrics.get("http_reqs", {}).get("rate")
        out.rows.append(Comparison(
            "requests per second", f"{_n(mean_rate)} (mean over the run)",
            f"{_n(fig.get('requests_per_second_peak'))} (peak)"))
        out.rows.append(Comparison(
            "k6 could not keep the rate",
            f"{_n(count(metrics, 'dropped_iterations'))} dropped iterations", "-"))
        out.errors = {"http_req_failed": float(metrics.get("http_req_failed", {}).get("passes", 0)),
                      "5xx": float(fig.get("requests_5xx_counted") or 0)}
    elif scenario == "nonblocking":
        request_row("requests", count(metrics, "http_reqs"))
        c, s, duration = params["C"], params["S"], params["DURATION"]
        expected = c / (s / 1000.0) if s else math.inf
        sleep_rate = count(metrics, "sleep_requests") / duration
        compute_rate = count(metrics, "compute_requests") / duration
        out.client["throughput"] = {"expected_sleep": expected, "sleep": sleep_rate, "compute": compute_rate}
        out.rows.append(Comparison(
            f"/api/sleep?ms={s}, {c} concurrent",
            f"{sleep_rate:,.1f} req/s = {sleep_rate / expected:.0%} of C/S = {expected:,.1f}",
            f"CPU {_phase(view, 'cpu_by_worker', 0, duration, '{:.0%}')}, "
            f"loop lag p99 {_phase(view, 'loop_lag_p99_by_worker', 0, duration, '{:.3f} s')} "
            "(peaks of any worker)"))
        pause = float(params.get("PAUSE", 3))
        begin, end = duration + pause, 2 * duration + pause
        compute = trend(metrics, "compute_duration") or {}
        out.rows.append(Comparison(
            f"/api/compute?n={params['COMPUTE_N']}, {c} concurrent",
            f"{compute_rate:,.1f} req/s; {_ms(compute.get('med'))} a request (median, waiting included)",
            f"CPU {_phase(view, 'cpu_by_worker', begin, end, '{:.0%}')}, "
            f"loop lag p99 {_phase(view, 'loop_lag_p99_by_worker', begin, end, '{:.3f} s')}"))
        out.rows.append(Comparison("latency /api/sleep", _trend_text(trend(metrics, "sleep_duration")),
                                   _server_latency(fig, "api_sleep")))
        out.rows.append(Comparison("latency /api/compute", _trend_text(trend(metrics, "compute_duration")),
                                   _server_latency(fig, "api_compute")))
        out.errors = {"nonblocking_errors": count(metrics, "nonblocking_errors"),
                      "5xx": float(fig.get("requests_5xx_counted") or 0)}
    elif scenario == "locust":
        totals = client.get("locust", {})
        request_row("HTTP requests", totals.get("http_requests", 0))
        open_row("WebSockets open at once", totals.get("ws_connects", 0), "connected (WS connect)")
        for key, entry in sorted(totals.get("entries", {}).items()):
            percentiles = " / ".join(str(entry.get(k, "-")) for k in ("p50", "p95", "p99"))
            route = {"GET /api/hello": "api_hello", "GET /api/sleep": "api_sleep"}.get(key, "")
            out.rows.append(Comparison(key, f"{_n(entry['requests'])}; p50 / p95 / p99 {percentiles} ms",
                                       _server_latency(fig, route) if route else "-"))
        out.errors = {"locust_failures": float(totals.get("failures", 0)),
                      "5xx": float(fig.get("requests_5xx_counted") or 0)}
    if view is not None:
        out.errors["connections_refused"] = float(fig.get("connections_refused") or 0)
        out.errors["worker_restarts"] = float(fig.get("worker_restarts") or 0)
    return out


# The service's http_request_duration_seconds buckets (service/telemetry/metrics.py), in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _bucket(seconds: float) -> str:
    low = 0.0
    for high in LATENCY_BUCKETS:
        if seconds <= high:
            return f"{low * 1000:g}-{high * 1000:g} ms"
        low = high
    return f"over {low * 1000:g} ms"


def _server_latency(fig: dict[str, Any], handler: str) -> str:
    """The service's own p50 / p95 / p99 of a route over the run, from its histogram: only the
    bucket is known, the value within it is histogram_quantile's linear guess, so both are shown."""
    values = fig.get("latency_by_handler", {}).get(handler)
    if not values:
        return "-"
    keys = [k for k in ("p50", "p95", "p99") if k in values]
    buckets = sorted({_bucket(values[k]) for k in keys}, key=lambda b: float(b.split("-")[0].split()[-1]))
    return (" / ".join(_ms(values[k] * 1000) for k in keys) + f" ({' / '.join(keys)}; "
            f"histogram bucket{'s' if len(buckets) > 1 else ''} {', '.join(buckets)})")


def _s_to_ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _per_worker(values: dict[str, float]) -> str:
    if not values:
        return "-"
    return ", ".join(f"{key.replace('worker=', 'w')}: {v:,.0f}" for key, v in sorted(values.items()))


def _phase(view: ServerView | None, name: str, t0: float, t1: float, fmt: str) -> str:
    """The peak of any series of `name` between t0 and t1 seconds after the run's start."""
    if view is None:
        return "-"
    start = view.figures.get("load_start", view.start)
    values = [v for points in view.series.get(name, {}).values() for t, v in points
              if start + t0 <= t <= start + t1 + 2 * view.step]
    return fmt.format(max(values)) if values else "-"


# -- charts ----------------------------------------------------------------------------------------
def charts(
    view: ServerView, out_dir: Path, title: str, markers: Sequence[tuple[float, str]] = (),
) -> list[Path]:
    """One PNG per entry of CHARTS; x is seconds since the load started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = view.figures.get("load_start", view.start)
    specs: dict[str, tuple[str, list[tuple[str, str, float]]]] = {
        # chart -> (y label, [(series name, legend prefix, scale)])
        "connections": ("open", [("connections_by_worker", "service connections ", 1.0),
                                 ("websockets", "WebSockets (all workers)", 1.0),
                                 ("long_polls", "long polls waiting (all workers)", 1.0),
                                 ("nginx_active", "Nginx active connections", 1.0)]),
        "requests": ("requests / s", [("requests_per_second", "", 1.0)]),
        "latency": ("ms", [("latency_p50", "p50", 1000.0), ("latency_p99", "p99", 1000.0)]),
        "cpu": ("CPU (1 = one core)", [("cpu_by_worker", "", 1.0)]),
        "memory": ("resident memory, MiB", [("memory_by_worker", "", 1 / 2**20)]),
        "loop_lag": ("event-loop lag p99, ms", [("loop_lag_p99_by_worker", "", 1000.0)]),
    }
    subtitles = {
        "connections": "connections and WebSockets per worker, long polls, Nginx",
        "requests": "requests per second by route (service)",
        "latency": "request latency, the scenario's routes (service)",
        "cpu": "CPU per worker",
        "memory": "memory per worker",
        "loop_lag": "event-loop lag per worker",
    }
    written: list[Path] = []
    for chart in CHARTS:
        ylabel, lines = specs[chart]
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
        plotted = 0
        for name, prefix, scale in lines:
            for key, points in sorted(view.series.get(name, {}).items()):
                if not points:
                    continue
                label = (prefix + (key if key != "value" else "")).strip() or name
                label = label.replace("worker=", "worker ").replace("handler=", "")
                xs = [t - t0 for t, _ in points]
                ax.plot(xs, [v * scale for _, v in points], label=label, linewidth=1.4)
                plotted += 1
        for t, text in markers:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.annotate(text, (t, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        va="top", ha="right", color="grey")
        if not plotted:
            ax.text(0.5, 0.5, "no samples in this run", transform=ax.transAxes, ha="center", va="center")
        else:
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("seconds since the load started")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: {subtitles[chart]}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{chart}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# -- summary.md ------------------------------------------------------------------------------------
def per_worker_table(view: ServerView) -> list[str]:
    fig = view.figures
    workers = sorted({*fig.get("connections_peak_by_worker", {}), *fig.get("memory_peak_by_worker", {})})
    if not workers:
        return ["(no per-worker series)"]
    rows = ["| worker | peak connections | peak CPU | memory at start, MiB | peak memory, MiB "
            "| peak loop lag p99 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key in workers:
        def get(name: str, k: str = key) -> float | None:
            value = fig.get(name, {}).get(k)
            return None if value is None else float(value)

        mem0, mem1 = get("memory_start_by_worker"), get("memory_peak_by_worker")
        cpu, lag = get("cpu_peak_by_worker"), get("loop_lag_p99_peak_by_worker")
        rows.append(
            f"| {key.replace('worker=', '')} | {_n(get('connections_peak_by_worker'))} | "
            f"{'-' if cpu is None else f'{cpu:.0%}'} | {'-' if mem0 is None else f'{mem0 / 2**20:,.1f}'} | "
            f"{'-' if mem1 is None else f'{mem1 / 2**20:,.1f}'} | {_ms(_s_to_ms(lag))} |")
    memory = memory_per_connection(view)
    if memory is not None:
        rows += ["", f"Service memory per open connection: about {memory / 1024:,.1f} KiB (peak resident "
                     "memory less memory at start, all workers, over the peak of open connections)."]
    return rows


def memory_per_connection(view: ServerView) -> float | None:
    fig = view.figures
    peak, start = fig.get("memory_peak_by_worker", {}), fig.get("memory_start_by_worker", {})
    connections = fig.get("connections_peak") or 0
    if connections < 100 or not peak:
        return None
    grown = sum(peak.values()) - sum(start.get(k, 0.0) for k in peak)
    return grown / connections if grown > 0 else None


def summary_markdown(
    *, title: str, when: str, target: str, command: str, plan_notes: Sequence[str], outcome: Outcome,
    view: ServerView | None, charts_written: Sequence[Path], files: Sequence[str], notes: Sequence[str] = (),
) -> str:
    verdict = "PASS" if outcome.passed else "FAIL"
    lines = [f"# {title}", "", f"{when}. Target: {target}.", "", f"`{command}`", "",
             f"**Result: {verdict}**"]
    failing = [f"{name} = {value:,.0f}" for name, value in outcome.errors.items() if value]
    failing += [f"threshold failed: {name}" for name in outcome.thresholds_failed]
    failing += [f"mismatch: {row.figure}" for row in outcome.rows if row.ok is False]
    agreed = "(no errors, every threshold met, client and server agree)"
    lines += [f"({'; '.join(failing)})" if failing else agreed]
    if plan_notes:
        lines += ["", "## Sizing (chosen by the runner)", "", *(f"- {note}" for note in plan_notes)]
    lines += ["", "## Client's view and server's view", "",
              "| figure | client | server (Prometheus, over the run) | |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.figure} | {r.client} | {r.server} | {r.verdict} |" for r in outcome.rows]
    lines += ["", "Errors counted (all must be 0): "
              + ", ".join(f"{name} {value:,.0f}" for name, value in outcome.errors.items())]
    if view is not None:
        lines += ["", "## Per worker", "", *per_worker_table(view)]
        nginx = view.figures.get("nginx_active_peak")
        if nginx is not None:
            lines += ["", f"Nginx active connections, peak: {nginx:,.0f}."]
        failed = view.figures.get("scrapes_failed") or 0
        if failed:
            lines += ["", f"**{failed} of Prometheus' scrapes of the service failed** (slowest "
                          f"{view.figures.get('scrape_seconds_peak') or 0:.2f} s, the scrape timeout is the "
                          f"interval, {view.step:g} s): the server's series have gaps there, and a peak "
                          "may be missed. A machine this loaded answers /metrics late too."]
        if view.errors:
            lines += ["", "Queries that failed: " + "; ".join(view.errors)]
    if notes:
        lines += ["", *notes]
    if charts_written:
        lines += ["", "## Charts", ""]
        lines += [f"![{p.stem}]({p.name})" for p in charts_written]
    lines += ["", "## Files", "", *(f"- `{name}`" for name in files), ""]
    return "\n".join(lines)


def series_to_json(series: dict[str, Series]) -> dict[str, list[list[float]]]:
    return {key: [[t, v] for t, v in points] for key, points in series.items()}

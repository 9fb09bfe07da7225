"""The Grafana dashboards: the JSON is what the generator writes, it is well formed, and every query
of every panel returns data from a real Prometheus scraping the real service and a real Nginx.

Grafana itself does not run here, so the proof does what Grafana would: resolve the template
variables with their own queries, substitute them and Grafana's built-in interval variables the
way Grafana does for a Prometheus datasource, and send each query to Prometheus' HTTP API, both
as an instant query (/api/v1/query) and as a range query (/api/v1/query_range).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wsclient
from conftest import ROOT, ServiceProcess, http_request, require_tool
from proxy import Nginx, Prometheus, free_port, wait_for_port

from deploy.grafana import dashboards
from service import __version__
from service.handlers.work import COMPUTE_MAX_N

Start = Callable[..., ServiceProcess]
Panel = dict[str, Any]

DASHBOARD = dashboards.DIRECTORY / "tornado-service.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
RULES = ROOT / "deploy" / "prometheus" / "rules"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCRAPE_INTERVAL = 1.0
HANDLERS = ("api_hello", "not_found", "api_sleep", "api_compute")  # what the load below asks for
ROOM = "chat.lobby"  # of room class "chat" (the service below lists it in ROOM_CLASSES)
MEMBERS = 8  # room members held open, on both workers

# Grafana's built-in interval variables as Grafana computes them for this Prometheus (its
# datasource's timeInterval set to the scrape interval, as provisioning does for the stack) on a
# range this short: $__interval (and the range query's step) is the timeInterval floor, and
# $__rate_interval is max($__interval + timeInterval, 4 * timeInterval).
INTERVAL_S = SCRAPE_INTERVAL
RATE_INTERVAL_S = max(INTERVAL_S + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL)


def load() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def all_panels(board: dict[str, Any]) -> list[Panel]:
    """Every panel, rows and the panels of collapsed rows included."""
    found: list[Panel] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels(board: dict[str, Any]) -> list[Panel]:
    return [p for p in all_panels(board) if p["type"] != "row"]


# -- the generated JSON (tests/test_generate.py checks the committed files) ---------------------------
def test_every_json_file_is_a_dashboard_the_generator_writes() -> None:
    generated = dashboards.render()
    assert DASHBOARD in generated
    assert dashboards.obsolete(generated) == []  # a JSON file without a generator would be removed


def test_check_flag_reports_a_stale_file(tmp_path: Path) -> None:
    assert dashboards.main(["--check", "--dir", str(tmp_path)]) == 1  # missing
    assert dashboards.main(["--dir", str(tmp_path)]) == 0
    assert dashboards.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "tornado-service.json").write_text("{}\n")
    assert dashboards.main(["--check", "--dir", str(tmp_path)]) == 1


# -- structure -------------------------------------------------------------------------------------
def test_dashboard_is_plain_json_for_file_provisioning_and_a_sidecar() -> None:
    board = load()
    assert board["uid"] == "tornado-service" and board["title"] == "Tornado service"
    assert "__inputs" not in board and "__requires" not in board  # not an export made for import
    assert board.get("id") is None  # Grafana assigns it
    assert "${" not in json.dumps(board).replace("${datasource}", ""), "only ${datasource} is a ${} reference"


def test_panels_have_unique_ids_the_datasource_variable_units_and_thresholds() -> None:
    board = load()
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), ids
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)
    for panel in query_panels(board):
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel.get("description"), f"{title}: no description"
        targets = panel["targets"]
        assert targets, f"{title}: no query"
        assert len({t["refId"] for t in targets}) == len(targets) and all(t["refId"] for t in targets), title
        for target in targets:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if panel["type"] in ("timeseries", "stat", "heatmap"):
            assert defaults.get("unit"), f"{title}: no unit"
        if panel["type"] in ("timeseries", "stat"):
            assert defaults["thresholds"]["steps"][0]["value"] is None, f"{title}: no base threshold"
        if panel["type"] == "stat":
            assert all(t.get("instant") for t in targets), f"{title}: a stat reads an instant query"
    units = {p.get("fieldConfig", {}).get("defaults", {}).get("unit") for p in query_panels(board)}
    assert {"reqps", "percentunit", "s", "bytes", "short"} <= units


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query" and job["query"] == "label_values(up, job)"
    assert job["current"]["value"] == "tornado" and job["datasource"] == DATASOURCE
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["query"] == 'label_values(up{job=~"$job"}, instance)'
    assert instance["multi"] and instance["includeAll"] and instance["datasource"] == DATASOURCE
    assert instance["current"]["value"] == ["$__all"]


def test_every_recording_rule_the_dashboard_reads_is_defined() -> None:
    """Names like level:metric:operations must be `record:`ed in deploy/prometheus/rules/."""
    defined = set()
    for path in sorted(RULES.glob("*.yml")):
        defined |= set(re.findall(r"^\s*-?\s*record:\s*['\"]?([\w:]+)", path.read_text(), re.MULTILINE))
    used = set()
    for panel in query_panels(load()):
        for target in panel["targets"]:
            used |= set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", target["expr"]))
    assert used, "the dashboard reads no recording rule"
    assert used <= defined, f"not recorded by {RULES}: {sorted(used - defined)}"


def test_provisioning_files() -> None:
    datasource = (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    for line in ("name: Prometheus", "uid: prometheus", "type: prometheus", "url: http://prometheus:9090",
                 "isDefault: true", "timeInterval: 5s"):
        assert re.search(rf"^\s*-?\s*{re.escape(line)}\s*$", datasource, re.MULTILINE), line
    provider = (PROVISIONING / "dashboards" / "dashboards.yml").read_text()
    for line in ("type: file", "path: /var/lib/grafana/dashboards"):
        assert re.search(rf"^\s*-?\s*{re.escape(line)}\s*$", provider, re.MULTILINE), line
    compose = ROOT / "deploy" / "compose.yaml"
    if compose.exists():  # the provider reads where compose mounts the generated JSON
        assert "./grafana/dashboards:/var/lib/grafana/dashboards" in compose.read_text()
        assert "./grafana/provisioning:/etc/grafana/provisioning" in compose.read_text()


# -- the proof: every query against a real Prometheus ------------------------------------------------
class Api:
    """Prometheus' HTTP API, as Grafana's Prometheus datasource calls it."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params: str | list[str]) -> Any:
        url = f"{self.base}/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in the body
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def label_values(self, variable_query: str) -> list[str]:
        """A `label_values(selector, label)` variable query, as Grafana runs it."""
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable_query)
        assert match, variable_query
        return list(self.get(f"label/{match[2]}/values", **{"match[]": match[1]}))


def regex_escape(value: str) -> str:
    """Grafana's escaping of one value of a multi-value variable for a Prometheus =~ matcher."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m[0], value.replace("\\", "\\\\\\\\"))


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $__range_ms before $__range
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in expr, f"a variable left in {expr!r}"
    return expr


class HeldWebSockets(threading.Thread):
    """WebSockets opened in a loop of their own, held open until `close()`: tickers, an echo, and
    members of ROOM on every worker (REUSE_PORT spreads them; more are opened, a bounded number,
    until each worker has one: X-Worker-Id says where each landed)."""

    def __init__(self, port: int, tickers: int, echoes: int, members: int = 0, workers: int = 2) -> None:
        super().__init__(daemon=True)
        self.port, self.tickers, self.echoes = port, tickers, echoes
        self.members, self.workers = members, workers
        self.member_workers: set[int] = set()
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    async def _hold(self) -> None:
        url = f"ws://127.0.0.1:{self.port}"
        conns = [await wsclient.connect(f"{url}/ws/ticker") for _ in range(self.tickers)]
        echo = await wsclient.connect(f"{url}/ws/echo")
        conns.append(echo)
        for i in range(self.echoes):
            await echo.write_message(f"message {i}")
            assert await asyncio.wait_for(echo.read_message(), 10) == f"message {i}"
        opened = 0
        while self.members and (opened < self.members or len(self.member_workers) < self.workers):
            assert opened < 4 * self.members, f"room members landed on workers {self.member_workers} only"
            member = await wsclient.connect(f"{url}/ws/chat?room={ROOM}")
            conns.append(member)
            self.member_workers.add(int(member.headers["X-Worker-Id"]))
            opened += 1
        self.ready.set()
        while not self.done.is_set():
            await asyncio.sleep(0.05)
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.join(10)


@contextlib.contextmanager
def nginx_exporter(status_port: int) -> Iterator[int]:
    """Debian's prometheus-nginx-exporter (0.11, Go-style flags) on a port of 127.0.0.1."""
    exporter = require_tool("prometheus-nginx-exporter")
    port = free_port()
    proc = subprocess.Popen(
        [exporter, f"-nginx.scrape-uri=http://127.0.0.1:{status_port}/stub_status",
         f"-web.listen-address=127.0.0.1:{port}", "-nginx.retries=5", "-nginx.retry-interval=1s"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_load(port: int, paths: list[str], clients: int = 3) -> None:
    """Each client sends its share of `paths` on one keep-alive connection; every answer is read."""
    failures: list[str] = []

    def client(share: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            for path in share:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status not in (200, 404):
                    failures.append(f"{path}: {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(paths[i::clients],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]


def publish(port: int, data: str) -> int:
    """POST /api/publish to ROOM; the status."""
    body = json.dumps({"data": data}).encode()
    return http_request(port, f"/api/publish?room={ROOM}", "POST", body, 20.0)[0]


@pytest.mark.timeout(90)
def test_every_panel_query_returns_data_from_a_real_prometheus(start_service: Start, tmp_path: Path) -> None:
    rule_files = sorted(RULES.glob("*.yml"))
    assert rule_files, f"no rule files in {RULES}: the dashboard reads recording rules"
    # A long tick interval keeps the long poll waiting for the whole test. REUSE_PORT spreads the
    # room members over both workers; a low publish rate makes a burst of publishes cheap.
    svc = start_service("--tick-interval", "300", "--reuse-port", "--room-classes", "chat",
                        "--room-publish-rate", "1", "--room-publish-burst", "5")
    (tmp_path / "nginx").mkdir()
    nginx = Nginx(tmp_path / "nginx", svc.port).start()
    poll: http.client.HTTPConnection | None = None
    sockets: HeldWebSockets | None = None
    prometheus: Prometheus | None = None
    try:
        with nginx_exporter(nginx.status_port) as exporter_port:
            (tmp_path / "prometheus").mkdir()
            prometheus = Prometheus(
                tmp_path / "prometheus",
                {"tornado": f"127.0.0.1:{svc.port}", "nginx": f"127.0.0.1:{exporter_port}"},
                rule_files=rule_files, scrape_interval=f"{SCRAPE_INTERVAL:g}s",
            ).start()
            api = Api(prometheus.port)
            prometheus.wait_for('up{job="tornado"} == 1')
            prometheus.wait_for('up{job="nginx"} == 1 and on () nginx_up == 1')
            started = time.time()  # the dashboard's time range starts once there are samples
            # Every worker id's restart counter is there at 0 before any restart (declare_workers).
            prometheus.wait_for("count(tornado_worker_restarts_total == 0) == 2")

            # A counter's first sample is its baseline (rate() needs two): let Prometheus see one of
            # each request kind before the load, or the whole load would land in the first sample.
            warm_up = ["/api/hello", "/no/such/page", "/api/sleep?ms=50", "/api/compute?n=1"]
            http_load(nginx.http_port, warm_up, clients=1)
            handlers = "|".join(HANDLERS)
            prometheus.wait_for(f'count(http_requests_total{{handler=~"{handlers}"}}) >= 4')

            # A worker dies and is restarted: the restart panels and a real alert have something to show.
            victim = svc.live_workers()[1]
            seen = len(svc.events)
            os.kill(victim, signal.SIGKILL)  # the worker, not the service: the supervisor restarts it
            svc.wait_for(lambda e: e.get("event") == "worker started" and e.get("worker") == 1,
                         20, after=seen)

            # Load through Nginx: WebSockets held open, a long poll in flight, then plain requests.
            sockets = HeldWebSockets(nginx.http_port, tickers=2, echoes=20, members=MEMBERS)
            sockets.start()
            assert sockets.ready.wait(20) and sockets.error is None, sockets.error
            assert sockets.member_workers == {0, 1}

            # Rooms: with members on both workers every publish crosses the embedded backplane, and
            # the other worker's fan-out is timed. The published and delivered counters appear with
            # the first publish: Prometheus must see it as their baseline before the rest.
            assert publish(nginx.http_port, "warm-up") == 202
            prometheus.wait_for('tornado_room_messages_published_total{room_class="chat"}')
            prometheus.wait_for('tornado_room_messages_delivered_total{room_class="chat"}')
            for i in range(3):  # 4 publishes in all fit ROOM_PUBLISH_BURST, whichever worker takes them
                assert publish(nginx.http_port, f"message {i}") == 202
            # Faster than ROOM_PUBLISH_RATE past the burst: 429s, counted as rate_limited refusals.
            assert 429 in {publish(nginx.http_port, "too fast") for _ in range(20)}
            poll = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=30)
            poll.request("GET", "/api/poll?timeout=120")  # the answer is never read: it stays in flight
            http_load(nginx.http_port, ["/api/hello"] * 300 + ["/no/such/page"] * 30
                      + ["/api/sleep?ms=50"] * 15 + [f"/api/compute?n={COMPUTE_MAX_N}"])

            # What the queries should see once Prometheus has scraped and evaluated the rules again.
            prometheus.wait_for('handler:http_requests:rate1m{handler="api_hello"} > 0')
            prometheus.wait_for('handler_code:http_requests:rate1m{handler="not_found", code="404"} > 0')
            prometheus.wait_for("sum(tornado_long_polls_waiting) >= 1")
            prometheus.wait_for("sum(tornado_websocket_connections_open) >= 3")
            prometheus.wait_for(f"sum(tornado_room_members) >= {MEMBERS}")
            prometheus.wait_for("sum(rate(tornado_room_messages_delivered_total[20s])) > 0")
            prometheus.wait_for("sum(backplane_le:tornado_backplane_latency_seconds_bucket:rate5m) > 0")
            prometheus.wait_for('tornado_room_publishes_rejected_total{reason="rate_limited"}')
            # The compute blocks its worker for most of a second: whatever the 250 ms timer's phase,
            # it fires well over 100 ms late.
            prometheus.wait_for("max(worker:tornado_event_loop_lag_seconds:p99_5m) > 0.1")
            prometheus.wait_for('ALERTS{alertname="TornadoWorkerRestarted", alertstate="firing"}')
            prometheus.wait_for("sum(rate(nginx_http_requests_total[20s])) > 0")
            # A range query's last step lands up to one step before its end: let two steps pass,
            # so the range queries reach the samples the waits above have just seen.
            time.sleep(2 * INTERVAL_S)

            results = run_every_query(api, started)
    finally:
        if poll is not None:
            poll.close()
        if sockets is not None:
            sockets.close()
        if prometheus is not None:
            prometheus.stop()
        nginx.stop()

    # A few panels, read as a person would read them.
    def value(title: str) -> float:
        return float(results[title][0][0]["value"][1])

    def legends(title: str) -> set[str]:
        return {json.dumps(series["metric"], sort_keys=True) for series in results[title][0]}

    def total(title: str) -> float:
        return sum(float(series["value"][1]) for series in results[title][0])

    assert value("Requests/s") > 0
    assert value("Long polls waiting") >= 1
    assert value("Open WebSockets") >= 3
    assert value("Workers alive") == 2
    assert value("Worker restarts (time range)") >= 1
    assert value("Alerts firing") >= 1
    assert value("Event-loop lag p99 (worst worker)") > 0.1  # the /api/compute
    assert value("5xx ratio (5m, worst instance)") == 0
    assert value("Nginx up") == 1
    assert results["Version"][0][0]["metric"]["version"] == __version__
    assert any('"code": "404"' in s and '"not_found"' in s for s in legends("Requests/s by handler and code"))
    assert any("TornadoWorkerRestarted" in s for s in legends("Firing alerts"))
    assert legends("Room messages published/s") == {'{"room_class": "chat"}'}
    assert legends("Room messages delivered/s") == {'{"room_class": "chat"}'}
    assert any('"reason": "rate_limited"' in s for s in legends("Room publishes rejected/s"))
    for target in range(3):  # p50, p95, p99: a number, not NaN (there were fan-outs to time)
        (latency,) = results["Backplane latency p50/p95/p99"][target]
        assert latency["metric"] == {"backplane": "embedded"} and math.isfinite(float(latency["value"][1]))
    backplanes = {(s["metric"]["worker"], s["metric"]["backplane"], s["value"][1])
                  for s in results["Backplane up per worker"][0]}
    assert backplanes == {("0", "embedded", "1"), ("1", "embedded", "1")}
    assert total("Room members per worker") >= MEMBERS
    assert total("Rooms active per worker") == 2  # the one room, on each worker
    assert total("Slow room subscribers dropped/s") == 0  # the flat 0 until a first drop


def run_every_query(api: Api, started: float) -> dict[str, list[list[dict[str, Any]]]]:
    """Every target of every panel, instant and range; title -> each target's instant result."""
    board = load()
    now = time.time()
    # Template variables resolved with their own queries, then formatted as Grafana does.
    templating = {v["name"]: v for v in board["templating"]["list"]}
    jobs = api.label_values(templating["job"]["query"])
    assert "tornado" in jobs and "nginx" in jobs, jobs
    job = templating["job"]["current"]["value"]
    instances = api.label_values(substitute(templating["instance"]["query"], {"job": job}))
    assert len(instances) == 1, instances  # All: every value, each regex-escaped, joined with |
    escaped = [regex_escape(i) for i in instances]
    instance = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    range_s = math.ceil(now - started)
    variables = {
        "job": job, "instance": instance,
        "__interval": f"{INTERVAL_S:g}s", "__interval_ms": f"{INTERVAL_S * 1000:g}",
        "__rate_interval": f"{RATE_INTERVAL_S:g}s",
        "__range": f"{range_s}s", "__range_s": str(range_s), "__range_ms": str(range_s * 1000),
    }
    results: dict[str, list[list[dict[str, Any]]]] = {}
    empty: list[str] = []
    for panel in query_panels(board):
        instant_results = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            instant = api.get("query", query=expr, time=f"{now:.3f}")
            ranged = api.get("query_range", query=expr, start=f"{started:.3f}", end=f"{now:.3f}",
                             step=f"{INTERVAL_S:g}")
            assert instant["resultType"] == "vector" and ranged["resultType"] == "matrix", expr
            if not instant["result"]:
                empty.append(f"{panel['title']} [{target['refId']}] instant: {expr}")
            if not ranged["result"]:
                empty.append(f"{panel['title']} [{target['refId']}] range: {expr}")
            instant_results.append(instant["result"])
        results[panel["title"]] = instant_results
    assert not empty, "queries without data:\n" + "\n".join(empty)
    return results

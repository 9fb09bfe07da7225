"""The Prometheus rules of deploy/prometheus/: valid, unit-tested, documented, and true to the service.

promtool checks the syntax and runs the unit tests of deploy/prometheus/tests/. The rules are
then loaded into a real Prometheus, whose rules API is what this module reads them from (the
same parser production uses, and no YAML library needed): each alert must carry a severity, a
summary, a templated description and a runbook anchor that README.md really has. Last, the
rules run against the real service: every recording rule yields series with `job` and
`instance`, the backplane series carry the labels the backplane alerts group by, and a SIGKILLed
worker raises TornadoWorkerRestarted (which needs the restart counter to exist at 0 before the
first restart).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ServiceProcess, require_tool
from proxy import Prometheus

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS_DIR / "rules" / "recording.yml", PROMETHEUS_DIR / "rules" / "alerts.yml"]
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
README = ROOT / "README.md"
SEVERITIES = {"critical", "warning"}

# The names a dashboard is built on: renaming one breaks it, so they are pinned here.
RECORDING_RULES = {
    "handler_code:http_requests:rate1m",
    "handler:http_requests:rate1m",
    "handler:http_requests_errors:ratio_rate5m",
    "job:http_requests_errors:ratio_rate5m",
    "handler_le:http_request_duration_seconds_bucket:rate5m",
    "handler:http_request_duration_seconds:p50_5m",
    "handler:http_request_duration_seconds:p95_5m",
    "handler:http_request_duration_seconds:p99_5m",
    "job:http_request_duration_seconds:p99_5m",
    "worker:tornado_event_loop_lag_seconds:p99_5m",
    "backplane_le:tornado_backplane_latency_seconds_bucket:rate5m",
    "backplane:tornado_backplane_latency_seconds:p95_5m",
}

Start = Callable[..., ServiceProcess]
Rule = dict[str, Any]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_rule_files_are_valid() -> None:
    checked = promtool("check", "rules", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=[path.name for path in UNIT_TESTS])
def test_promtool_unit_tests_pass(unit_test: Path) -> None:
    tested = promtool("test", "rules", str(unit_test))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_there_are_unit_tests_for_both_rule_files() -> None:
    assert {path.name for path in UNIT_TESTS} >= {"recording_test.yml", "alerts_test.yml"}


# -- the rules as Prometheus loads them ------------------------------------------------------------
class RulesPrometheus(Prometheus):
    """The tests' Prometheus (tests/proxy.py), with deploy/prometheus/rules/ loaded."""

    def __init__(self, workdir: Path, scrape: dict[str, str]) -> None:
        super().__init__(workdir, scrape, rule_files=RULE_FILES)

    def api(self, path: str, timeout: float = 30.0) -> Any:
        """GET /api/v1/<path>'s data, retried while Prometheus still opens its storage (503)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=10) as r:
                    body = json.load(r)
                assert body["status"] == "success", body
                return body["data"]
            except (urllib.error.HTTPError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def rules(self) -> list[Rule]:
        """Every rule of every group, once the rule manager has loaded them."""
        deadline = time.monotonic() + 30
        while True:
            rules = [rule for group in self.api("rules")["groups"] for rule in group["rules"]]
            if rules or time.monotonic() > deadline:
                return rules
            time.sleep(0.25)


@pytest.fixture
def prometheus_with_rules(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], RulesPrometheus]]:
    started: list[RulesPrometheus] = []

    def start(scrape: dict[str, str]) -> RulesPrometheus:
        require_tool("prometheus")
        prometheus = RulesPrometheus(tmp_path, scrape)
        started.append(prometheus)
        return prometheus.start()

    yield start
    for prometheus in started:
        prometheus.stop()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def readme_anchors() -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            anchors.add(github_anchor(match.group(1)))
    return anchors


def test_github_anchor_rules() -> None:
    assert github_anchor("Alerts and runbook") == "alerts-and-runbook"
    assert github_anchor("TornadoHigh5xxRatio") == "tornadohigh5xxratio"
    assert github_anchor("Nginx and the local stack") == "nginx-and-the-local-stack"
    assert github_anchor("`make stack`: what it runs") == "make-stack-what-it-runs"


def test_every_alert_is_labelled_annotated_and_in_the_runbook(
    prometheus_with_rules: Callable[[dict[str, str]], RulesPrometheus],
) -> None:
    rules = prometheus_with_rules({}).rules()
    alerts = [rule for rule in rules if rule["type"] == "alerting"]
    recorded = {rule["name"] for rule in rules if rule["type"] == "recording"}
    assert recorded >= RECORDING_RULES
    assert len(alerts) >= 8
    anchors = readme_anchors()
    assert "alerts-and-runbook" in anchors
    unit_tests = "\n".join(path.read_text() for path in UNIT_TESTS)
    for alert in alerts:
        name, labels, annotations = alert["name"], alert["labels"], alert["annotations"]
        assert labels.get("severity") in SEVERITIES, name
        assert annotations.get("summary"), name
        assert "{{" in annotations.get("description", ""), f"{name}: the description should show values"
        runbook = re.fullmatch(r"README\.md#([\w-]+)", annotations.get("runbook", ""))
        assert runbook, f"{name}: runbook annotation should be README.md#<anchor>"
        assert runbook.group(1) == name.lower(), f"{name}: the runbook section is named after the alert"
        assert runbook.group(1) in anchors, f"{name}: README.md has no heading for #{runbook.group(1)}"
        assert f"alertname: {name}\n" in unit_tests, f"{name} has no promtool unit test"
    for name in recorded:
        assert f"expr: {name}" in unit_tests, f"{name} has no promtool unit test"


# -- the rules over the real service ---------------------------------------------------------------
def test_rules_hold_over_the_real_service_and_a_restart_alerts(
    start_service: Start, prometheus_with_rules: Callable[[dict[str, str]], RulesPrometheus],
) -> None:
    """Names and labels in the rules are the ones the service exports; the first restart alerts."""
    svc = start_service()
    instance = f"127.0.0.1:{svc.port}"
    prometheus = prometheus_with_rules({"tornado": instance})  # scrapes and evaluates every second
    svc.request("/api/hello")
    # A series' first sample is its baseline: only requests after it make a rate, and a ratio.
    prometheus.wait_for('http_requests_total{handler="api_hello"}')
    for _ in range(5):
        svc.request("/api/hello")

    for name in sorted(RECORDING_RULES):
        result = prometheus.wait_for(name)
        assert all(s["metric"]["job"] == "tornado" and s["metric"]["instance"] == instance for s in result), (
            name, result)
    lag = prometheus.wait_for("worker:tornado_event_loop_lag_seconds:p99_5m")
    assert sorted(s["metric"]["worker"] for s in lag) == ["0", "1"]
    # The backplane alerts' labels: a gauge per worker and backplane, buckets per backplane (at 0
    # from each worker's start, so a quiet bus has a rate of 0, not no series).
    up = prometheus.wait_for("tornado_backplane_up")
    assert sorted((s["metric"]["worker"], s["metric"]["backplane"], s["value"][1]) for s in up) == [
        ("0", "embedded", "1"), ("1", "embedded", "1")]
    buckets = prometheus.wait_for('backplane_le:tornado_backplane_latency_seconds_bucket:rate5m{le="+Inf"}')
    assert [s["metric"]["backplane"] for s in buckets] == ["embedded"]
    ratio = prometheus.wait_for('handler:http_requests_errors:ratio_rate5m{handler="api_hello"}')
    assert float(ratio[0]["value"][1]) == 0  # traffic and no 5xx: 0, not "no data"

    # The restart counters must have been scraped at 0 before the restart, or increase() is blind.
    prometheus.wait_for('count_over_time(tornado_worker_restarts_total{worker="0"}[1m]) >= 2')
    victim, victim_pid = next(iter(svc.live_workers().items()))
    mark = len(svc.events)
    os.kill(victim_pid, signal.SIGKILL)
    svc.wait_for(lambda e: e.get("event") == "worker started" and e["worker"] == victim, after=mark)
    firing = prometheus.wait_for('ALERTS{alertname="TornadoWorkerRestarted", alertstate="firing"}')
    assert [(s["metric"]["worker"], s["metric"]["instance"]) for s in firing] == [(str(victim), instance)]

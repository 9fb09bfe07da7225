"""The Prometheus rules of deploy/prometheus/: valid, unit-tested, documented, and true to the service.

promtool checks the syntax and runs the unit tests of deploy/prometheus/tests/. The rules are
then loaded into a real Prometheus, whose rules API is what this module reads them from (the
same parser production uses, and no YAML library needed): each alert must carry a severity, a
summary, a templated description and a runbook_url naming a section docs/runbook.md really has,
and that page has one section per alert and no other. Last, the
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
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, ServiceProcess, require_tool
from proxy import Prometheus

from deploy import runbook

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS_DIR / "rules" / "recording.yml", PROMETHEUS_DIR / "rules" / "alerts.yml"]
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTS = PROMETHEUS_DIR / "rules" / "alerts.yml"
RUNBOOK = ROOT / runbook.DEFAULT_BASE
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


def mkdocs_anchor(heading: str) -> str:
    """The id MkDocs (Python-Markdown's toc) gives a heading: ASCII, punctuation dropped, lowercase,
    runs of spaces and hyphens to one hyphen."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def runbook_headings(level: int) -> list[str]:
    """The text of docs/runbook.md's headings of one level, outside fenced code, in page order."""
    headings: list[str] = []
    fenced = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.fullmatch(r"(#{1,6}) (.+)", line)) and len(match.group(1)) == level:
            headings.append(match.group(2).strip())
    return headings


def alert_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def test_mkdocs_anchor_rules() -> None:
    assert mkdocs_anchor("Runbook") == "runbook"
    assert mkdocs_anchor("TornadoHigh5xxRatio") == "tornadohigh5xxratio"
    assert mkdocs_anchor("Nginx and the local stack") == "nginx-and-the-local-stack"
    assert mkdocs_anchor("`make stack`: what it runs") == "make-stack-what-it-runs"
    assert mkdocs_anchor("Rooms - the backplane") == "rooms-the-backplane"


def test_the_runbook_has_one_section_per_alert_and_no_other() -> None:
    """A section for an alert that was renamed or removed would send on-call to the wrong advice."""
    assert runbook_headings(1) == ["Runbook"]
    names, sections = alert_names(), runbook_headings(2)
    assert len(names) >= 8
    assert sorted(sections) == sorted(names), (
        f"no section: {sorted(set(names) - set(sections))}, no alert: {sorted(set(sections) - set(names))}")
    assert len(set(sections)) == len(sections), "an alert has two sections"
    assert runbook_headings(3) == [], "the runbook's sections are alerts: a subsection would look like one"


def test_every_runbook_url_names_its_own_section() -> None:
    """Checked on the file too, because the test over Prometheus' rules API needs a prometheus binary."""
    names = alert_names()
    assert runbook.anchors(ALERTS.read_text()) == [name.lower() for name in names]
    anchors = {mkdocs_anchor(heading) for heading in runbook_headings(2)}
    assert {name.lower() for name in names} <= anchors


def test_with_base_points_every_runbook_url_at_the_published_page() -> None:
    text = ALERTS.read_text()
    published = runbook.with_base(text, "https://docs.example.org/runbook/")
    assert runbook.with_base(text, runbook.DEFAULT_BASE) == text
    assert published.count("runbook_url: https://docs.example.org/runbook/#") == len(alert_names())
    assert "docs/runbook.md" not in published.replace("# docs/runbook.md", "").split("groups:", 1)[1]
    # Only the annotations changed, and they read back as the address, anchors kept.
    changed = [(a, b) for a, b in zip(text.splitlines(), published.splitlines(), strict=True) if a != b]
    assert len(changed) == len(alert_names()) and all("runbook_url" in a for a, _ in changed)
    loaded = [rule["annotations"]["runbook_url"] for group in yaml.safe_load(published)["groups"]
              for rule in group["rules"] if "alert" in rule]
    assert loaded == [f"https://docs.example.org/runbook/#{name.lower()}" for name in alert_names()]
    assert runbook.with_base(published, runbook.DEFAULT_BASE) == text


@pytest.mark.parametrize("base", ["https://x.example/a b/", "https://x.example/#top", ""])
def test_with_base_refuses_a_base_that_is_no_page_address(base: str) -> None:
    with pytest.raises(ValueError, match="runbook base"):
        runbook.with_base(ALERTS.read_text(), base)


def test_with_base_quotes_what_yaml_would_misread_and_keeps_quotes() -> None:
    text = "  annotations:\n    runbook_url: 'docs/runbook.md#a'\n    runbook_url: docs/runbook.md#b\n"
    rewritten = runbook.with_base(text, "@docs/x")
    assert rewritten == '  annotations:\n    runbook_url: "@docs/x#a"\n    runbook_url: "@docs/x#b"\n'
    assert runbook.runbook_url("tornadoworkerdown") == "docs/runbook.md#tornadoworkerdown"
    with pytest.raises(ValueError, match="no runbook_url"):
        runbook.with_base("runbook: README.md#a\n", "https://x.example/")


def test_every_alert_is_labelled_annotated_and_in_the_runbook(
    prometheus_with_rules: Callable[[dict[str, str]], RulesPrometheus],
) -> None:
    rules = prometheus_with_rules({}).rules()
    alerts = [rule for rule in rules if rule["type"] == "alerting"]
    recorded = {rule["name"] for rule in rules if rule["type"] == "recording"}
    assert recorded >= RECORDING_RULES
    assert len(alerts) >= 8
    anchors = {mkdocs_anchor(heading) for heading in runbook_headings(2)}
    unit_tests = "\n".join(path.read_text() for path in UNIT_TESTS)
    for alert in alerts:
        name, labels, annotations = alert["name"], alert["labels"], alert["annotations"]
        assert labels.get("severity") in SEVERITIES, name
        assert annotations.get("summary"), name
        assert "{{" in annotations.get("description", ""), f"{name}: the description should show values"
        assert "runbook" not in annotations, f"{name}: the annotation is runbook_url now"
        url = re.fullmatch(rf"{re.escape(runbook.DEFAULT_BASE)}#([\w-]+)", annotations.get("runbook_url", ""))
        assert url, f"{name}: runbook_url annotation should be {runbook.DEFAULT_BASE}#<anchor>"
        assert url.group(1) == name.lower(), f"{name}: the runbook section is named after the alert"
        assert url.group(1) in anchors, f"{name}: {runbook.DEFAULT_BASE} has no heading for #{url.group(1)}"
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

"""The load tests, small: every scenario once through the real stack, checked by what the runner wrote.

Each test runs `python -m loadtests.run SCENARIO` as a user would (it starts the local stack on
free loopback ports, runs k6 or Locust, reads Prometheus, stops everything) with a few hundred
clients for a few seconds, then reads the report folder: the run passed with zero errors, every
chart is a non-empty PNG, summary.md and k6-summary.json exist, and the server's figures agree
with the client's (sockets opened against the peak of the WebSocket gauge, requests answered
against the increase of http_requests_total). No timing is asserted. The sizing plan is checked
on its own against this machine's measured limits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, require_tool

from loadtests.plan import Limits, make_plan
from loadtests.report import CHARTS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def tools() -> None:
    for tool in ("nginx", "prometheus", "openssl", "k6", "locust"):
        require_tool(tool)


def run(tmp_path: Path, *args: str) -> dict[str, Any]:
    """The runner, to completion; its report.json, once no process of the run is left."""
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.run", *args, "--reports", str(reports)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150, check=False,
    )
    output = proc.stdout.decode(errors="replace")
    folders = list(reports.glob("*-*")) if reports.exists() else []
    assert len(folders) == 1, output[-4000:]
    folder = folders[0]
    assert proc.returncode == 0, f"{output[-4000:]}\n{(folder / 'summary.md').read_text()[-3000:]}"
    result: dict[str, Any] = json.loads((folder / "report.json").read_text())
    assert result["stack_dir"]
    marks = (str(tmp_path), result["stack_dir"])  # in the command lines of k6, Locust and the stack's
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(mark in part for part in p.info["cmdline"] or [] for mark in marks)]
    assert not leftovers, f"processes of the run still alive: {leftovers}"
    assert not Path(result["stack_dir"]).exists()
    result["folder"] = folder
    result["output"] = output
    summary = (folder / "summary.md").read_text()
    assert "**Result: PASS**" in summary
    for chart in CHARTS:
        png = folder / f"{chart}.png"
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000, chart
        assert f"![{chart}]({chart}.png)" in summary
    assert result["passed"] is True
    assert not any(result["errors"].values()), result["errors"]
    assert result["thresholds_failed"] == []
    assert "stack running" in (folder / "stack.log").read_text()
    figures = result["server"]["figures"]
    assert figures["workers_alive"] == result["plan"]["service_workers"]
    assert figures["connections_refused"] == 0 and figures["worker_restarts"] == 0
    for name in ("connections_by_worker", "cpu_by_worker", "memory_by_worker", "loop_lag_p99_by_worker",
                 "requests_per_second", "nginx_active"):
        assert result["server"]["series"][name], f"no {name} series from Prometheus"
    return result


def k6_metrics(result: dict[str, Any]) -> dict[str, Any]:
    assert (result["folder"] / "k6-summary.json").exists()
    metrics: dict[str, Any] = result["client"]["k6"]
    return metrics


def test_websockets_smoke(tmp_path: Path) -> None:
    """300 sockets held 5 s, spread over two k6 processes from two loopback source addresses."""
    result = run(tmp_path, "websockets", "--n", "300", "--d", "5", "--rate", "300", "--sockets-per-k6", "150")
    folder = result["folder"]
    plan = result["plan"]
    assert [p["local_ips"] for p in plan["k6"]] == ["127.0.0.2", "127.0.0.3"]
    assert (folder / "k6-summary-1.json").exists() and (folder / "k6-summary-2.json").exists()
    raw = [json.loads((folder / f"k6-summary-{i}.json").read_text())["metrics"] for i in (1, 2)]
    assert [m["ws_sockets_opened"]["count"] for m in raw] == [150, 150]
    metrics = k6_metrics(result)
    assert metrics["ws_sockets_opened"]["count"] == 300
    assert metrics["ws_connect_failures"]["count"] == 0
    assert metrics["ws_unexpected_closes"]["count"] == 0
    assert metrics["ticks_received"]["count"] > 0 and metrics["tick_latency"]["count"] > 0
    # the ticks of the hold (from 1 s of ramp + 2 s of margin on) only: some, and fewer than in all
    assert 0 < metrics["tick_latency_held"]["count"] < metrics["tick_latency"]["count"]
    figures = result["server"]["figures"]
    assert figures["websockets_peak"] == 300  # every socket open at once, as the client says
    assert sum(figures["connections_peak_by_worker"].values()) >= 300
    assert figures["nginx_active_peak"] >= 300
    assert "about" in (folder / "summary.md").read_text()  # memory per connection is reported


def test_http_smoke(tmp_path: Path) -> None:
    result = run(tmp_path, "http", "--rate", "100", "--d", "5")
    metrics = k6_metrics(result)
    sent = metrics["http_reqs"]["count"]
    assert sent > 100
    assert metrics["http_req_failed"]["passes"] == 0
    assert metrics["http_reqs{scenario:sleep}"]["count"] > 0
    assert result["server"]["figures"]["requests_counted"] == sent
    assert set(result["server"]["figures"]["latency_by_handler"]) == {"api_hello", "api_sleep"}


def test_longpoll_smoke(tmp_path: Path) -> None:
    result = run(tmp_path, "longpoll", "--n", "50", "--d", "4", "--rate", "50")
    metrics = k6_metrics(result)
    polls = sum(metrics.get(name, {}).get("count", 0) for name in ("polls_200", "polls_204", "poll_errors"))
    assert metrics["polls_200"]["count"] >= 50 and metrics["tick_latency"]["count"] > 0
    assert metrics["poll_errors"]["count"] == 0
    figures = result["server"]["figures"]
    assert figures["requests_counted"] == polls
    assert 0 < figures["long_polls_peak"] <= 50


def test_rooms_smoke_over_redis(tmp_path: Path) -> None:
    """One room's members over two k6 processes and both workers, Redis as the backplane: every
    member gets every accepted publish (the two processes' publishers together make R a second)."""
    redis = tmp_path / "redis-port"
    with socket.socket() as sock:  # a free port for the stack's redis-server
        sock.bind(("127.0.0.1", 0))
        redis.write_text(str(sock.getsockname()[1]))
    result = run(tmp_path, "rooms", "--n", "200", "--d", "3", "--rate", "200", "--sockets-per-k6", "100",
                 "--env", "R=10", "--broadcast-url", f"redis://127.0.0.1:{redis.read_text()}/0")
    assert "redis" in (result["folder"] / "stack.log").read_text()
    metrics = k6_metrics(result)
    assert metrics["room_members_opened"]["count"] == 200
    accepted = metrics["room_publishes_accepted"]["count"]
    assert accepted >= 10
    assert result["client"]["rooms"]["loss"] == 0
    assert metrics["room_messages_received"]["count"] == accepted * 200
    figures = result["server"]["figures"]
    assert figures["requests_counted"] == accepted  # every publish counted under api_publish
    assert figures["websockets_peak"] == 200


def test_nonblocking_smoke(tmp_path: Path) -> None:
    result = run(tmp_path, "nonblocking", "--n", "20", "--d", "3", "--env", "PAUSE=1",
                 "--env", "COMPUTE_N=100000")
    metrics = k6_metrics(result)
    assert metrics["sleep_requests"]["count"] > 0 and metrics["compute_requests"]["count"] > 0
    assert metrics["nonblocking_errors"]["count"] == 0
    assert result["server"]["figures"]["requests_counted"] == metrics["http_reqs"]["count"]
    throughput = result["client"]["throughput"]
    assert throughput["expected_sleep"] == 200.0  # C / S: 20 / 0.1 s
    assert throughput["sleep"] > 0 and throughput["compute"] > 0


def test_locust_smoke(tmp_path: Path) -> None:
    """Both user classes, headless, a master and two workers."""
    result = run(tmp_path, "locust", "--n", "10", "--d", "5", "--rate", "10", "--locust-workers", "2")
    folder = result["folder"]
    logs = ("locust.log", "locust1.log", "locust2.log")  # the master's and each worker's
    for name in ("locust.html", "locust_stats.csv", "locust.json", *logs):
        assert (folder / name).stat().st_size > 0, name
    totals = result["client"]["locust"]
    assert totals["failures"] == 0
    assert totals["http_requests"] > 0 and totals["ticks"] > 0
    assert totals["ws_connects"] == 5  # half of the 10 users are TickerUser (weights 1:1)
    figures = result["server"]["figures"]
    assert figures["requests_counted"] == totals["http_requests"]
    assert figures["websockets_peak"] == totals["ws_connects"]


def test_plan_spreads_load_within_the_limits() -> None:
    """The sizing for the issue's headline runs, on this machine's limits: no process past its
    open files, no source/destination pair past its ports, and the Nginx hop named as the limit."""
    limits = Limits(open_files=20_000, ports=28_232, cores=2)
    plan = make_plan("websockets", 20_000, 500, limits, loopback=True)
    assert not plan.errors
    assert len(plan.k6) == 3 and len({p.local_ips for p in plan.k6}) == 3
    assert all(p.clients < limits.open_files - 1000 for p in plan.k6)
    assert sum(p.clients for p in plan.k6) == 20_000
    assert plan.nginx_workers >= 3
    per_nginx_worker = 2 * 20_000 / plan.nginx_workers
    assert per_nginx_worker < plan.nginx_worker_connections <= limits.open_files
    assert 20_000 / plan.service_workers < plan.max_connections <= limits.open_files - 256

    assert plan.nginx_upstream_sources == "127.0.0.201,127.0.0.202"
    assert plan.nginx_rlimit_nofile >= 2 * plan.nginx_worker_connections

    through_nginx = make_plan("websockets", 50_000, 500, limits, loopback=True)
    assert not through_nginx.errors
    assert len(through_nginx.nginx_upstream_sources.split(",")) == 5  # 12,000 ports each
    assert 2 * 50_000 / through_nginx.nginx_workers < through_nginx.nginx_worker_connections
    direct = make_plan("websockets", 50_000, 500, limits, loopback=True, through_nginx=False)
    assert not direct.errors
    assert direct.service_workers >= 4 and 50_000 / direct.service_workers < direct.max_connections
    assert len({p.local_ips for p in direct.k6}) == len(direct.k6) >= 6

    small = make_plan("http", 0, 100, Limits.of_this_machine(), loopback=True)
    assert len(small.k6) == 1 and small.k6[0].local_ips == "" and not small.errors

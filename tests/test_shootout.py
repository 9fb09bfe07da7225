"""The shootout (loadtests/shootout.py): every peer speaks the one protocol, and a small real run
(two contestants, two broadcast steps, one HTTP round) writes a complete report. No timing and no
ratio is asserted: only that the figures exist, add up and count no failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import wsclient
from conftest import ROOT, require_tool

from loadtests import shootout

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:1234/api/hello
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.10ms    1.20ms  30.00ms   90.00%
  Latency Distribution
     50%    4.90ms
     75%    5.50ms
     90%    6.20ms
     99%   12.34ms
  9000 requests in 2.00s, 1.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 3
Requests/sec:   4500.00
Transfer/sec:    750.00KB
"""


def test_wrk_output_is_parsed() -> None:
    figures = shootout.parse_wrk(WRK_OUTPUT)
    assert figures == {"rps": 4500.0, "p99_ms": pytest.approx(12.34), "requests": 9000.0, "non_2xx": 3.0,
                       "socket_errors": 2.0, "timeouts": 7.0}


def test_k6_summaries_merge_into_one_step() -> None:
    def summary(opened: int, p95: float, failures: int = 0, closes: int = 0) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "ws_sockets_opened": {"count": opened}, "ticks_received": {"count": opened * 3},
            "tick_latency": {"med": p95 / 2, "p(95)": p95, "max": p95 * 2},
        }
        if failures:
            metrics["ws_connect_failures"] = {"count": failures}
        if closes:
            metrics["ws_unexpected_closes"] = {"count": closes}
            metrics["ws_unexpected_closes{code:1006}"] = {"count": closes}
        return {"metrics": metrics}

    good = shootout.merge_k6(200, [summary(100, 40.0), summary(100, 60.0)], 500)
    assert good["opened"] == 200 and good["failures"] == 0 and good["p95_ms"] == 60.0 and good["passed"]
    slow = shootout.merge_k6(200, [summary(100, 40.0), summary(100, 600.0)], 500)
    assert slow["failures"] == 0 and not slow["passed"]
    broken = shootout.merge_k6(300, [summary(100, 40.0, failures=50, closes=2), summary(100, 40.0)], 500)
    # 50 failed to connect, 2 closed under us, and 50 more never even tried: all count
    assert broken["failures"] == 50 + 2 + 100 and broken["unexpected_close_codes"] == {"1006": 2}
    assert not broken["passed"]
    assert not shootout.merge_k6(10, [], 500)["passed"]  # no summary: nothing proven


def test_clients_are_spread_over_k6_processes() -> None:
    assert shootout.split_clients(1000, 6000) == [1000]
    assert shootout.split_clients(13000, 6000) == [4334, 4333, 4333]
    assert sum(shootout.split_clients(18001, 6000)) == 18001


def test_contestants_are_named_with_worker_counts() -> None:
    found = shootout.parse_contestants("service:1,service:2,node-ws", "broadcast", 1)
    assert [(c.key, c.workers) for c in found] == [("service:1", 1), ("service:2", 2), ("node-ws", 1)]
    with pytest.raises(Exception, match="flask"):
        shootout.parse_contestants("flask", "broadcast", 1)  # no WebSockets on a sync worker
    with pytest.raises(Exception, match="twice"):
        shootout.parse_contestants("aiohttp,aiohttp:1", "broadcast", 1)


def _needs(peer: shootout.Peer) -> None:
    if peer.needs and require_tool("node"):
        missing = [need for need in peer.needs if not (ROOT / need).exists()]
        if missing:
            message = f"{missing} not installed (make test runs npm ci in loadtests/peers)"
            if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
                pytest.fail(message)
            pytest.skip(message)


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        assert answer.status == 200
        return json.loads(answer.read())


async def _ticks(port: int, count: int) -> list[dict[str, Any]]:
    conn = await wsclient.connect(f"ws://127.0.0.1:{port}/ws/ticker")
    try:
        ticks: list[dict[str, Any]] = []
        while len(ticks) < count:
            message = await asyncio.wait_for(conn.read_message(), 10)
            assert isinstance(message, str)
            ticks.append(json.loads(message))
        return ticks
    finally:
        conn.close()


@pytest.mark.parametrize("name", [peer.name for peer in shootout.PEER_LIST])
def test_every_peer_speaks_the_protocol(name: str, tmp_path: Path) -> None:
    peer = shootout.PEERS_BY_NAME[name]
    _needs(peer)
    contestant = shootout.Contestant(peer, 2 if peer.prefork else 1)
    with shootout.serving(contestant, 0.2, tmp_path / "server.log") as server:
        group = server.proc.pid
        assert _get_json(server.port, "/api/hello") == {"message": "hello world"}
        assert _get_json(server.port, "/api/sleep?ms=20")
        if peer.broadcast:
            ticks = wsclient.run(_ticks(server.port, 3))
            assert all(t["type"] == "tick" and isinstance(t["ts"], float) and "worker" in t for t in ticks)
            seqs = [t["seq"] for t in ticks]
            assert seqs == list(range(seqs[0], seqs[0] + 3))
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # every process of the peer is gone
    assert "not installed" not in peer.version()


def _marked(marker: str) -> list[int]:
    """Processes that inherited the smoke run's environment marker (its servers, k6, wrk)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get("SHOOTOUT_TEST_MARKER") == marker:
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(300)
def test_small_shootout_writes_a_complete_report(tmp_path: Path) -> None:
    require_tool("k6")
    require_tool("wrk")
    out = tmp_path / "report"
    marker = uuid.uuid4().hex
    argv = [
        sys.executable, "-m", "loadtests.shootout", "--out", str(out), "--budget", "10", "--settle", "0.2",
        "--contestants", "service:1,aiohttp", "--steps", "100,200", "--hold", "3", "--rate", "200",
        "--keep-going", "--http-contestants", "service,flask", "--http-rounds", "1", "--http-seconds", "2",
        "--sleep-concurrency", "5",
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "SHOOTOUT_TEST_MARKER": marker},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _marked(marker), "the shootout left processes behind"

    record = json.loads((out / "results.json").read_text())
    broadcast = record["broadcast"]
    assert set(broadcast) == {"service:1", "aiohttp:1"}
    for result in broadcast.values():
        assert [step["clients"] for step in result["steps"]] == [100, 200], result
        for step in result["steps"]:
            assert "error" not in step, step
            assert step["opened"] == step["clients"] and step["failures"] == 0, step
            assert step["connect_failures"] == 0 and step["unexpected_closes"] == 0, step
            assert step["ticks_received"] > 0 and step["p95_ms"] is not None, step
            assert step["rss_mb_peak"] > 0, step
    http = record["http"]
    assert set(http) == {"service:1", "flask:1"}
    for result in http.values():
        assert not result["errors"], result
        for name in ("hello", "sleep"):
            assert len(result["rounds"][name]) == 1 and result[name]["rps"] > 0, result
            assert result[name]["errors"] == 0, result
    assert http["service:1"]["hello"]["ratio"] == 1.0

    assert record["charts"] == ["broadcast-latency.png", "http.png"]
    for chart in record["charts"]:
        data = (out / chart).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    markdown = (out / "results.md").read_text()
    for label in ("this service, 1 worker", "aiohttp (gunicorn, uvloop worker), 1 worker",
                  "Flask (gunicorn, sync workers), 1 worker"):
        assert label in markdown
    assert "same machine" in json.dumps(record["machine"])

"""Metrics summed over every worker, and the logs that let one request be followed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import wsclient
from conftest import ServiceProcess
from metrics_client import Scrape, eventually, scrape

Start = Callable[..., ServiceProcess]


def test_request_counts_sum_over_workers_whichever_answers(start_service: Start) -> None:
    # SO_REUSEPORT spreads new connections over the workers by hash; with one shared socket an
    # idle machine may hand every connection to the same worker, and this test needs both.
    svc = start_service("--reuse-port")
    n = 40
    answered_by = {svc.request("/api/hello")[1]["x-worker-id"] for _ in range(n)}
    assert len(answered_by) == 2, "requests should have been spread over both workers"
    # Tornado counts a request (log_function) just after its response is written: let the last land.
    eventually(svc, lambda s: s.total("http_requests_total", handler="api_hello") == n)
    seen: set[str] = set()
    for _ in range(50):
        result = scrape(svc)
        assert result.total("http_requests_total", handler="api_hello", code="200", method="GET") == n
        seen.add(result.worker)
        if len(seen) == 2:
            break
    assert seen == {"0", "1"}, "every worker must be able to answer /metrics"
    assert result.total("http_request_duration_seconds_count", handler="api_hello") == n


def test_unknown_paths_share_one_label(start_service: Start) -> None:
    svc = start_service()
    for path in ("/a", "/b/c", "/wp-login.php"):
        svc.request(path)
    svc.request("/api/hello", method="FROB")
    result = eventually(svc, lambda s: s.total("http_requests_total", code="405") == 1)
    assert result.total("http_requests_total", handler="not_found", code="404") == 3
    assert result.total("http_requests_total", handler="api_hello", method="other", code="405") == 1
    handlers = {labels["handler"] for labels in result.series("http_requests_total")}
    assert handlers <= {"not_found", "api_hello", "metrics"}


def test_in_progress_rises_during_sleep_and_falls_after(start_service: Start) -> None:
    svc = start_service()
    threads = [threading.Thread(target=svc.request, args=("/api/sleep?ms=3000",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    # Sampled once a second per worker, so the scrape itself is never in it; the sleeps outlast
    # a few samples, so every worker's latest sample sees its share at once even on a busy machine.
    during = eventually(svc, lambda s: s.total("http_requests_in_progress") == 3)
    for thread in threads:
        thread.join()
    after = eventually(svc, lambda s: s.total("http_requests_in_progress") == 0)
    assert {lbl["worker"] for lbl in during.series("http_requests_in_progress")} == {"0", "1"}
    assert after.total("http_requests_in_progress") == 0


def test_websocket_gauge_follows_clients(start_service: Start) -> None:
    svc = start_service()

    async def scenario() -> None:
        conns = [await wsclient.connect(svc.url(p, "ws")) for p in ("/ws/echo",) * 3 + ("/ws/ticker",) * 2]
        await conns[0].write_message("hi")
        await conns[0].read_message()
        opened = eventually(svc, lambda s: s.total("tornado_websocket_connections_open") == 5)
        assert opened.total("tornado_websocket_connections_open", handler="ws_echo") == 3
        assert opened.total("tornado_websocket_messages_total", handler="ws_echo", direction="in") == 1
        for conn in conns:
            conn.close()
        eventually(svc, lambda s: s.total("tornado_websocket_connections_open") == 0)

    wsclient.run(scenario())


def test_killed_workers_live_gauges_vanish_counters_stay(start_service: Start) -> None:
    svc = start_service()
    for _ in range(10):
        svc.request("/")
    eventually(svc, lambda s: s.total("http_requests_total", handler="hello") == 10)

    async def scenario() -> None:
        conn = await wsclient.connect(svc.url("/ws/echo", "ws"))
        victim_pid = int(conn.headers["X-Worker-PID"])
        victim = next(w for w, pid in svc.live_workers().items() if pid == victim_pid)
        before = eventually(svc, lambda s: s.total("tornado_websocket_connections_open") == 1)
        mark = len(svc.events)
        os.kill(victim_pid, signal.SIGKILL)
        svc.wait_for(lambda e: e.get("event") == "worker started" and e["worker"] == victim, after=mark)
        after = eventually(svc, lambda s: s.total("tornado_workers_alive") == 2)
        assert after.total("tornado_websocket_connections_open") == 0  # the dead worker's gauge is gone
        assert after.total("http_requests_total", handler="hello") == before.total(
            "http_requests_total", handler="hello") == 10  # its counts are not
        assert after.total("tornado_worker_restarts_total", worker=str(victim)) == 1
        conn.close()

    wsclient.run(scenario())


def test_per_worker_series_exist_at_zero_from_the_start(start_service: Start) -> None:
    """`increase()` needs a sample before the first restart, so the 0 must be there at start."""
    svc = start_service()
    fresh = eventually(svc, lambda s: s.total("tornado_workers_alive") == 2)
    for worker in ("0", "1"):
        assert {"worker": worker} in fresh.series("tornado_worker_restarts_total")
        assert fresh.total("tornado_worker_restarts_total", worker=worker) == 0
        assert fresh.total("tornado_workers_alive", worker=worker) == 1  # not 2: the parent adds 0
    assert len(fresh.series("tornado_worker_restarts_total")) == 2
    assert len(fresh.series("tornado_workers_alive")) == 2

    victim, victim_pid = next(iter(svc.live_workers().items()))
    survivor = str(1 - victim)
    mark = len(svc.events)
    os.kill(victim_pid, signal.SIGKILL)
    svc.wait_for(lambda e: e.get("event") == "worker started" and e["worker"] == victim, after=mark)
    after = eventually(svc, lambda s: s.total("tornado_workers_alive") == 2)
    assert after.total("tornado_worker_restarts_total", worker=str(victim)) == 1  # once, not per process
    assert after.total("tornado_worker_restarts_total", worker=survivor) == 0
    assert after.total("tornado_workers_alive", worker=str(victim)) == 1


def test_a_worker_that_is_gone_reads_zero_alive(start_service: Start) -> None:
    """A worker that exits 0 is not restarted: its liveness must read 0, not vanish (the alert)."""
    svc = start_service()
    victim, victim_pid = next(iter(svc.live_workers().items()))
    mark = len(svc.events)
    os.kill(victim_pid, signal.SIGTERM)  # to the worker alone: it drains and exits 0
    svc.wait_for(lambda e: e.get("event") == "worker exited" and e["worker"] == victim, after=mark)
    after = eventually(svc, lambda s: s.total("tornado_workers_alive") == 1)
    assert {"worker": str(victim)} in after.series("tornado_workers_alive")
    assert after.total("tornado_workers_alive", worker=str(victim)) == 0
    assert after.total("tornado_worker_restarts_total", worker=str(victim)) == 0  # an exit, not a restart


def test_caps_are_exported_beside_what_they_cap(start_service: Start) -> None:
    """The alerts divide connections and descriptors by these: same `worker` label, one to one."""
    svc = start_service("--max-connections", "500")
    result = eventually(
        svc, lambda s: {lbl["worker"] for lbl in s.series("tornado_worker_max_fds")} == {"0", "1"}
    )
    for worker in ("0", "1"):
        assert result.total("tornado_max_connections", worker=worker) == 500
        limit = result.total("tornado_worker_max_fds", worker=worker)
        assert limit >= 500 + 256  # the supervisor fits the open-files limit to the cap
        assert result.total("tornado_worker_open_fds", worker=worker) < limit
    assert sorted(lbl["worker"] for lbl in result.series("tornado_max_connections")) == ["0", "1"]


def test_event_loop_lag_shows_blocking_work(start_service: Start) -> None:
    svc = start_service(workers=1)

    def slow(s: Scrape) -> float:
        return s.total("tornado_event_loop_lag_seconds_count") - s.total(
            "tornado_event_loop_lag_seconds_bucket", le="0.1")

    before = eventually(svc, lambda s: s.total("tornado_event_loop_lag_seconds_count") > 0)
    assert slow(before) == 0
    for _ in range(2):
        assert svc.request("/api/compute?n=10000000", timeout=30)[0] == 200
    after = eventually(svc, lambda s: slow(s) >= 1)
    lag_sum = "tornado_event_loop_lag_seconds_sum"
    assert after.total(lag_sum) > before.total(lag_sum)


def test_worker_process_figures_and_build_info(start_service: Start) -> None:
    svc = start_service()
    result = eventually(
        svc, lambda s: {lbl["worker"] for lbl in s.series("tornado_worker_open_fds")} == {"0", "1"}
    )
    for worker in ("0", "1"):
        assert result.total("tornado_worker_resident_memory_bytes", worker=worker) > 10_000_000
        assert result.total("tornado_worker_open_fds", worker=worker) > 3
        assert {"worker": worker} in result.series("tornado_worker_cpu_seconds")  # may still read 0.0
        assert result.total("tornado_connections_open", worker=worker) >= 0
    assert result.total("tornado_workers_alive") == 2
    [info] = result.series("tornado_build_info")
    assert info["workers"] == "2" and info["version"] and info["tornado"].startswith("6.")


def test_openmetrics_when_asked(start_service: Start) -> None:
    svc = start_service()
    status, headers, body = svc.request("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, headers, _ = svc.request("/metrics")
    assert headers["content-type"].startswith("text/plain")


def test_request_id_is_echoed_and_logged(start_service: Start) -> None:
    svc = start_service()
    _, headers, _ = svc.request("/api/hello", headers={"X-Request-ID": "abc-123.req", "User-Agent": "t/1"})
    assert headers["x-request-id"] == "abc-123.req"
    line = svc.wait_for(lambda e: e.get("event") == "request" and e.get("request_id") == "abc-123.req")
    assert line["status"] == 200 and line["handler"] == "api_hello" and line["path"] == "/api/hello"
    assert line["bytes"] == len(b'{"message":"hello world"}')
    assert line["user_agent"] == "t/1" and line["client_ip"] == "127.0.0.1"
    assert line["pid"] == int(headers["x-worker-pid"]) and line["worker"] == int(headers["x-worker-id"])
    assert line["timestamp"].endswith("Z") and line["level"] == "info" and line["method"] == "GET"


def test_insane_request_ids_are_replaced(start_service: Start) -> None:
    svc = start_service()
    for bad in ("x" * 200, "<script>", "a b", ""):
        _, headers, _ = svc.request("/", headers={"X-Request-ID": bad})
        rid = headers["x-request-id"]
        assert rid != bad and len(rid) == 32 and int(rid, 16) >= 0


def test_client_ip_comes_from_x_forwarded_for(start_service: Start) -> None:
    svc = start_service()
    svc.request("/", headers={"X-Forwarded-For": "203.0.113.7", "X-Request-ID": "fwd-1"})
    line = svc.wait_for(lambda e: e.get("request_id") == "fwd-1")
    assert line["client_ip"] == "203.0.113.7"


def test_access_log_can_be_switched_off_while_metrics_count(start_service: Start) -> None:
    svc = start_service("--access-log-sample", "0.5", env={"ACCESS_LOG": "false"})
    for _ in range(20):
        svc.request("/")
    eventually(svc, lambda s: s.total("http_requests_total", handler="hello") == 20)
    time.sleep(0.2)
    assert not svc.named("request")


def test_access_log_sampling(start_service: Start) -> None:
    svc = start_service("--access-log-sample", "0.25")
    for _ in range(200):
        svc.request("/healthz")
    time.sleep(0.3)
    logged = len([e for e in svc.named("request") if e["handler"] == "healthz"])
    assert 10 <= logged <= 120  # about 50; bounds wide enough never to flake


def test_every_line_is_json_with_the_process_fields(start_service: Start) -> None:
    svc = start_service()
    svc.request("/nope")
    svc.signal(signal.SIGTERM)
    assert svc.wait(10) == 0
    assert not svc.bad_lines
    for event in svc.events:
        assert {"event", "level", "timestamp", "logger", "pid"} <= event.keys(), event
        assert "worker" in event or event.get("role") == "supervisor", event
    assert any(e["logger"].startswith("tornado.") or e["event"] == "forking workers" for e in svc.events)
    json.dumps(svc.events)  # round-trips


def test_slow_websocket_consumer_is_disconnected_not_buffered(start_service: Start) -> None:
    svc = start_service("--max-write-buffer", "65536", "--ws-max-message-size", "65536", workers=1)
    chunk = "x" * 60_000

    async def scenario() -> int:
        conn = await wsclient.connect(svc.url("/ws/echo", "ws"))
        sent = 0
        with contextlib.suppress(Exception):  # the server drops us mid-flood: that is the point
            for _ in range(2000):  # never reads: echoes pile up on the server's side
                await asyncio.wait_for(conn.write_message(chunk), 5)
                sent += 1
        conn.close()
        return sent

    sent = wsclient.run(scenario())
    assert sent < 2000, "the server should have dropped the connection"
    line = svc.wait_for(lambda e: e.get("event") == "slow websocket consumer disconnected")
    assert line["handler"] == "ws_echo" and line["level"] == "warning"
    eventually(svc, lambda s: s.total("tornado_websocket_slow_consumers_total", handler="ws_echo") == 1)
    memory = scrape(svc).total("tornado_worker_resident_memory_bytes", worker="0")
    assert memory < 200 * 1024 * 1024  # bounded, not 120 MB of queued echoes on top
    assert svc.request("/")[0] == 200


def test_metrics_directory_is_wiped_and_filled_by_the_workers_only(
    start_service: Start, tmp_path: Path
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")  # a previous run's worker
    svc = start_service(env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    svc.request("/api/hello")
    eventually(svc, lambda s: s.total("http_requests_total", handler="api_hello") == 1)
    pids = {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("*.db")}
    workers = set(svc.live_workers().values())
    assert 999999 not in pids
    assert workers <= pids
    parent_files = sorted(p.name for p in directory.glob(f"*_{svc.pid}.db"))
    # The build info (max), and the per-worker zeros of restarts (counter) and liveness (livesum).
    assert parent_files == [f"{kind}_{svc.pid}.db" for kind in ("counter", "gauge_livesum", "gauge_max")]
    svc.signal(signal.SIGTERM)
    assert svc.wait(10) == 0
    assert directory.exists()  # an operator's directory is kept


def test_private_metrics_directory_is_removed_at_exit(start_service: Start) -> None:
    env = {k: "" for k in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")}
    svc = start_service(env=env)
    directory = Path(svc.wait_for(lambda e: e.get("event") == "starting")["metrics_dir"])
    assert directory.is_dir() and list(directory.glob("*.db"))
    svc.signal(signal.SIGTERM)
    assert svc.wait(10) == 0
    assert not directory.exists()

"""Request counts reach the metric files on every path: the timer, a scrape, the drain, the exit.

A worker keeps its request counts in plain Python and adds them to its metric files every
100 ms, before it answers a scrape (after asking every other worker to do the same), when it
starts draining and when it exits (service/telemetry/metrics.py). These tests read what an operator's
Prometheus would: a scrape, or the files themselves, summed by prometheus-client's own
multiprocess collector in this process (which asks no worker to flush anything), so each path
is seen on its own. No timing is asserted; waits are bounded polls.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ServiceProcess, wait_until
from metrics_client import Scrape, scrape
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

Start = Callable[..., ServiceProcess]
HELLO = {"handler": "api_hello", "method": "GET", "code": "200"}


def in_files(directory: Path) -> Scrape:
    """Every process's samples as the files hold them now, without asking any worker to flush."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return Scrape(generate_latest(registry).decode(), worker="")


def hello_on_one_connection(svc: ServiceProcess, n: int) -> int:
    """`n` requests on one keep-alive connection (so one worker answers all); that worker's pid."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        pids = set()
        for _ in range(n):
            conn.request("GET", "/api/hello")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            pids.add(int(response.headers["X-Worker-PID"]))
    finally:
        conn.close()
    [pid] = pids
    return pid


def test_the_timer_flushes_counts_to_the_files_without_a_scrape(start_service: Start, tmp_path: Path) -> None:
    svc = start_service(env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    hello_on_one_connection(svc, 25)
    # No /metrics request is made: only the worker's own 100 ms timer can put these in the files.
    assert wait_until(lambda: in_files(tmp_path).total("http_requests_total", **HELLO) == 25), (
        in_files(tmp_path).total("http_requests_total", **HELLO)
    )
    files = in_files(tmp_path)
    assert files.total("http_request_duration_seconds_count", handler="api_hello") == 25
    assert files.total("http_request_duration_seconds_bucket", handler="api_hello", le="+Inf") == 25
    assert files.total("http_request_duration_seconds_sum", handler="api_hello") > 0


def test_every_scrape_counts_every_request_answered_before_it(start_service: Start) -> None:
    """Each scrape comes right after a request, often before the timer: only the flush on scrape
    (the answering worker's own, and its ask to the other worker) makes every count exact."""
    svc = start_service("--reuse-port")  # new connections spread over both workers
    served: set[str] = set()
    answered: set[str] = set()
    crossed = 0
    for i in range(1, 31):
        _, headers, _ = svc.request("/api/hello")
        result = scrape(svc)
        assert result.total("http_requests_total", **HELLO) == i, f"scrape {i} by worker {result.worker}"
        assert result.total("http_request_duration_seconds_count", handler="api_hello") == i
        served.add(headers["x-worker-id"])
        answered.add(result.worker)
        crossed += headers["x-worker-id"] != result.worker
    assert served == answered == {"0", "1"}
    assert crossed > 0, "some scrape should have counted the other worker's request"


def test_a_worker_flushes_when_it_drains_and_when_it_exits(start_service: Start, tmp_path: Path) -> None:
    svc = start_service(env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, workers=1)
    # A request still running when the drain starts: it is answered, and counted, during the drain.
    slow: list[int] = []
    sleeper = threading.Thread(target=lambda: slow.append(svc.request("/api/sleep?ms=1500")[0]))
    sleeper.start()
    assert wait_until(lambda: svc.request("/readyz")[0] == 200 and sleeper.is_alive())
    pid = hello_on_one_connection(svc, 40)
    mark = len(svc.events)
    os.kill(pid, signal.SIGTERM)  # at once: the last requests are younger than a timer tick
    svc.wait_for(lambda e: e.get("event") == "draining", after=mark)
    # Counted as the drain starts (or by the timer, which goes on while the worker drains).
    assert wait_until(lambda: in_files(tmp_path).total("http_requests_total", **HELLO) == 40)
    sleeper.join(10)
    assert slow == [200]
    svc.wait_for(lambda e: e.get("event") == "worker exited" and e.get("worker_pid") == pid, after=mark)
    files = in_files(tmp_path)  # the worker is gone: what it did not flush is lost for good
    assert files.total("http_requests_total", handler="api_sleep", code="200") == 1
    assert files.total("http_requests_total", **HELLO) == 40
    assert files.total("http_requests_total", handler="readyz") >= 1


def test_counts_survive_an_exit_right_after_the_requests(start_service: Start, tmp_path: Path) -> None:
    """SIGTERM right after the requests, nothing in flight: the worker drains and exits within
    milliseconds, before its timer comes round, so its latest counts reach the files through the
    flushes at the drain and at the exit. Twice: each worker of the two, one after the other."""
    svc = start_service(env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    for round_no in (1, 2):
        pid = hello_on_one_connection(svc, 20)
        mark = len(svc.events)
        os.kill(pid, signal.SIGTERM)  # a worker that exits 0 is not restarted: the next round gets the other
        svc.wait_for(lambda e, pid=pid: e.get("event") == "worker exited" and e.get("worker_pid") == pid,
                     after=mark)
        assert in_files(tmp_path).total("http_requests_total", **HELLO) == 20 * round_no


def test_a_scrape_is_answered_while_another_worker_is_stuck(start_service: Start) -> None:
    """A worker blocked in /api/compute cannot flush: the scrape waits for it a bounded time only,
    then answers with what the files hold (that worker's latest counts come in a later scrape).
    Were the wait unbounded, the answer would come only after the blocked worker's own response."""
    svc = start_service()  # one shared listener: a blocked worker accepts nothing, the other takes it all
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=120)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    response.read()
    stuck = response.headers["X-Worker-Id"]  # the worker this keep-alive connection talks to
    computed = threading.Event()

    def compute() -> None:
        conn.request("GET", "/api/compute?n=10000000")  # about a second of blocked event loop
        reply = conn.getresponse()
        reply.read()
        computed.set()

    thread = threading.Thread(target=compute)
    thread.start()
    try:
        time.sleep(0.2)  # the request reaches the worker and the computation starts
        status, headers, _ = svc.request("/metrics", timeout=60)
        answered_first = not computed.is_set()
    finally:
        thread.join(120)
        conn.close()
    assert status == 200 and headers["x-worker-id"] != stuck
    assert answered_first, "the scrape waited for the blocked worker instead of a bounded time"
    after = scrape(svc)
    assert after.total("http_requests_total", handler="api_compute", code="200") == 1

"""The process model: restarts, drain on SIGTERM/SIGINT, forced stop, orphans, connection cap."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import psutil
import pytest
import wsclient
from conftest import ServiceProcess, gone, refused, require_tool, wait_until

Start = Callable[..., ServiceProcess]


def _in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def target() -> None:
        try:
            result.append(fn())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_sigkilled_worker_is_replaced_and_service_continues(start_service: Start) -> None:
    svc = start_service()
    before = svc.live_workers()
    victim_id, victim_pid = next(iter(before.items()))
    mark = len(svc.events)
    os.kill(victim_pid, signal.SIGKILL)
    restarted = svc.wait_for(
        lambda e: e.get("event") == "worker started" and e["worker"] == victim_id, timeout=10, after=mark
    )
    assert restarted["pid"] != victim_pid
    died = svc.wait_for(lambda e: e.get("event") == "worker died, restarting", after=mark)
    assert (died["worker"], died["worker_pid"], died["signal"]) == (victim_id, victim_pid, "SIGKILL")
    assert svc.live_workers() == {**before, victim_id: restarted["pid"]}
    assert all(svc.request("/")[0] == 200 for _ in range(20))


def test_worker_that_exits_cleanly_is_not_restarted(start_service: Start) -> None:
    svc = start_service()
    worker_id, pid = next(iter(svc.live_workers().items()))
    mark = len(svc.events)
    os.kill(pid, signal.SIGTERM)  # a worker alone drains and exits 0
    svc.wait_for(lambda e: e.get("event") == "worker exited" and e.get("restart") is False, after=mark)
    assert gone([pid], 5)
    assert worker_id not in svc.live_workers()
    assert len(svc.live_workers()) == 1
    assert svc.request("/")[0] == 200


def test_crash_loop_is_bounded(start_service: Start) -> None:
    svc = start_service("--max-restarts", "1")
    worker_id, pid = next(iter(svc.live_workers().items()))
    mark = len(svc.events)
    os.kill(pid, signal.SIGKILL)
    svc.wait_for(lambda e: e.get("event") == "worker started" and e["worker"] == worker_id, after=mark)
    os.kill(svc.live_workers()[worker_id], signal.SIGKILL)  # the second restart is one too many
    workers = svc.tree()
    assert svc.wait(15) == 1
    assert svc.wait_for(lambda e: e.get("event") == "crash loop: giving up")
    assert gone(workers, 5)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(start_service: Start) -> None:
    svc = start_service("--shutdown-grace", "6")
    workers = svc.tree()
    thread, result = _in_background(lambda: svc.get_json("/api/sleep?ms=2000", timeout=10))
    time.sleep(0.5)  # the request is in flight
    svc.signal(signal.SIGTERM)
    svc.wait_for(lambda e: e.get("event") == "shutting down")
    assert wait_until(lambda: refused(svc.port), 3), "new connections must be refused while draining"
    assert svc.wait(10) == 0  # 0: within the grace (its running out means SIGKILLed workers and 1)
    thread.join(5)
    status, body = result[0]  # type: ignore[misc]
    assert status == 200 and body["slept_ms"] == 2000
    assert gone(workers, 1)
    assert svc.wait_for(lambda e: e.get("event") == "shutdown complete")
    exits = svc.named("worker exited")
    assert sorted(e["worker"] for e in exits) == [0, 1] and {e["exit_code"] for e in exits} == {0}


def test_workers_are_named_for_ps(start_service: Start) -> None:
    svc = start_service()
    names = {wid: psutil.Process(pid).name() for wid, pid in svc.live_workers().items()}
    assert names == {0: "tornado-w0", 1: "tornado-w1"}


def test_draining_worker_answers_not_ready(start_service: Start) -> None:
    svc = start_service("--workers", "1", "--drain-delay", "1.5", "--shutdown-grace", "5", workers=1)
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:  # keep-alive connection, opened early
        svc.signal(signal.SIGTERM)
        svc.wait_for(lambda e: e.get("event") == "draining")
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(1000)
    assert reply.startswith(b"HTTP/1.1 503")
    assert b"Connection: close" in reply
    assert svc.wait(10) == 0


def test_websockets_and_long_polls_are_released_on_shutdown(start_service: Start) -> None:
    svc = start_service("--shutdown-grace", "5", "--tick-interval", "60")
    poll_thread, poll_result = _in_background(lambda: svc.request("/api/poll?timeout=30", timeout=20))

    async def scenario() -> list[int | None]:
        conns = [await wsclient.connect(svc.url(path, "ws")) for path in ("/ws/echo", "/ws/ticker") * 2]
        await asyncio.sleep(0.3)
        svc.signal(signal.SIGTERM)
        await asyncio.gather(*(wsclient.read_until_closed(c, 10) for c in conns))
        return [c.close_code for c in conns]

    assert wsclient.run(scenario()) == [1001] * 4
    poll_thread.join(10)
    assert poll_result and poll_result[0][0] == 204  # type: ignore[index]
    assert svc.wait(10) == 0


def test_sigint_drains_like_sigterm(start_service: Start) -> None:
    svc = start_service()
    workers = svc.tree()
    svc.signal(signal.SIGINT)
    assert svc.wait(10) == 0
    assert gone(workers, 1)


def test_process_group_signal_drains_once(start_service: Start) -> None:
    """Ctrl-C in a terminal or `kill -TERM -PGID` reaches every process; still one clean drain."""
    svc = start_service()
    workers = svc.tree()
    os.killpg(svc.pid, signal.SIGTERM)
    assert svc.wait(10) == 0
    assert gone(workers, 1)
    # A worker reaped inside fork_processes at the instant the signal lands may go unlogged;
    # every exit that is logged is clean, each worker drained once, and none was restarted.
    assert all(e.get("exit_code") == 0 for e in svc.named("worker exited"))
    assert sorted(e["worker"] for e in svc.named("worker drained")) == [0, 1]
    assert not svc.named("worker died, restarting")


def test_second_ctrl_c_stops_at_once(start_service: Start) -> None:
    """SIGINT again during the drain: a person wants out. (A repeated SIGTERM keeps draining:
    tests/test_stop_methods.py.)"""
    svc = start_service("--shutdown-grace", "60")
    workers = svc.tree()
    _in_background(lambda: svc.request("/api/sleep?ms=30000", timeout=40))
    time.sleep(0.3)
    svc.signal(signal.SIGINT)
    svc.wait_for(lambda e: e.get("event") == "shutting down")
    svc.signal(signal.SIGINT)
    assert svc.wait(10) == 1  # at once: the request in flight had 30 s to go, the grace 60 s
    assert gone(workers, 2)
    assert svc.wait_for(lambda e: e.get("event") == "second signal: stopping workers at once")


def test_grace_running_out_ends_the_drain(start_service: Start) -> None:
    svc = start_service("--shutdown-grace", "2")
    workers = svc.tree()
    thread, result = _in_background(lambda: svc.request("/api/sleep?ms=30000", timeout=40))
    time.sleep(0.3)
    svc.signal(signal.SIGTERM)
    svc.wait(10)  # well before the 30 s request would have finished: the 2 s grace ended the drain
    assert gone(workers, 1)
    thread.join(5)
    assert isinstance(result[0], Exception), "the cut request must fail, not hang"
    assert svc.wait_for(lambda e: e.get("event") == "drain deadline reached, closing what is left")


def test_orphaned_workers_drain_when_the_supervisor_dies(start_service: Start) -> None:
    svc = start_service()
    workers = svc.tree()
    svc.signal(signal.SIGKILL)
    assert gone(workers, 5)
    assert len(svc.named("worker drained")) == 2


def test_connections_beyond_the_cap_are_refused_cleanly(start_service: Start) -> None:
    svc = start_service("--max-connections", "3", workers=1)
    held = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as extra:
            reply = extra.recv(1000)
        assert reply.startswith(b"HTTP/1.1 503"), reply
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"\r\nX-Worker-Id: 0\r\n" in head and b"\r\nX-Worker-PID: " in head
        assert body == b'{"error":"too many open connections","status":503}'
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert svc.request("/")[0] == 200  # the closed ones no longer count


def test_probes_and_scrapes_are_served_past_the_cap(start_service: Start) -> None:
    """A worker at its cap still answers the kubelet and Prometheus (else liveness would restart
    the container and cut what the cap protects); anything else is refused."""
    svc = start_service("--max-connections", "2", workers=1)
    held = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        assert svc.request("/healthz")[0] == 200
        assert svc.request("/readyz")[0] == 200
        status, _, body = svc.request("/metrics")
        assert status == 200 and b"tornado_connections_refused_total" in body
        assert svc.request("/api/hello")[0] == 503
        assert svc.request("/healthzz")[0] == 503  # only the probes' own paths
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("reuse_port", [False, True])
def test_worker_count_from_settings_and_port_sharing(start_service: Start, reuse_port: bool) -> None:
    svc = start_service("--reuse-port" if reuse_port else "--no-reuse-port", workers=2)
    count = svc.wait_for(lambda e: e.get("event") == "worker count")
    assert count["workers"] == 2 and "WEB_CONCURRENCY" in count["reason"]
    assert svc.get_json("/api/hello")[0] == 200


def test_worker_count_defaults_to_usable_cpus(start_service: Start) -> None:
    svc = ServiceProcess(workers=1)
    svc.args.remove("--workers")
    svc.args.remove("1")
    svc.workers = 1
    try:
        svc.start()
        count = svc.wait_for(lambda e: e.get("event") == "worker count")
        assert count["workers"] == min(len(os.sched_getaffinity(0)), os.cpu_count() or 1)
        assert count["reason"]
    finally:
        svc.stop()


def test_drains_as_pid_1_of_a_pid_namespace(start_service: Start) -> None:
    """As in a container: PID 1 gets no default SIGTERM action, only the handlers it installs."""
    unshare = require_tool("unshare")
    svc = start_service(prefix=[unshare, "--pid", "--fork", "--mount-proc", "--kill-child"])
    started = svc.named("worker started")
    assert {e["pid"] for e in svc.named("listening")} == {1}
    assert svc.get_json("/api/hello")[0] == 200
    [pid_1] = psutil.Process(svc.pid).children()
    workers = svc.tree()
    pid_1.send_signal(signal.SIGTERM)
    assert svc.wait(10) == 0
    assert gone(workers, 1)
    assert len(svc.named("worker exited")) == len(started)
    assert svc.wait_for(lambda e: e.get("event") == "shutdown complete")

"""Every endpoint and its errors, against the real 2-worker service."""

from __future__ import annotations

import contextlib
import email.utils
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import wsclient
from conftest import ServiceProcess


def test_hello_is_plain_text(service: ServiceProcess) -> None:
    status, headers, body = service.request("/")
    assert status == 200
    assert body == b"Hello, world"
    assert headers["content-type"].startswith("text/plain")
    assert "server" not in headers
    assert int(headers["x-worker-pid"]) in service.live_workers().values()


def test_api_hello_is_json(service: ServiceProcess) -> None:
    status, headers, body = service.request("/api/hello")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"message": "hello world"}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/api/hello", 200), ("GET", "/", 200), ("GET", "/healthz", 200), ("GET", "/nope", 404),
    ("DELETE", "/api/hello", 405), ("GET", "/api/sleep?ms=x", 400), ("HEAD", "/api/hello", 405),
])
def test_every_response_has_a_date_and_the_identity_headers_and_no_server_banner(
    service: ServiceProcess, method: str, path: str, status: int
) -> None:
    """The service makes its responses' default headers itself (ServiceHandler.clear, instead of
    Tornado's): these are what it must still send, errors included (send_error resets them)."""
    got, headers, _ = service.request(path, method=method, headers={"X-Request-ID": "hdr-1"})
    assert got == status
    assert "server" not in headers  # no version banner
    date = email.utils.parsedate_to_datetime(headers["date"])  # RFC 9110's IMF-fixdate, in GMT
    assert headers["date"].endswith(" GMT") and date.tzinfo is not None
    assert abs(date.timestamp() - time.time()) < 300  # the current time, not one frozen at start
    assert int(headers["x-worker-pid"]) == service.live_workers()[int(headers["x-worker-id"])]
    assert headers["x-request-id"] == "hdr-1"
    assert headers["content-length"].isdigit()


def test_sleep_waits_and_names_the_worker(service: ServiceProcess) -> None:
    started = time.monotonic()
    status, body = service.get_json("/api/sleep?ms=150")
    assert status == 200
    assert time.monotonic() - started >= 0.15
    assert body["slept_ms"] == 150
    assert service.live_workers()[body["worker"]] == body["pid"]


@pytest.mark.parametrize("query", ["", "?ms=", "?ms=-1", "?ms=60001", "?ms=abc", "?ms=1.5", "?ms=%00"])
def test_sleep_rejects_bad_ms(service: ServiceProcess, query: str) -> None:
    status, body = service.get_json("/api/sleep" + query)
    assert status == 400
    assert body["status"] == 400
    assert "ms" in body["error"]


def test_compute_is_bounded(service: ServiceProcess) -> None:
    status, body = service.get_json("/api/compute?n=1000")
    assert (status, body["n"], body["result"]) == (200, 1000, sum(i * i for i in range(1000)) % 1_000_000_007)
    for bad in ("0", "10000001", "x"):
        status, body = service.get_json(f"/api/compute?n={bad}")
        assert status == 400 and "'n'" in body["error"]


def test_long_poll_answers_with_the_next_tick(service: ServiceProcess) -> None:
    status, _, body = service.request("/api/poll?timeout=5")
    assert status == 200
    event = json.loads(body)
    assert event["type"] == "tick" and event["seq"] >= 1
    assert abs(time.time() - event["ts"]) < 5


def test_long_poll_times_out_with_204(service: ServiceProcess) -> None:
    status, _, body = service.request("/api/poll?timeout=0")
    assert (status, body) == (204, b"")


@pytest.mark.parametrize("timeout", ["-1", "301", "nan", "soon"])
def test_long_poll_rejects_bad_timeout(service: ServiceProcess, timeout: str) -> None:
    status, body = service.get_json(f"/api/poll?timeout={timeout}")
    assert status == 400 and "timeout" in body["error"]


def test_health_and_readiness(service: ServiceProcess) -> None:
    assert service.get_json("/healthz") == (200, {"status": "ok"})
    assert service.get_json("/readyz") == (200, {"status": "ready"})


@pytest.mark.parametrize("path", ["/nope", "/api", "/api/hello/extra", "/ws", "/%2e%2e/etc/passwd"])
def test_unknown_paths_are_json_404(service: ServiceProcess, path: str) -> None:
    status, headers, body = service.request(path)
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == 404


def test_wrong_method_is_json_405(service: ServiceProcess) -> None:
    status, _, body = service.request("/api/hello", method="DELETE")
    assert status == 405
    assert json.loads(body) == {"error": "Method Not Allowed", "status": 405}


def test_body_over_the_limit_is_refused_and_worker_survives(service: ServiceProcess) -> None:
    workers = service.live_workers()
    # The server may answer 400 or close before the client has sent it all; both are fine.
    with contextlib.suppress(ConnectionError):
        status, _, _ = service.request("/api/hello", method="POST", body=b"x" * 10_000)
        assert 400 <= status < 500
    assert service.request("/")[0] == 200
    assert service.live_workers() == workers


def test_malformed_requests_get_400_and_kill_nothing(service: ServiceProcess) -> None:
    workers = service.live_workers()
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n"
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost\r\n\r\n", tls_hello):
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
            sock.sendall(garbage)
            reply = sock.recv(200)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply
    assert service.request("/")[0] == 200
    assert service.live_workers() == workers
    tracebacks = [e for e in service.events if e.get("level") == "error"]
    assert not tracebacks


def test_no_traceback_reaches_the_client(service: ServiceProcess) -> None:
    _, _, body = service.request("/api/sleep?ms=" + "9" * 5000)
    assert b"Traceback" not in body and b"File \"" not in body


def test_requests_are_served_by_distinct_workers(service: ServiceProcess) -> None:
    # A CPU-bound request blocks its worker's accept loop, so the other worker takes new connections.
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: service.get_json("/api/compute?n=300000")[1], range(16)))
    pids = {reply["pid"] for reply in replies}
    assert pids == set(service.live_workers().values())
    assert len(pids) == 2


def test_websocket_echo(service: ServiceProcess) -> None:
    async def scenario() -> tuple[object, object]:
        conn = await wsclient.connect(service.url("/ws/echo", "ws"))
        await conn.write_message("ping ✓")
        text = await conn.read_message()
        await conn.write_message(b"\x00\x01binary", binary=True)
        binary = await conn.read_message()
        conn.close()
        return text, binary

    assert wsclient.run(scenario()) == ("ping ✓", b"\x00\x01binary")


def test_websocket_message_over_the_limit_closes_with_1009(service: ServiceProcess) -> None:
    async def scenario() -> int | None:
        conn = await wsclient.connect(service.url("/ws/echo", "ws"))
        await conn.write_message("x" * 2048)
        await wsclient.read_until_closed(conn, 5)
        return conn.close_code

    assert wsclient.run(scenario()) == 1009


def test_websocket_ticker_pushes_timestamped_ticks(service: ServiceProcess) -> None:
    async def scenario() -> list[dict[str, float]]:
        conn = await wsclient.connect(service.url("/ws/ticker", "ws"))
        events = []
        for _ in range(3):
            message = await conn.read_message()
            assert isinstance(message, str)
            events.append({**json.loads(message), "received": time.time()})
        conn.close()
        return events

    events = wsclient.run(scenario())
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert all(0 <= e["received"] - e["ts"] < 2 for e in events)
    assert events[0]["interval"] == 0.2


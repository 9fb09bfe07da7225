"""The service behind a real Nginx (Debian's), configured from nginx/nginx.conf.template."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wsclient
from conftest import ServiceProcess, http_request, require_tool, wait_until
from httpload import HttpLoad
from proxy import Nginx, Prometheus
from tornado.httpclient import HTTPClientError, HTTPRequest

from nginx import render

Start = Callable[..., ServiceProcess]
StartProxy = Callable[..., Nginx]


@pytest.fixture(scope="module")
def backend() -> Iterator[ServiceProcess]:
    svc = ServiceProcess("--tick-interval", "0.2", "--max-body-size", "4096")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def nginx(backend: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), backend.port, CLIENT_MAX_BODY_SIZE="4096")
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    started: list[Nginx] = []

    def start(upstream_port: int, **settings: str) -> Nginx:
        proxy = Nginx(tmp_path / f"nginx{len(started)}", upstream_port, **settings)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def test_timeouts_are_checked_when_rendered() -> None:
    """Every *_TIMEOUT is an Nginx time above zero, refused at render time rather than when Nginx starts."""
    assert [render.duration_ms(t) for t in ("10s", "500ms", "1m30s", "60", "2h")] == [
        10_000, 500, 90_000, 60_000, 7_200_000,
    ]
    for name in ("CLIENT_HEADER_TIMEOUT", "CLIENT_BODY_TIMEOUT", "PROXY_READ_TIMEOUT", "LONG_READ_TIMEOUT"):
        for bad in ("", "0s", "ten", "1.5s", "10 s", "1m 30s", "-1s"):
            with pytest.raises(ValueError, match=name):
                render.values({name: bad}, {})
    text = render.render(render.TEMPLATE.read_text(), render.values({}, {}))
    assert "client_header_timeout 10s;" in text and "client_body_timeout 30s;" in text
    assert "proxy_request_buffering on;" in text  # slow bodies stay in Nginx (tests/test_slow_clients.py)


def test_rendered_config_passes_nginx_t(nginx: Nginx) -> None:
    result = nginx.check()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_hello_and_json_through_nginx(nginx: Nginx) -> None:
    status, headers, body = http_request(nginx.http_port, "/")
    assert (status, body) == (200, b"Hello, world")
    assert headers["server"] == "nginx"  # server_tokens off, and Tornado's Server header not passed on
    status, headers, body = http_request(nginx.http_port, "/api/hello")
    assert status == 200 and json.loads(body) == {"message": "hello world"}
    assert headers["content-type"] == "application/json"


def test_websockets_through_nginx(nginx: Nginx) -> None:
    async def scenario() -> tuple[object, dict[str, object]]:
        echo = await wsclient.connect(f"ws://127.0.0.1:{nginx.http_port}/ws/echo")
        await echo.write_message("through nginx")
        echoed = await echo.read_message()
        ticker = await wsclient.connect(f"ws://127.0.0.1:{nginx.http_port}/ws/ticker")
        tick = await ticker.read_message()
        echo.close()
        ticker.close()
        assert isinstance(tick, str)
        return echoed, json.loads(tick)

    echoed, tick = wsclient.run(scenario())
    assert echoed == "through nginx"
    assert tick["type"] == "tick"


def test_tls_listener_negotiates_http2(nginx: Nginx) -> None:
    curl = require_tool("curl")
    result = subprocess.run(
        [curl, "-sk", "--http2", "-w", "\\n%{http_version}", f"https://127.0.0.1:{nginx.tls_port}/api/hello"],
        capture_output=True, text=True, timeout=30,
    )
    body, version = result.stdout.rsplit("\n", 1)
    assert version == "2", "ALPN must negotiate h2"
    assert json.loads(body) == {"message": "hello world"}


def test_websocket_over_tls(nginx: Nginx) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def scenario() -> object:
        request = HTTPRequest(f"wss://127.0.0.1:{nginx.tls_port}/ws/echo", ssl_options=context)
        conn = await wsclient.connect(request)
        await conn.write_message("over tls")
        reply = await conn.read_message()
        conn.close()
        return reply

    assert wsclient.run(scenario()) == "over tls"


def test_a_browsers_websocket_on_a_non_default_port_passes_the_origin_check(nginx: Nginx) -> None:
    """A browser sends Origin with the port it used; the Host Nginx passes on must keep it too."""
    origin = f"http://127.0.0.1:{nginx.http_port}"

    async def scenario() -> object:
        request = HTTPRequest(f"ws://127.0.0.1:{nginx.http_port}/ws/echo", headers={"Origin": origin})
        conn = await wsclient.connect(request)
        await conn.write_message("same origin")
        reply = await conn.read_message()
        conn.close()
        return reply

    assert wsclient.run(scenario()) == "same origin"

    async def foreign() -> None:
        request = HTTPRequest(f"ws://127.0.0.1:{nginx.http_port}/ws/echo",
                              headers={"Origin": "http://evil.example"})
        await wsclient.connect(request)

    with pytest.raises(HTTPClientError) as refused:
        wsclient.run(foreign())
    assert refused.value.code == 403  # another site's page is still refused


def test_metrics_are_not_public(nginx: Nginx, backend: ServiceProcess) -> None:
    for path in ("/metrics", "/metrics?x=1", "//metrics", "/%6Detrics", "/./metrics"):
        status, _, body = http_request(nginx.http_port, path)
        assert status == 404, path
        assert b"http_requests_total" not in body
    assert backend.request("/metrics")[0] == 200  # the service itself still serves it


def test_body_limit_matches_the_service(nginx: Nginx) -> None:
    status, headers, body = http_request(nginx.http_port, "/api/hello", method="POST", body=b"x" * 5000)
    assert status == 413
    assert json.loads(body) == {"error": "Request Entity Too Large", "status": 413}
    assert headers["x-request-id"]


def test_stub_status_is_internal_only(nginx: Nginx) -> None:
    status, _, body = http_request(nginx.status_port, "/stub_status")
    assert status == 200 and b"Active connections" in body
    status, _, _ = http_request(nginx.http_port, "/stub_status")
    assert status == 404


@pytest.mark.parametrize("given", ["client-chosen-id.42", None])
def test_one_request_id_from_nginx_to_the_service(
    nginx: Nginx, backend: ServiceProcess, given: str | None
) -> None:
    headers = {"X-Request-ID": given} if given else {"X-Request-ID": "bad id <script>"}
    status, response_headers, _ = http_request(nginx.http_port, "/api/hello", headers=headers)
    assert status == 200
    rid = response_headers["x-request-id"]
    if given:
        assert rid == given
    else:
        assert len(rid) == 32 and int(rid, 16) >= 0  # Nginx's $request_id replaced the insane one
    assert list(response_headers).count("x-request-id") == 1
    service_line = backend.wait_for(lambda e: e.get("event") == "request" and e.get("request_id") == rid)
    nginx_line = nginx.log_line(rid)
    assert service_line["path"] == "/api/hello" and nginx_line["uri"] == "/api/hello"
    assert nginx_line["status"] == 200 and nginx_line["upstream_status"] == "200"
    assert nginx_line["upstream_addr"] == f"127.0.0.1:{backend.port}"
    assert float(nginx_line["upstream_response_time"]) >= 0


def test_service_logs_the_clients_address_not_nginxs(nginx: Nginx, backend: ServiceProcess) -> None:
    http_request(nginx.http_port, "/", headers={"X-Request-ID": "from-127-0-0-5"}, source="127.0.0.5")
    line = backend.wait_for(lambda e: e.get("request_id") == "from-127-0-0-5")
    assert line["client_ip"] == "127.0.0.5"  # from X-Forwarded-For / X-Real-IP; the TCP peer is Nginx
    assert nginx.log_line("from-127-0-0-5")["remote_addr"] == "127.0.0.5"


def test_upstream_connections_spread_over_the_source_addresses(
    start_service: Start, start_proxy: StartProxy
) -> None:
    """UPSTREAM_SOURCE_ADDRESSES: Nginx's connections to the service come from those addresses (each
    one gives another ephemeral port range). WebSockets, because each holds an upstream connection
    of its own; the service trusts only 127.0.0.1, so it logs the TCP peer: the source address."""
    svc = start_service("--tick-interval", "60")
    proxy = start_proxy(svc.port, UPSTREAM_SOURCE_ADDRESSES="127.0.0.201,127.0.0.202")
    ids = [f"spread-{i}" for i in range(16)]

    async def hold_all() -> None:
        url = f"ws://127.0.0.1:{proxy.http_port}/ws/echo"
        sockets = [await wsclient.connect(HTTPRequest(url, headers={"X-Request-ID": rid})) for rid in ids]
        for sock in sockets:
            sock.close()

    wsclient.run(hold_all())
    peers = {svc.wait_for(lambda e, rid=rid: e.get("request_id") == rid)["client_ip"] for rid in ids}
    assert peers == {"127.0.0.201", "127.0.0.202"}  # split_clients sends about half to each


def test_long_poll_outlasts_nginx_default_read_timeout(start_service: Start, start_proxy: StartProxy) -> None:
    """Both sides shortened to keep the test fast; the relation is the production one."""
    svc = start_service("--tick-interval", "60")
    proxy = start_proxy(svc.port, PROXY_READ_TIMEOUT="2s", LONG_READ_TIMEOUT="8s")
    started = time.monotonic()
    status, _, _ = http_request(proxy.http_port, "/api/poll?timeout=4")
    assert status == 204 and time.monotonic() - started >= 4  # outlived the 2 s default, not cut
    status, _, body = http_request(proxy.http_port, "/api/sleep?ms=3500")
    assert status == 504 and json.loads(body)["status"] == 504  # plain requests keep the short timeout


def test_real_prometheus_scrapes_the_service_directly(
    backend: ServiceProcess, tmp_path: Path
) -> None:
    promtool = require_tool("promtool")
    prometheus = Prometheus(tmp_path, {"tornado": f"127.0.0.1:{backend.port}"})
    checked = subprocess.run(
        [promtool, "check", "config", str(prometheus.config)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    prometheus.start()
    try:
        for _ in range(5):
            backend.request("/api/hello")
        up = prometheus.wait_for('up{job="tornado"} == 1')
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{backend.port}"
        alive = prometheus.wait_for("sum(tornado_workers_alive)")
        assert float(alive[0]["value"][1]) == 2
        hello = prometheus.wait_for('sum(http_requests_total{handler="api_hello"})')
        assert float(hello[0]["value"][1]) >= 5
    finally:
        prometheus.stop()


def test_killing_a_worker_under_load_fails_no_request(start_service: Start, start_proxy: StartProxy) -> None:
    svc = start_service()
    proxy = start_proxy(svc.port)
    stop_at = time.monotonic() + 4.0
    load = HttpLoad(proxy.http_port, ["/api/sleep?ms=40"], threads=12, timeout=10)
    try:
        assert wait_until(lambda: load.done >= 100, 30)  # the load is flowing before the kill
        victim_id, victim_pid = next(iter(svc.live_workers().items()))
        mark = len(svc.events)
        os.kill(victim_pid, signal.SIGKILL)
        time.sleep(max(0.0, stop_at - time.monotonic()))
    finally:
        load.stop()
    svc.wait_for(lambda e: e.get("event") == "worker started" and e["worker"] == victim_id, after=mark)
    assert load.done > 200
    assert load.failures == [], f"{len(load.failures)} of {load.done} requests failed: {load.failures[:5]}"
    retried = [line for line in proxy.access_lines() if "," in line["upstream_addr"]]
    print(f"{load.done} requests, {len(retried)} retried by Nginx on a new connection")

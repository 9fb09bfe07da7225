"""What the public sees and nothing more: the Nginx config passes gixy, TLS is strong and says so
(HSTS), no product version and no traceback reaches a client, /metrics is not public on any
listener or in any request form.

(Version banners in Nginx's own error pages and the service's, and /metrics over plain HTTP,
are also checked case by case in tests/test_hostile.py and tests/test_nginx.py.)
"""

from __future__ import annotations

import http.client
import json
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServiceProcess, http_request, require_tool
from proxy import Nginx

from loadtests.harness.ports import free_port
from loadtests.harness.wire import exchange
from nginx import render

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "k8s/base/generated/nginx.conf", ROOT / "k8s/overlays/dev/generated/nginx.conf"]
Start = Callable[..., ServiceProcess]


def gixy(conf: Path) -> list[dict[str, Any]]:
    """gixy's findings on `conf` (its JSON report: one object per finding)."""
    result = subprocess.run(
        [require_tool("gixy"), "-f", "json", str(conf)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode in (0, 1), result.stderr  # 1: there are findings
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    return findings


def rendered(tmp_path: Path, **settings: str) -> Path:
    conf = tmp_path / "nginx.conf"
    conf.write_text(render.render(render.TEMPLATE.read_text(), render.values(settings, {})))
    return conf


def serious(findings: list[dict[str, Any]]) -> list[str]:
    return [f"{f['severity']} {f['plugin']}: {f['reason']}" for f in findings
            if f["severity"] in ("MEDIUM", "HIGH")]


def test_the_rendered_nginx_config_passes_gixy(tmp_path: Path) -> None:
    """The defaults, the tests' settings and every generated config that is shipped."""
    defaults = rendered(tmp_path)
    assert serious(gixy(defaults)) == []
    as_tested = tmp_path / "tested"
    as_tested.mkdir()
    assert serious(gixy(rendered(as_tested, LISTEN_ADDRESS="127.0.0.1", REAL_IP_FROM="10.0.0.0/8"))) == []
    for conf in SHIPPED:
        assert serious(gixy(conf)) == [], conf


def test_gixy_does_find_what_it_is_asked_to(tmp_path: Path) -> None:
    """The check is not vacuous: the old sizing (16384 connections on 20000 files) is a finding."""
    findings = gixy(rendered(tmp_path, WORKER_CONNECTIONS="16384"))
    assert [f["plugin"] for f in findings] == ["worker_rlimit_nofile_vs_connections"]


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    svc = ServiceProcess()
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def nginx(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), service.port)
    proxy.start()
    yield proxy
    proxy.stop()


def tls_context(ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3's suites are not chosen this way
        context.set_ciphers(ciphers)
    return context


def tls_get(port: int, path: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context or tls_context())
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_hsts_on_tls_answers_only(nginx: Nginx) -> None:
    status, headers, _ = tls_get(nginx.tls_port, "/api/hello")
    assert status == 200 and headers["strict-transport-security"] == "max-age=31536000"
    status, headers, _ = tls_get(nginx.tls_port, "/nope")  # on errors too
    assert status == 404 and "strict-transport-security" in headers
    status, headers, _ = http_request(nginx.http_port, "/api/hello")
    assert status == 200 and "strict-transport-security" not in headers
    assert headers["x-request-id"]  # the other add_header is still there


@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA"])
def test_weak_tls_1_2_ciphers_are_refused(nginx: Nginx, cipher: str) -> None:
    """No forward secrecy (static RSA) or no AEAD (CBC): the handshake fails."""
    with pytest.raises(ssl.SSLError):
        tls_get(nginx.tls_port, "/api/hello", tls_context(cipher))


def test_strong_tls_1_2_cipher_is_taken(nginx: Nginx) -> None:
    assert tls_get(nginx.tls_port, "/api/hello", tls_context("ECDHE-RSA-AES128-GCM-SHA256"))[0] == 200


def test_no_version_banner_over_tls_and_http2(nginx: Nginx) -> None:
    curl = require_tool("curl")
    for path in ("/api/hello", "/metrics", "/nope"):
        result = subprocess.run(
            [curl, "-sk", "--http2", "-D", "-", f"https://127.0.0.1:{nginx.tls_port}{path}"],
            capture_output=True, text=True, timeout=30,
        )
        head = result.stdout.lower()
        assert head.startswith("http/2 ") and "\nserver: nginx\n" in head, head
        assert "nginx/" not in head and "tornado" not in head


def test_nginx_own_errors_show_no_version(tmp_path: Path) -> None:
    """A 502 (nothing listens upstream): JSON, `Server: nginx` and no version, over both listeners."""
    proxy = Nginx(tmp_path, free_port()).start()
    try:
        status, headers, body = http_request(proxy.http_port, "/api/hello")
        assert (status, json.loads(body)) == (502, {"error": "Bad Gateway", "status": 502})
        assert headers["server"] == "nginx"
        status, headers, body = tls_get(proxy.tls_port, "/api/hello")
        assert status == 502 and headers["server"] == "nginx" and b"nginx/" not in body
    finally:
        proxy.stop()


def test_metrics_are_not_public_on_any_listener_or_form(nginx: Nginx, service: ServiceProcess) -> None:
    assert tls_get(nginx.tls_port, "/metrics")[0] == 404
    forms = [
        f"GET http://127.0.0.1:{service.port}/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # absolute form
        "GET /metrics HTTP/1.0\r\n",  # no Host at all
        f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n",  # the service's own address
        "GET /metrics/ HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "GET /METRICS HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "GET /metrics;x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "GET /api/../metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    ]
    for form in forms:
        reply = exchange(nginx.http_port, (form + "Connection: close\r\n\r\n").encode())
        assert reply.statuses == [404], form
        assert b"tornado_" not in reply.data and b"http_requests_total" not in reply.data, form


def test_a_forced_500_shows_no_traceback(start_service: Start, tmp_path: Path) -> None:
    """A real fault in the running service: a corrupt file in its metrics directory makes every
    /metrics fail inside prometheus-client. The client gets the JSON 500 and nothing else; the
    log gets the traceback, as one JSON line; the worker lives on."""
    svc = start_service(env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    workers = svc.live_workers()
    # A counter file whose first entry claims 1000 bytes where 16 are used: "file is corrupted".
    corrupt = struct.pack("i", 16) + bytes(4) + struct.pack("i", 1000) + bytes(4)
    (tmp_path / "counter_999999.db").write_bytes(corrupt)
    status, headers, body = svc.request("/metrics", headers={"X-Request-ID": "forced-500"})
    assert status == 500
    assert json.loads(body) == {"error": "Internal Server Error", "status": 500}
    assert headers["content-type"] == "application/json" and "server" not in headers
    for leak in (b"Traceback", b'File "', b"RuntimeError", b"corrupted", b"prometheus_client", b".py"):
        assert leak not in body
    error = svc.wait_for(lambda e: e.get("event") == "uncaught exception" and e["request_id"] == "forced-500")
    assert error["level"] == "error" and error["exception"][0]["exc_type"] == "RuntimeError"
    frames = [frame for exc in error["exception"] for frame in exc["frames"]]
    assert frames and not any("locals" in frame for frame in frames)  # no variables (secrets) logged
    assert svc.request("/api/hello")[0] == 200
    assert svc.live_workers() == workers
    assert not svc.bad_lines

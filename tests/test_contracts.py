"""The house rules of service/, checked: no import circle, leaves that stay leaves, and the two
outside facts the supervisor relies on (Tornado's reports from fork_processes, prometheus-client's
import-time choice of multiprocess mode)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import tornado.process
from conftest import ROOT

from service.process.supervisor import TornadoChildReports

SERVICE = ROOT / "service"
LEAVES = ("service.telemetry.metrics", "service.telemetry.metrics_dir", "service.telemetry.logs",
          "service.http.state", "service.http.errors", "service.http.requestid", "service.process.cpus",
          "service.process.cgroup", "service.rooms.records", "service.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def service_imports() -> dict[str, set[str]]:
    """module -> the service modules it imports (anywhere in the file, TYPE_CHECKING blocks too)."""
    modules = {module_name(p): p for p in SERVICE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("service"))
        graph[name] = {m for m in found if m != name and m != "service"}
    return graph


def test_service_has_no_import_circle() -> None:
    graph = service_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import circle: " + " -> ".join([*path[path.index(module):], module])
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_leaves_import_nothing_of_the_service_but_other_leaves() -> None:
    graph = service_imports()
    for leaf in LEAVES:
        assert graph[leaf] <= {"service", *LEAVES}, f"{leaf} imports {graph[leaf] - set(LEAVES)}"


def test_handlers_do_not_know_the_application() -> None:
    graph = service_imports()
    for module, imported in graph.items():
        if module.startswith("service.handlers"):
            assert "service.app" not in imported and "service.process.worker" not in imported, module
    ticker = graph["service.ws.ticker"]
    assert "service.app" not in ticker and "service.telemetry.metrics" not in ticker


def test_tornado_reports_child_deaths_as_the_supervisor_reads_them() -> None:
    """The supervisor learns deaths inside fork_processes from its log records: pin their shape."""
    source = inspect.getsource(tornado.process.fork_processes)
    for format_string in (TornadoChildReports.STARTING, *TornadoChildReports.REPORTS):
        assert f'"{format_string}"' in source, f"Tornado no longer logs {format_string!r} in fork_processes"
    assert source.count("gen_log.") >= len(TornadoChildReports.REPORTS)  # the logger the filter sits on
    assert tornado.process.gen_log.name == "tornado.general"


def test_metrics_directory_must_be_prepared_before_prometheus_client() -> None:
    script = "import prometheus_client\nfrom service.telemetry import metrics_dir\nmetrics_dir.prepare({})\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "imported before the metrics directory was prepared" in result.stderr


# -- the private parts of Tornado and prometheus-client the hot path relies on ----------------------
# Each is pinned twice: here, against the installed library's code (an upgrade that changes it
# fails at once, with the reason), and by a test of the behaviour through the real service.


def _assigned_attributes(function: object) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    return {
        target.attr for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
    }


def test_tornado_clear_resets_what_service_handler_clear_resets() -> None:
    """ServiceHandler.clear replaces RequestHandler.clear (no Server header, a Date made once a
    second): it must reset the same state, which Tornado keeps in private attributes."""
    from tornado.web import RequestHandler

    from service.handlers.base import ServiceHandler

    source = inspect.getsource(RequestHandler.clear)
    resets = {"_headers", "_write_buffer", "_status_code", "_reason"}
    assert _assigned_attributes(RequestHandler.clear) == resets, "Tornado's clear() resets other state now"
    for header in ('"Server"', '"Content-Type"', '"Date"'):  # the only headers Tornado's clear makes
        assert header in source, f"Tornado's clear() no longer sets {header}"
    assert source.count('": ') == 3 and "self.set_default_headers()" in source
    ours = inspect.getsource(ServiceHandler.clear)
    assert _assigned_attributes(ServiceHandler.clear) >= {"_headers", "_write_buffer"}
    assert "self.set_status(200)" in ours and "self.set_default_headers()" in ours
    assert '"text/html; charset=UTF-8"' in source and '"text/html; charset=UTF-8"' in ours


def test_tornado_requests_take_the_client_from_the_connection_context() -> None:
    """service.http.forwarded.ForwardedHeaders sets `remote_ip` and `protocol` on the connection's context
    before the request is made, as Tornado's own xheaders does; the request copies them."""
    from tornado import httpserver, httputil

    made = inspect.getsource(httputil.HTTPServerRequest.__init__)
    assert 'context = getattr(connection, "context", None)' in made
    assert 'self.remote_ip = getattr(context, "remote_ip", None)' in made
    assert 'self.protocol = getattr(context, "protocol", "http")' in made
    context_init = httpserver._HTTPRequestContext.__init__  # the context HTTPServer gives each connection
    assert {"address", "remote_ip", "protocol"} <= _assigned_attributes(context_init)
    assert "HTTP1ServerConnection(stream, self.conn_params, context)" in inspect.getsource(
        httpserver.HTTPServer.handle_stream)


def test_prometheus_histogram_keeps_buckets_and_sum_as_the_flush_adds_to_them() -> None:
    """RequestTotals.flush adds n observations to a bucket through the Histogram's private
    `_buckets` and `_sum`: the result must be what n calls of observe() give."""
    from prometheus_client import CollectorRegistry, Histogram

    from service.telemetry.metrics import LATENCY_BOUNDS, LATENCY_BUCKETS, RequestTotals

    observed = [0.0005, 0.001, 0.0011, 0.004, 0.1, 0.25, 7.0, 60.0, 61.0, 0.001, 0.02]
    by_observe = Histogram("ref", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for value in observed:
        by_observe.observe(value)
    by_flush = Histogram("ref", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    assert list(by_flush._upper_bounds) == list(LATENCY_BOUNDS) == [*LATENCY_BUCKETS, float("inf")]
    assert len(by_flush._buckets) == len(LATENCY_BOUNDS)
    totals = RequestTotals()
    for value in observed:
        totals.add("GET", "x", 200, value)
    row = totals.rows[("GET", "x", 200)]
    for index, count in enumerate(row[:-1]):
        if count:
            by_flush._buckets[index].inc(count)
    by_flush._sum.inc(row[-1])
    assert [s[:3] for s in by_flush.collect()[0].samples if s.name != "ref_created"] == [
        s[:3] for s in by_observe.collect()[0].samples if s.name != "ref_created"
    ]


def test_request_totals_flush_into_the_service_metrics() -> None:
    """Counts and histogram of a flush equal one observe() and inc() per request, and start again from 0."""
    from prometheus_client import REGISTRY

    from service.telemetry.metrics import RequestTotals

    totals = RequestTotals()
    for seconds in (0.001, 0.003, 0.003, 2.0):
        totals.add("PATCH", "contract_test", 201, seconds)
    totals.add("PATCH", "contract_test", 500, 0.5)
    totals.flush()
    totals.flush()  # nothing new: adds nothing

    def value(name: str, **labels: str) -> float:
        found = REGISTRY.get_sample_value(name, {"method": "PATCH", "handler": "contract_test", **labels})
        return found or 0.0

    assert value("http_requests_total", code="201") == 4 and value("http_requests_total", code="500") == 1
    assert value("http_request_duration_seconds_count") == 5
    assert value("http_request_duration_seconds_bucket", le="0.001") == 1
    assert value("http_request_duration_seconds_bucket", le="0.005") == 3
    assert value("http_request_duration_seconds_bucket", le="0.5") == 4
    assert value("http_request_duration_seconds_bucket", le="+Inf") == 5
    assert abs(value("http_request_duration_seconds_sum") - 2.507) < 1e-9
    assert all(not any(row) for row in totals.rows.values())


# -- what the tick fan-out and the per-socket memory work rely on in Tornado and CPython -----------
# (service/ws/frames.py, service/handlers/sockets.py; bench/broadcast.py measures what they save)


def _set_on_self(function: object) -> set[str]:
    """The `self.<name>` attributes a function assigns."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    return {
        target.attr for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
        and target.value.id == "self"
    }


def test_a_prepared_tick_frame_is_byte_for_byte_tornados_own() -> None:
    """TickerSocket.push_frame sends service.ws.frames.text_frame's bytes where Tornado's
    write_message would have framed the message itself: they must be the same bytes."""
    import asyncio

    from tornado.websocket import WebSocketProtocol13, _WebSocketParams

    from service.ws.frames import text_frame

    class Wire:  # an IOStream that only records
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> asyncio.Future[None]:
            self.written.append(bytes(data))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    async def tornado_frames(payloads: list[bytes]) -> list[bytes]:
        protocol = WebSocketProtocol13(None, mask_outgoing=False, params=_WebSocketParams())  # type: ignore[arg-type]
        protocol.stream = wire = Wire()  # type: ignore[assignment]
        for payload in payloads:
            await protocol.write_message(payload.decode())
        return wire.written

    payloads = [b"x" * size for size in (0, 1, 125, 126, 127, 65535, 65536, 70000)]
    payloads.append('{"type":"tick","note":"é ✓"}'.encode())
    assert [text_frame(p) for p in payloads] == asyncio.run(tornado_frames(payloads))


def test_tornado_compresses_only_when_get_compression_options_says_so() -> None:
    """A prepared frame is only right for a socket without permessage-deflate. TickerSocket.open
    takes `get_compression_options() is None` (the default, which no handler here overrides) to
    mean none was negotiated: Tornado passes that value on and compresses only when it is set.
    (tests/test_broadcast.py checks the wire: no extension agreed, RSV1 clear, when offered.)"""
    from tornado.websocket import WebSocketHandler, WebSocketProtocol13

    from service.handlers.sockets import EchoSocket, TickerSocket

    assert "compression_options=self.get_compression_options()" in inspect.getsource(
        WebSocketHandler.get_websocket_protocol)
    accept = inspect.getsource(WebSocketProtocol13._accept_connection)
    assert 'ext[0] == "permessage-deflate" and self._compression_options is not None' in accept
    assert "self._create_compressors(" in accept
    assert "if self._compressor:" in inspect.getsource(WebSocketProtocol13.write_message)
    for handler in (TickerSocket, EchoSocket):
        assert handler.get_compression_options is WebSocketHandler.get_compression_options


def test_tornado_parts_the_prepared_frame_is_sent_through() -> None:
    """push_frame does what WebSocketHandler.write_message checks and writes, on the same objects:
    `ws_connection`, its `is_closing()` and `stream` (an IOStream whose `writing()` says whether
    anything is queued and whose `socket` is the connection's socket)."""
    import socket

    from tornado.iostream import IOStream
    from tornado.websocket import WebSocketHandler, WebSocketProtocol13

    write_message = inspect.getsource(WebSocketHandler.write_message)
    assert "if self.ws_connection is None or self.ws_connection.is_closing():" in write_message
    assert "return self.stream.write(frame)" in inspect.getsource(WebSocketProtocol13._write_frame)
    assert "self.stream.closed()" in inspect.getsource(WebSocketProtocol13.is_closing)
    accept = inspect.getsource(WebSocketProtocol13._accept_connection)
    assert "self.stream = handler._detach_stream()" in accept

    async def check() -> None:
        near, far = socket.socketpair()
        near.setblocking(False)
        stream = IOStream(near)
        try:
            assert stream.socket is near and not stream.writing()
            stream.write(b"x" * (64 * 1024 * 1024))  # more than any socket buffer takes at once
            assert stream.writing()
        finally:
            stream.close()
            far.close()
        assert stream.socket is None  # send_frame leaves a closed stream to `write`, which raises

    import asyncio

    asyncio.run(check())


def test_tornado_sets_late_on_a_websocket_handler_what_tracked_socket_registers_early() -> None:
    """TrackedSocket.__init__ registers LATE_ATTRIBUTES in CPython's shared key table (why: its
    docstring). They must be what Tornado 6.6 sets after __init__; _release_handshake replaces the
    101's headers, which Tornado keeps in `_headers` and no longer uses once it has detached."""
    from tornado.web import RequestHandler
    from tornado.websocket import WebSocketHandler

    from service.handlers.sockets import LATE_ATTRIBUTES

    detach = inspect.getsource(WebSocketHandler._detach_stream)
    disabled = set(ast.literal_eval(detach[detach.index("["):detach.index("]") + 1]))
    early = _set_on_self(RequestHandler.__init__) | _set_on_self(WebSocketHandler.__init__)
    late = _set_on_self(RequestHandler._execute) | _set_on_self(WebSocketHandler.get) | disabled
    assert late - early == set(LATE_ATTRIBUTES)
    assert {"flush", "finish", "set_header"} <= disabled  # nothing sends or changes `_headers` after
    assert "_headers" in _set_on_self(RequestHandler.clear)


def test_ticker_handlers_keep_attributes_inline_and_let_go_of_the_handshake() -> None:
    """Many concurrent handshakes on the real app in-process (the shape a worker sees): each ticker
    handler keeps its attributes in CPython's inline layout (no __dict__, which a name outside the
    class's shared keys would make, about 730 bytes) and holds no HTTP/1.1 connection objects."""
    import asyncio
    import gc

    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port
    from tornado.websocket import websocket_connect

    from service.app import ServiceApp
    from service.config import Settings
    from service.handlers.sockets import TickerSocket
    from service.http.context import WorkerContext
    from service.http.state import WorkerState
    from service.telemetry import metrics
    from service.ws.ticker import Ticker

    async def scenario() -> list[TickerSocket]:
        ticker = Ticker(0.05, 0)
        app = ServiceApp(Settings(), WorkerContext(WorkerState(0), ticker, metrics.renderer(None)))
        sock, port = bind_unused_port()
        server = HTTPServer(app)
        server.add_sockets([sock])
        ticker.start()
        try:
            clients = await asyncio.gather(
                *(websocket_connect(f"ws://127.0.0.1:{port}/ws/ticker") for _ in range(60))
            )
            for client in clients:
                assert await asyncio.wait_for(client.read_message(), 10) is not None
            handlers = [o for o in gc.get_objects() if isinstance(o, TickerSocket) and o.application is app]
            for client in clients:
                client.close()
            return handlers
        finally:
            ticker.stop()
            if app.pinger is not None:
                app.pinger.stop()
            server.stop()

    handlers = asyncio.run(scenario())
    assert len(handlers) == 60
    for handler in handlers:
        spilled = [r for r in gc.get_referents(handler) if isinstance(r, dict) and "application" in r]
        assert not spilled, f"attributes in a dict: {sorted(spilled[0])}"
        assert handler.request.connection is None and handler.request.server_connection is None
        assert handler.ui is None and not list(handler._headers.get_all())


def test_tornado_tcpserver_keeps_the_maps_pausing_acceptor_fills() -> None:
    """service.http.server.LimitedHTTPServer.add_sockets fills TCPServer's `_sockets` and `_handlers`
    (fd -> socket, fd -> a callable that removes the accept handler) in place of Tornado's own
    `add_accept_handler`; `TCPServer.stop` reads both. Pinned here: if Tornado renames them, the
    drain would leave listeners open."""
    import tornado.tcpserver

    add = inspect.getsource(tornado.tcpserver.TCPServer.add_sockets)
    stop = inspect.getsource(tornado.tcpserver.TCPServer.stop)
    assert "self._sockets[sock.fileno()] = sock" in add
    assert "self._handlers[sock.fileno()] = add_accept_handler(" in add
    assert "self._handlers.pop(fd)()" in stop and "sock.close()" in stop

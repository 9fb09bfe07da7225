"""Soak: churning WebSocket and HTTP clients for a long while, watching each worker's memory, its
file descriptors and the metrics directory.

    python -m loadtests.soak --duration 600          # make soak (D=600)
    python -m loadtests.soak --duration 60 --ws 12   # tests/test_soak.py, what CI runs

**What it starts**, each in a session of its own and all stopped (by process group) before it
exits, on success, failure, Ctrl-C or SIGTERM: the service (`python -m service` on a free
loopback port, 2 workers, its PROMETHEUS_MULTIPROC_DIR a private folder this run watches) and,
unless --direct, Nginx in front of it, configured by the same code `make stack` uses
(deploy/stack.py, nginx/render.py) with one Nginx worker. Through Nginx is the default: it costs
little CPU and is how the service runs in production. Prometheus is not needed: the run scrapes
the service's own /metrics.

**Clients** (asyncio in this process, on plain sockets, so nothing between them and the wire
hides an error): WebSockets that open, take ticks (/ws/ticker) or room messages (/ws/chat, each
sends one message and must get it back) for 1.5-5 s, then close (a share of them drop the TCP
connection instead) and are replaced at once; HTTP clients on keep-alive connections (renewed
every 20-300 requests) and on a new connection per request, across /, /api/hello,
/api/sleep?ms=, short /api/poll, /healthz, /readyz and the 404 and 400 paths; long polls (tick
and room); a publisher (POST /api/publish, below the per-address rate limit); and aborters that
kill requests mid-way (a long /api/sleep or /api/poll left after it was sent, half a request
head, half a body, a WebSocket upgrade left before its answer), by FIN or by RST.

**Worker kills**: --kills times (3) between 20% and 50% of the run, the worker with the highest
id is SIGKILLed; the supervisor restarts it. What the kill cuts (the killed worker's sockets and
requests, Nginx's 502 for a POST it does not retry) is counted apart, not as a failure.

**Samples** every --interval seconds: per worker process (psutil) RSS, open fds; the metrics
directory's file count and bytes; the service's /metrics (its RSS and fd gauges, connections,
requests and 5xx, restarts). Before the churn, a warm-up (every request kind, directly) and a
baseline taken idle; after it, the clients close, Nginx stops (so no idle upstream connection is
left open), each worker's fds are read once more, and the service is stopped (SIGTERM; exit 0).

**Verdict** (each rule, and why, is in `judge_*` below): memory flat per worker process, no fd
leak, metrics directory bounded, zero 5xx and zero unexpected client failures, every killed worker
back, and nothing left running. `loadtests/reports/soak/<time>-<D>s.json` (every figure and
sample) and `.md` (the tables); exit code 0 on PASS, 1 on FAIL, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
REPORTS = Path(__file__).resolve().parent / "reports" / "soak"
MIB = 1024 * 1024
WORKER_PREFIX = "tornado-w"  # service/process/worker.py names worker N's process tornado-wN
LIVE_GAUGE_PREFIX = "gauge_live"  # prometheus-client's live gauges: removed when a process is marked dead
IDEMPOTENT = frozenset({"GET", "HEAD"})


def say(message: str) -> None:
    print(f"soak: {message}", flush=True)


class Interrupted(Exception):
    pass


# -- options -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--duration", type=float, default=600.0, help="seconds of churn (default 600)")
    add("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    add("--workers", type=int, default=2, help="service workers (default 2)")
    add("--ws", type=int, default=48, help="WebSocket seats: each opens, holds, closes, again (default 48)")
    add("--keepalive", type=int, default=6, help="HTTP clients on keep-alive connections (default 6)")
    add("--fresh", type=int, default=3, help="HTTP clients with a new connection per request (default 3)")
    add("--pollers", type=int, default=12, help="long-poll clients (default 12)")
    add("--aborters", type=int, default=2, help="clients that abort requests mid-way (default 2)")
    add("--publish-rate", type=float, default=4.0, help="POST /api/publish per second (default 4)")
    add("--think", type=float, default=0.03, help="most seconds an HTTP client waits between requests")
    add("--kills", type=int, default=3, help="SIGKILLs of one worker, between 20%% and 50%% of the run")
    add("--tick-interval", type=float, default=0.5, help="the service's TICK_INTERVAL (default 0.5)")
    add("--direct", action="store_true", help="clients straight to the service, no Nginx")
    add("--rss-growth-mib", type=float, default=4.0, help="memory rule: MiB allowed (default 4)")
    add("--rss-growth-pct", type=float, default=5.0, help="memory rule: or %% of the middle third if more")
    add(
        "--fd-margin", type=int, default=2, help="fd rule: descriptors above the baseline allowed (default 2)"
    )
    add("--seed", type=int, default=1, help="the clients' random choices")
    add("--reports", type=Path, default=REPORTS, help="where the JSON and Markdown results go")
    args = parser.parse_args(argv)
    if args.duration < 20 or args.interval <= 0 or args.workers < 2:
        parser.error("--duration is at least 20 s, --interval positive, --workers at least 2")
    if args.duration > 7200 or max(args.ws, args.keepalive, args.fresh, args.pollers, args.aborters) > 1000:
        parser.error("bounded: --duration at most 7200 s, at most 1000 clients of each kind")
    if min(args.ws, args.keepalive, args.fresh, args.pollers, args.aborters, args.kills) < 0:
        parser.error("client counts and --kills cannot be negative")
    if args.interval * 9 > args.duration / 2:
        parser.error("--interval too long for --duration: a judged worker needs 9 samples in half the run")
    return args


# -- processes ----------------------------------------------------------------------------------------
def _free_port() -> int:
    """A port below the ephemeral range (where no outgoing connection can take it first), free now."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(10_000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _stop_group(proc: subprocess.Popen[bytes], first: int, grace: float) -> int:
    """`first` to the process, then SIGKILL to its whole session (it was started in one of its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


class Service:
    """`python -m service` in a session of its own; its JSON log read for events (not access lines)."""

    def __init__(self, workers: int, metrics_dir: Path, tick_interval: float) -> None:
        self.workers = workers
        self.metrics_dir = metrics_dir
        self.args = [
            "--address",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--tick-interval",
            f"{tick_interval:g}",
            "--shutdown-grace",
            "10",
        ]
        self.events: list[dict[str, Any]] = []
        self.access_lines = 0
        self.bad_lines: list[str] = []
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pids_seen: set[int] = set()
        self.exit_code: int | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", *self.args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pids_seen.add(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while len(self.live_workers()) < self.workers or not self.port:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the service did not start; last lines: {self.events[-5:]} {self.bad_lines[-5:]}"
                )
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            if b'"event":"request"' in raw or b'"event": "request"' in raw:
                self.access_lines += 1  # one per request: counted, not kept
                continue
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self.lock:
                if not isinstance(event, dict):
                    self.bad_lines.append(line[:500])
                    continue
                self.events.append(event)
                if event.get("event") == "listening":
                    self.port = int(event["port"])
                if event.get("event") == "worker started":
                    self.pids_seen.add(int(event["pid"]))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("event") == name]

    def live_workers(self) -> dict[int, int]:
        """worker id -> pid, for the workers running now (read from the process names they set)."""
        found: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                with contextlib.suppress(psutil.Error):
                    name = child.name()
                    if name.startswith(WORKER_PREFIX) and child.status() != psutil.STATUS_ZOMBIE:
                        found[int(name.removeprefix(WORKER_PREFIX))] = child.pid
        started = {int(e["pid"]) for e in self.named("worker started")}
        return {w: pid for w, pid in found.items() if pid in started}  # serving, not just forked

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.exit_code = _stop_group(self.proc, signal.SIGTERM, grace=30)
        return self.exit_code


class Nginx:
    """Nginx in front of the service, rendered by the stack's own code (deploy/stack.py, nginx/render.py)."""

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        from deploy import stack

        for tool in ("nginx", "openssl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (make soak installs it; or --direct)")
        self.workdir = workdir
        self.port = _free_port()
        self.error_log = workdir / "error.log"
        cert, key = stack.self_signed(workdir / "tls")
        self.conf = stack.render_nginx(
            workdir / "nginx.conf",
            workdir / "run",
            UPSTREAM=f"127.0.0.1:{upstream_port}",
            LISTEN_ADDRESS="127.0.0.1",
            HTTP_PORT=str(self.port),
            TLS_PORT=str(_free_port()),
            STATUS_PORT=str(_free_port()),
            TLS_CERT=str(cert),
            TLS_KEY=str(key),
            ACCESS_LOG="/dev/null",
            ERROR_LOG=str(self.error_log),
            WORKER_PROCESSES="1",
        )
        self.command = stack.nginx_command(self.conf, self.error_log)
        self.port_open = stack.port_open
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids_seen: set[int] = set()
        self.exit_code: int | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pids_seen.add(self.proc.pid)
        if not self.port_open(
            self.port, 15, alive=lambda: self.proc is not None and self.proc.poll() is None
        ):
            raise RuntimeError(f"Nginx did not start: {self.errors()[-3:]}")
        with contextlib.suppress(psutil.Error):
            self.pids_seen |= {p.pid for p in psutil.Process(self.proc.pid).children()}

    def errors(self) -> list[str]:
        if not self.error_log.exists():
            return []
        return [
            line
            for line in self.error_log.read_text(errors="replace").splitlines()
            if "[emerg]" in line or "[alert]" in line or "[crit]" in line or "[error]" in line
        ]

    def stop(self) -> int:
        """SIGQUIT: Nginx closes its connections (the upstream keep-alive ones too) and leaves."""
        if self.proc is None:
            return 0
        self.exit_code = _stop_group(self.proc, signal.SIGQUIT, grace=15)
        return self.exit_code


# -- the wire: HTTP/1.1 and RFC 6455, client side --------------------------------------------------
class ProtocolError(Exception):
    pass


# What a request or an upgrade on the wire may raise when the other end misbehaves or goes away
# (a failure to count, not a bug of the driver): both the HTTP and the WebSocket clients catch these.
WIRE_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ProtocolError,
    TimeoutError,
    ValueError,
)


class Refused(Exception):
    """A WebSocket upgrade answered with something other than 101."""

    def __init__(self, status: int, pid: int | None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.pid = pid


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def pid(self) -> int | None:
        value = self.headers.get("x-worker-pid", "")
        return int(value) if value.isdigit() else None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_body(reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, str]) -> bytes:
    if method == "HEAD" or status in (204, 304) or status < 200:
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


def _abort(writer: asyncio.StreamWriter | None, rst: bool) -> None:
    """Drop the connection at once: with `rst`, a TCP reset (SO_LINGER 0) instead of a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if rst and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def request_bytes(
    method: str, target: str, port: int, body: bytes = b"", close: bool = False, extra: str = ""
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: soak\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


class HttpConnection:
    """One client connection, kept alive between requests unless told otherwise."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0
        self.pid: int | None = None  # the worker that answered last on it (X-Worker-PID)
        self.answered = False  # whether the current request got any byte back

    async def request(self, method: str, target: str, body: bytes = b"", close: bool = False) -> Response:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.used, self.pid = 0, None
        assert self.reader is not None
        self.answered = False
        self.writer.write(request_bytes(method, target, self.port, body, close))
        await self.writer.drain()
        status, headers = await read_head(self.reader)
        self.answered = True
        response = Response(status, headers, await read_body(self.reader, method, status, headers))
        self.used += 1
        self.pid = response.pid or self.pid
        if close or headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    @property
    def reused(self) -> bool:
        return self.writer is not None and self.used > 0

    def abort(self, rst: bool = False) -> None:
        _abort(self.writer, rst)
        self.reader = self.writer = None

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


class WebSocket:
    """A client WebSocket: the handshake, masked frames out, one reader task (`pump`) for frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int | None) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = pid
        self.texts = 0
        self.ticks = 0
        self.token = b""
        self.echoed = False
        self.close_code: int | None = None
        self.sent_close = False

    @classmethod
    async def connect(cls, port: int, path: str) -> WebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            key = base64.b64encode(os.urandom(16))
            extra = (
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
            )
            writer.write(request_bytes("GET", path, port, extra=extra))
            status, headers = await read_head(reader)
            pid_text = headers.get("x-worker-pid", "")
            pid = int(pid_text) if pid_text.isdigit() else None
            if status != 101:
                raise Refused(status, pid)
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != accept:
                raise ProtocolError("bad Sec-WebSocket-Accept")
        except BaseException:
            _abort(writer, rst=False)
            raise
        return cls(reader, writer, pid)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def pump(self) -> None:
        """Every frame until the server's close frame; answers pings, counts ticks, finds the token."""
        reader = self.reader
        message = b""
        while True:
            first, second = await reader.readexactly(2)
            if second & 0x80:
                raise ProtocolError("the server masked a frame")
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == PING:
                self.send(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.sent_close:  # the server closed first: answer, as RFC 6455 says
                    self.send(CLOSE, payload[:2])
                return
            message += payload
            if not first & 0x80:
                continue  # a fragment: the rest follows in continuation frames
            self.texts += 1
            if b'"tick"' in message:
                self.ticks += 1
            if self.token and self.token in message:
                self.echoed = True
            message = b""

    def start_close(self, code: int = 1000) -> None:
        self.sent_close = True
        self.send(CLOSE, struct.pack("!H", code))

    def abort(self, rst: bool = False) -> None:
        _abort(self.writer, rst)

    async def finish(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


# -- the clients ------------------------------------------------------------------------------------------
@dataclass
class Failure:
    t: float  # seconds since the churn began
    kind: str  # the client that saw it (ws_ticker, http_keepalive, ...)
    what: str  # the request or socket
    error: str
    pid: int | None  # the worker it was talking to, when known
    cause: str = "unexpected"  # or "worker kill": decided once the run is over (attribute_failures)


SLEEPS_MS = (0, 0, 10, 50, 100, 250)
# weight, method, target (from a random source), statuses expected: the HTTP clients' mix
MIX: tuple[tuple[int, str, Callable[[random.Random], str], frozenset[int]], ...] = (
    (30, "GET", lambda _: "/api/hello", frozenset({200})),
    (20, "GET", lambda r: f"/api/sleep?ms={r.choice(SLEEPS_MS)}", frozenset({200})),
    (10, "GET", lambda _: "/", frozenset({200})),
    (10, "GET", lambda _: "/healthz", frozenset({200})),
    (5, "GET", lambda _: "/readyz", frozenset({200})),
    (10, "GET", lambda r: f"/api/poll?timeout={r.choice(('0', '0.2', '0.6'))}", frozenset({200, 204})),
    (10, "GET", lambda r: f"/api/poll?room=soak-{r.randrange(4)}&timeout=0.3", frozenset({200, 204})),
    (3, "GET", lambda r: f"/no/such/{r.randrange(10_000)}", frozenset({404})),
    (2, "GET", lambda _: "/api/sleep?ms=soon", frozenset({400})),
)
ROOMS = 4


class Clients:
    """Every client of the churn, sharing one tally; `stopping` ends them at their next step."""

    def __init__(self, port: int, args: argparse.Namespace, started: float) -> None:
        self.port = port
        self.args = args
        self.started = started  # loop time of the churn's start
        self.rng = random.Random(args.seed)
        self.stopping = asyncio.Event()
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: list[Failure] = []
        self.service_5xx = 0  # answers with 5xx carrying X-Worker-Id: the service's own
        self.proxy_5xx = 0  # 5xx without it: Nginx's
        self.seq = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.started

    def fail(self, kind: str, what: str, error: str, pid: int | None) -> None:
        self.counts[kind]["failed"] += 1
        self.failures.append(Failure(round(self.now(), 2), kind, what, error, pid))

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # -- HTTP ---------------------------------------------------------------------------------
    def pick(self) -> tuple[str, str, frozenset[int]]:
        rng = self.rng
        pick = rng.uniform(0, sum(w for w, *_ in MIX))
        for weight, method, target, expected in MIX:
            pick -= weight
            if pick <= 0:
                return method, target(rng), expected
        return MIX[0][1], MIX[0][2](rng), MIX[0][3]

    async def http(
        self,
        kind: str,
        conn: HttpConnection,
        method: str,
        target: str,
        expected: frozenset[int],
        body: bytes = b"",
        close: bool = False,
    ) -> None:
        """One request; a reused connection that the server had closed is retried once, idempotent only
        (what every HTTP client does, RFC 9112 section 9.3.1)."""
        what = f"{method} {target.split('?')[0]}"
        for attempt in (1, 2):
            reused = conn.reused
            try:
                response = await asyncio.wait_for(conn.request(method, target, body, close), 20)
            except WIRE_ERRORS as exc:
                # Through Nginx a client connection is no worker's: only directly does it name one.
                pid = conn.pid if self.args.direct else None
                conn.abort()
                if (
                    attempt == 1
                    and reused
                    and not conn.answered
                    and method in IDEMPOTENT
                    and not isinstance(exc, TimeoutError)
                ):
                    self.counts[kind]["retried"] += 1
                    continue
                self.fail(kind, what, type(exc).__name__, pid)
                return
            if response.status >= 500:
                if "x-worker-id" in response.headers:
                    self.service_5xx += 1
                else:
                    self.proxy_5xx += 1
            if response.status in expected:
                self.counts[kind]["ok"] += 1
            else:
                self.fail(kind, what, f"status {response.status}", response.pid)
            return

    async def keepalive_client(self) -> None:
        conn = HttpConnection(self.port)
        budget = self.rng.randint(20, 300)
        try:
            while not self.stopping.is_set():
                method, target, expected = self.pick()
                await self.http("http_keepalive", conn, method, target, expected)
                if conn.used >= budget:
                    await conn.close()
                    budget = self.rng.randint(20, 300)
                await self.pause(self.rng.uniform(0, self.args.think))
        finally:
            await conn.close()

    async def fresh_client(self) -> None:
        while not self.stopping.is_set():
            method, target, expected = self.pick()
            await self.http("http_new", HttpConnection(self.port), method, target, expected, close=True)
            await self.pause(self.rng.uniform(0, self.args.think * 2))

    async def poller(self) -> None:
        conn = HttpConnection(self.port)
        try:
            while not self.stopping.is_set():
                timeout = self.rng.choice(("1", "2", "3"))
                room = f"room=soak-{self.rng.randrange(ROOMS)}&" if self.rng.random() < 0.3 else ""
                await self.http(
                    "long_poll", conn, "GET", f"/api/poll?{room}timeout={timeout}", frozenset({200, 204})
                )
        finally:
            await conn.close()

    async def publisher(self) -> None:
        conn = HttpConnection(self.port)
        period = 1.0 / self.args.publish_rate
        try:
            while not self.stopping.is_set():
                self.seq += 1
                body = json.dumps({"data": f"soak publish {self.seq}"}).encode()
                await self.http(
                    "publish",
                    conn,
                    "POST",
                    f"/api/publish?room=soak-{self.seq % ROOMS}",
                    frozenset({202}),
                    body=body,
                )
                await self.pause(period)
        finally:
            await conn.close()

    async def aborter(self) -> None:
        """Requests the client gives up on mid-way: never a failure, unless the connect itself fails."""
        rng = self.rng
        ways = ("sleep", "poll", "half head", "half body", "ws upgrade")
        while not self.stopping.is_set():
            way = rng.choice(ways)
            rst = rng.random() < 0.5
            writer: asyncio.StreamWriter | None = None
            try:
                _, opened = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                writer = opened
                if way == "sleep":
                    opened.write(request_bytes("GET", "/api/sleep?ms=2000", self.port))
                elif way == "poll":
                    opened.write(request_bytes("GET", "/api/poll?timeout=20", self.port))
                elif way == "half head":
                    whole = request_bytes("GET", "/api/hello", self.port)
                    opened.write(whole[: len(whole) // 2])
                elif way == "half body":
                    body = json.dumps({"data": "x" * 64}).encode()
                    whole = request_bytes("POST", "/api/publish?room=soak-0", self.port, body)
                    opened.write(whole[: len(whole) - len(body) // 2])
                else:
                    key = base64.b64encode(os.urandom(16)).decode()
                    opened.write(
                        request_bytes(
                            "GET",
                            "/ws/ticker",
                            self.port,
                            extra=(
                                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                "Sec-WebSocket-Version: 13\r\n"
                            ),
                        )
                    )
                await opened.drain()
                await asyncio.sleep(rng.uniform(0.05, 0.8))
                self.counts["abort"]["aborted"] += 1
            except (OSError, TimeoutError) as exc:
                self.fail("abort", f"connect for {way}", type(exc).__name__, None)
            finally:
                _abort(writer, rst)
            await self.pause(rng.uniform(0.05, 0.3))

    # -- WebSockets ---------------------------------------------------------------------------
    async def websocket_seat(self, seat: int) -> None:
        rng = self.rng
        turn = 0
        while not self.stopping.is_set():
            turn += 1
            chat = rng.random() < 0.3
            path = f"/ws/chat?room=soak-{rng.randrange(ROOMS)}" if chat else "/ws/ticker"
            await self.websocket(
                "ws_chat" if chat else "ws_ticker",
                path,
                rng.uniform(1.5, 5.0),
                abort=rng.random() < 0.2,
                token=f"soak<{seat}.{turn}>" if chat else "",  # delimited: no token is part of another
            )
            await self.pause(rng.uniform(0, 0.2))

    async def websocket(self, kind: str, path: str, hold: float, abort: bool, token: str) -> None:
        what = path.split("?")[0]
        try:
            ws = await asyncio.wait_for(WebSocket.connect(self.port, path), 10)
        except Refused as exc:
            self.fail(kind, what, f"upgrade answered {exc.status}", exc.pid)
            return
        except WIRE_ERRORS as exc:
            self.fail(kind, what, f"upgrade: {type(exc).__name__}", None)
            return
        opened = self.now()
        pump = asyncio.ensure_future(ws.pump())
        try:
            if token:
                ws.token = token.encode()
                ws.send(TEXT, ws.token)
            stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
            waiting: list[asyncio.Future[Any]] = [pump, stop]
            await asyncio.wait(waiting, timeout=hold, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            held = self.now() - opened
            if pump.done():  # the server closed it, or the connection broke, before the client did
                error = pump.exception()
                self.fail(
                    kind,
                    what,
                    f"lost: {type(error).__name__}" if error else f"server closed it ({ws.close_code})",
                    ws.pid,
                )
                ws.abort()
                return
            if kind == "ws_ticker" and held >= 2 * self.args.tick_interval + 0.5 and not ws.ticks:
                self.fail(kind, what, f"no tick in {held:.1f} s", ws.pid)
            elif kind == "ws_chat" and held >= 1.5 and not ws.echoed:
                self.fail(kind, what, f"own message not back in {held:.1f} s", ws.pid)
            if abort:
                ws.abort(rst=self.rng.random() < 0.5)
                self.counts[kind]["aborted"] += 1
                return
            ws.start_close(1000)
            try:
                await asyncio.wait_for(pump, 10)
            except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError) as exc:
                self.fail(kind, what, f"closing: {type(exc).__name__}", ws.pid)
                ws.abort()
                return
            if ws.close_code != 1000:
                self.fail(kind, what, f"close answered {ws.close_code}", ws.pid)
            else:
                self.counts[kind]["ok"] += 1
            await ws.finish()
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if not ws.writer.is_closing():
                ws.abort()

    def tasks(self) -> list[asyncio.Task[None]]:
        a = self.args
        coros: list[Any] = [self.websocket_seat(i) for i in range(a.ws)]
        coros += [self.keepalive_client() for _ in range(a.keepalive)]
        coros += [self.fresh_client() for _ in range(a.fresh)]
        coros += [self.poller() for _ in range(a.pollers)]
        coros += [self.aborter() for _ in range(a.aborters)]
        if a.publish_rate > 0:
            coros.append(self.publisher())
        return [asyncio.ensure_future(c) for c in coros]


# -- what is sampled ----------------------------------------------------------------------------------------
def metrics_files(directory: Path) -> dict[str, tuple[int, int]]:
    """file name -> (apparent bytes, allocated bytes) of every file in the metrics directory."""
    found = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat()
                found[entry.name] = (stat.st_size, stat.st_blocks * 512)
    return found


def file_pid(name: str) -> int | None:
    """The pid in prometheus-client's file names: counter_123.db, gauge_livesum_123.db."""
    stem = name.removesuffix(".db").rpartition("_")[2]
    return int(stem) if stem.isdigit() else None


def tcp_connections(pid: int) -> int:
    """The process's TCP sockets that are not listeners (established, closing, half-closed)."""
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.raddr)
    except psutil.Error:
        return -1


def process_figures(pid: int) -> dict[str, int] | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return {"rss": process.memory_info().rss, "fds": process.num_fds()}
    except psutil.Error:
        return None


def parse_metrics(text: str) -> dict[str, Any]:
    """The figures of the service's own /metrics this report keeps."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {
        "rss": {},
        "fds": {},
        "connections": {},
        "requests": 0.0,
        "requests_5xx": 0.0,
        "restarts": 0.0,
        "websockets": 0.0,
        "long_polls": 0.0,
    }
    per_worker = {
        "tornado_worker_resident_memory_bytes": "rss",
        "tornado_worker_open_fds": "fds",
        "tornado_connections_open": "connections",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name in per_worker:
                out[per_worker[name]][labels.get("worker", "")] = value
            elif name == "http_requests_total":
                out["requests"] += value
                if labels.get("code", "").startswith("5"):
                    out["requests_5xx"] += value
            elif name == "tornado_worker_restarts_total":
                out["restarts"] += value
            elif name == "tornado_websocket_connections_open":
                out["websockets"] += value
            elif name == "tornado_long_polls_waiting":
                out["long_polls"] += value
    return out


async def scrape(port: int) -> dict[str, Any] | None:
    """The service's /metrics, straight from it (Nginx answers /metrics with 404 on purpose)."""
    conn = HttpConnection(port)
    try:
        response = await asyncio.wait_for(conn.request("GET", "/metrics", close=True), 15)
    except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError, ValueError):
        conn.abort()
        return None
    if response.status != 200:
        return None
    return parse_metrics(response.body.decode())


@dataclass
class Kill:
    slot: int
    pid: int
    t: float  # seconds since the churn began
    new_pid: int | None = None
    back_after: float | None = None  # seconds until its replacement logged "worker started"
    files: list[str] = field(default_factory=list)  # the killed pid's metric files just before
    kept: list[str] = field(default_factory=list)  # ...of which prometheus-client keeps (not live gauges)
    kept_bytes: int = 0
    live_left: list[str] = field(default_factory=list)  # its live-gauge files still there after the restart


# -- the run -------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="soak-"))
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir()
        self.service = Service(args.workers, self.metrics_dir, args.tick_interval)
        self.nginx: Nginx | None = None
        self.samples: list[dict[str, Any]] = []
        self.kills: list[Kill] = []
        self.baseline: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self.clients: Clients | None = None
        self.started = 0.0  # loop time of the churn's start
        self.churn_seconds = 0.0
        self.interrupted = False
        self.notes: list[str] = []
        self.final_metrics: dict[str, Any] | None = None
        self.nginx_errors: list[str] = []

    @property
    def client_port(self) -> int:
        return self.nginx.port if self.nginx is not None else self.service.port

    # -- set-up and tear-down (synchronous) ------------------------------------------------------
    def start(self) -> None:
        say(f"starting the service ({self.args.workers} workers, metrics directory {self.metrics_dir})")
        self.service.start()
        if not self.args.direct:
            self.nginx = Nginx(self.workdir / "nginx", self.service.port)
            self.nginx.start()
        target = f"Nginx on 127.0.0.1:{self.nginx.port} in front of" if self.nginx else "directly"
        say(f"clients go {target} the service on 127.0.0.1:{self.service.port}")

    def cleanup(self) -> None:
        """Every process this run started, by process group; then its working directory."""
        if self.nginx is not None and self.nginx.exit_code is None:
            self.nginx.stop()
        if self.service.exit_code is None:
            self.service.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        seen = self.service.pids_seen | (self.nginx.pids_seen if self.nginx else set())
        left = []
        for pid in seen:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
        return sorted(left)

    # -- the asynchronous part: warm-up, churn with samples and kills, wind-down ------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._interrupt)
        await self.warm_up()
        self.baseline = await self.idle_figures("baseline")
        say(f"baseline: {self.describe(self.baseline)}")
        self.started = loop.time()
        self.clients = Clients(self.client_port, self.args, self.started)
        tasks = self.clients.tasks()
        say(
            f"churn for {self.args.duration:g} s: {len(tasks)} clients, "
            f"a sample every {self.args.interval:g} s, "
            f"{self.args.kills} kill(s) of worker {self.args.workers - 1}"
        )
        sampler = asyncio.ensure_future(self.sample_loop())
        killer = asyncio.ensure_future(self.kill_loop())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients.stopping.wait(), self.args.duration)
        finally:
            self.churn_seconds = loop.time() - self.started
            self.clients.stopping.set()
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
            await self.wind_down(tasks)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

    def _interrupt(self) -> None:
        if not self.interrupted:
            say("interrupted: stopping the clients, then everything")
            self.interrupted = True
        if self.clients is not None:
            self.clients.stopping.set()

    async def warm_up(self) -> None:
        """Every request kind and both WebSocket kinds, straight to the service, until every worker
        has answered: each worker's lazily made state (metric files, label values, bus sockets) exists
        before the baseline is read, so what the baseline is compared with is the clients' doing."""
        port = self.service.port
        workers = set(self.service.live_workers().values())
        answered: set[int] = set()
        published: set[int] = set()  # a publish opens the worker's sockets to its peers (the embedded bus)
        rng = random.Random(0)
        for rounds in range(1, 41):
            for _weight, method, target, _expected in MIX:
                conn = HttpConnection(port)
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
                    response = await asyncio.wait_for(conn.request(method, target(rng), close=True), 10)
                    answered |= {response.pid} if response.pid else set()
                conn.abort()
            publish = HttpConnection(port)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
                response = await asyncio.wait_for(
                    publish.request("POST", "/api/publish?room=soak-0", b'{"data": "warm-up"}', close=True),
                    10,
                )
                published |= {response.pid} if response.pid else set()
            publish.abort()
            for path in ("/ws/ticker", "/ws/chat?room=soak-0", "/ws/echo"):
                with contextlib.suppress(
                    OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError, Refused
                ):
                    ws = await asyncio.wait_for(WebSocket.connect(port, path), 10)
                    ws.send(TEXT, b"warm-up")
                    pump = asyncio.ensure_future(ws.pump())
                    await asyncio.sleep(self.args.tick_interval + 0.1)
                    ws.start_close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pump, 5)
                    await ws.finish()
            if rounds >= 3 and workers <= answered and workers <= published:
                break
        if not (workers <= answered and workers <= published):
            self.notes.append(
                f"warm-up reached workers {sorted(answered)} (published on {sorted(published)}) "
                f"of {sorted(workers)}"
            )
        await scrape(port)

    async def idle_figures(self, label: str, settle: float = 20.0) -> dict[str, Any]:
        """Each worker's and the supervisor's figures once no client connection is left open (waiting
        up to `settle` s for that), and the metrics directory's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle
        while True:
            workers = self.service.live_workers()
            connections = {slot: tcp_connections(pid) for slot, pid in workers.items()}
            if all(n == 0 for n in connections.values()) or loop.time() > deadline:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)  # a closed connection's descriptor goes with the loop's next turn
        figures: dict[str, Any] = {"label": label, "workers": {}, "connections": connections}
        for slot, pid in sorted(workers.items()):
            figures["workers"][str(slot)] = {
                "pid": pid,
                **(process_figures(pid) or {}),
                "tcp_connections": tcp_connections(pid),
            }
        figures["supervisor"] = {"pid": self.service.pid, **(process_figures(self.service.pid) or {})}
        files = metrics_files(self.metrics_dir)
        figures["metrics_dir"] = {
            "files": len(files),
            "bytes": sum(s for s, _ in files.values()),
            "allocated": sum(a for _, a in files.values()),
            "names": sorted(files),
        }
        return figures

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        workers = ", ".join(
            f"w{slot} pid {w.get('pid')} rss {w.get('rss', 0) / MIB:.1f} MiB fds {w.get('fds')}"
            for slot, w in figures["workers"].items()
        )
        d = figures["metrics_dir"]
        return f"{workers}; metrics directory {d['files']} files, {d['bytes'] / 1024:.0f} KiB"

    async def sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.sample()
            next_at += self.args.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def sample(self) -> None:
        assert self.clients is not None
        t = round(self.clients.now(), 2)
        workers: dict[str, Any] = {}
        for slot, pid in sorted(self.service.live_workers().items()):
            figures = process_figures(pid)
            if figures is not None:
                workers[str(slot)] = {"pid": pid, **figures}
        files = metrics_files(self.metrics_dir)
        row: dict[str, Any] = {
            "t": t,
            "workers": workers,
            "supervisor": process_figures(self.service.pid),
            "metrics_dir": {
                "files": len(files),
                "bytes": sum(s for s, _ in files.values()),
                "allocated": sum(a for _, a in files.values()),
            },
            "metrics": await scrape(self.service.port),
        }
        self.samples.append(row)
        c = self.clients
        done = sum(n for kind in c.counts.values() for key, n in kind.items() if key in ("ok", "aborted"))
        served = row["metrics"] or {}
        say(
            f"[{t:6.0f} s] "
            + ", ".join(f"w{s} {w['rss'] / MIB:.1f} MiB {w['fds']} fds" for s, w in workers.items())
            + f"; dir {len(files)} files; clients {done:,} done, {len(c.failures)} failed; "
            f"server {served.get('requests', 0):,.0f} requests, {served.get('websockets', 0):.0f} websockets"
        )

    def kill_times(self) -> list[float]:
        kills, duration = self.args.kills, self.args.duration
        if kills <= 0:
            return []
        if kills == 1:
            return [0.35 * duration]
        return [duration * (0.2 + 0.3 * i / (kills - 1)) for i in range(kills)]

    async def kill_loop(self) -> None:
        assert self.clients is not None
        slot = self.args.workers - 1
        for at in self.kill_times():
            await asyncio.sleep(max(0.0, at - self.clients.now()))
            pid = self.service.live_workers().get(slot)
            if pid is None:
                self.notes.append(f"no worker {slot} to kill at {at:.0f} s")
                continue
            files = metrics_files(self.metrics_dir)
            mine = sorted(n for n in files if file_pid(n) == pid)
            kept = [n for n in mine if not n.startswith(LIVE_GAUGE_PREFIX)]
            kill = Kill(
                slot,
                pid,
                round(self.clients.now(), 2),
                files=mine,
                kept=kept,
                kept_bytes=sum(files[n][0] for n in kept),
            )
            self.kills.append(kill)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            say(f"[{kill.t:6.0f} s] SIGKILL worker {slot} (pid {pid})")
            killed_at = asyncio.get_running_loop().time()
            while kill.new_pid is None and asyncio.get_running_loop().time() - killed_at < 30:
                await asyncio.sleep(0.05)
                new = self.service.live_workers().get(slot)
                if new is not None and new != pid:
                    kill.new_pid = new
                    kill.back_after = round(asyncio.get_running_loop().time() - killed_at, 2)
            await asyncio.sleep(1.0)  # the supervisor marks the dead pid before it forks again
            kill.live_left = sorted(
                n
                for n in metrics_files(self.metrics_dir)
                if file_pid(n) == pid and n.startswith(LIVE_GAUGE_PREFIX)
            )
            say(
                f"[{self.clients.now():6.0f} s] worker {slot} back as pid {kill.new_pid} "
                f"after {kill.back_after} s"
            )

    async def wind_down(self, tasks: list[asyncio.Task[None]]) -> None:
        """The clients finish what they are doing and close; then Nginx stops; then the idle figures."""
        assert self.clients is not None
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
            self.notes.append(f"{len(pending)} client(s) still busy 30 s after the churn: cancelled")
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                self.clients.fail("client", "client task", f"crashed: {error!r}", None)
        await self.sample()
        self.final_metrics = await scrape(self.service.port)
        if self.nginx is not None:
            await asyncio.to_thread(self.nginx.stop)
            self.nginx_errors = self.nginx.errors()
        self.final = await self.idle_figures("final")
        say(f"after the churn: {self.describe(self.final)}")

    # -- verdict -------------------------------------------------------------------------------------
    def attribute_failures(self) -> None:
        """A failure is the kill's doing when it was on the killed worker (its pid known), or, pid
        unknown, within the kill's window: from just before the SIGKILL until 2 s after the
        replacement started (a connection reset, Nginx's 502 for a POST it may not retry)."""
        assert self.clients is not None
        for failure in self.clients.failures:
            for kill in self.kills:
                end = kill.t + (kill.back_after if kill.back_after is not None else 30.0) + 2.0
                on_killed = failure.pid == kill.pid and failure.t >= kill.t - 0.5
                in_window = failure.pid is None and kill.t - 0.5 <= failure.t <= end
                if on_killed or in_window:
                    failure.cause = "worker kill"

    def judge_memory(self) -> dict[str, Any]:
        """Flat memory, per worker process: the median RSS of the last third of its life in the churn
        against the median of the middle third; the first third is warm-up (arenas, caches and
        buffers filling). Growth may be at most --rss-growth-mib MiB or --rss-growth-pct % of the
        middle third, whichever is more. Medians ignore single spikes; a leak grows every third by
        its rate times a third of the life: in the 10-minute run a worker serves about 17,000
        requests and 1,500 WebSockets a third, so 4 MiB catches about 250 bytes a request or 3 KiB
        a WebSocket. A process lives too briefly to judge when it had
        less than a quarter of the run or 9 samples (a worker killed early); each worker slot's
        last process lives at least half the run and must be judged."""
        a = self.args
        lives: dict[int, list[tuple[float, int, int]]] = defaultdict(list)  # pid -> (t, rss, slot)
        for row in self.samples:
            if row["t"] > self.churn_seconds:
                continue
            for slot, w in row["workers"].items():
                lives[w["pid"]].append((row["t"], w["rss"], int(slot)))
        processes = []
        judged_pids: set[int] = set()
        last_pid = {int(s): w["pid"] for s, w in self.final.get("workers", {}).items()}
        passed = True
        for pid, points in lives.items():
            slot = points[0][2]
            span = points[-1][0] - points[0][0]
            entry: dict[str, Any] = {
                "slot": slot,
                "pid": pid,
                "from": points[0][0],
                "to": points[-1][0],
                "samples": len(points),
            }
            if span < max(0.25 * self.churn_seconds, 9 * a.interval) or len(points) < 9:
                entry["verdict"] = "too short to judge"
                if last_pid.get(slot) == pid:
                    passed = False
                    entry["verdict"] = "FAIL: the slot's last process too short to judge"
                processes.append(entry)
                continue
            start = points[0][0]
            thirds: list[list[int]] = [[], [], []]
            for t, rss, _ in points:
                thirds[min(2, int(3 * (t - start) / span))].append(rss)
            middle, last = statistics.median(thirds[1]), statistics.median(thirds[2])
            growth = last - middle
            limit = max(a.rss_growth_mib * MIB, a.rss_growth_pct / 100 * middle)
            ok = growth <= limit
            passed &= ok
            judged_pids.add(pid)
            entry.update(
                first_median_mib=round(statistics.median(thirds[0]) / MIB, 2),
                middle_median_mib=round(middle / MIB, 2),
                last_median_mib=round(last / MIB, 2),
                growth_mib=round(growth / MIB, 2),
                limit_mib=round(limit / MIB, 2),
                slope_mib_per_min=round(
                    _slope([(t, r) for t, r, _ in points if t >= start + span / 3]) * 60 / MIB, 3
                ),
                verdict="flat" if ok else "FAIL: grew",
            )
            processes.append(entry)
        # Every slot's last process (the one serving at the end) must have been judged.
        missing = sorted(slot for slot in range(a.workers) if last_pid.get(slot) not in judged_pids)
        if missing:
            passed = False
        return {
            "passed": passed,
            "processes": sorted(processes, key=lambda p: (p["slot"], p["from"])),
            "slots_not_judged": missing,
        }

    def judge_fds(self) -> dict[str, Any]:
        """No fd leak: once the clients have closed and Nginx has stopped, each worker's open fds are
        back within --fd-margin of the baseline taken idle after the warm-up (a restarted worker is
        compared with its slot's baseline: it is forked from the same supervisor, with the same
        inherited descriptors and the same lazily opened files), no TCP connection is left in it, and
        the supervisor's fds are back at its own baseline."""
        margin = self.args.fd_margin
        rows = []
        passed = True
        peaks: dict[str, int] = defaultdict(int)
        for row in self.samples:
            for slot, w in row["workers"].items():
                peaks[slot] = max(peaks[slot], w["fds"])
        for slot, base in sorted(self.baseline.get("workers", {}).items()):
            end = self.final.get("workers", {}).get(slot, {})
            ok = (
                end.get("fds") is not None
                and base.get("fds") is not None
                and end["fds"] <= base["fds"] + margin
                and end.get("tcp_connections") == 0
            )
            passed &= ok
            rows.append(
                {
                    "slot": slot,
                    "baseline_pid": base.get("pid"),
                    "baseline": base.get("fds"),
                    "peak": peaks.get(slot),
                    "final_pid": end.get("pid"),
                    "final": end.get("fds"),
                    "final_tcp_connections": end.get("tcp_connections"),
                    "passed": ok,
                }
            )
        sup_base, sup_end = self.baseline.get("supervisor", {}), self.final.get("supervisor", {})
        sup_ok = (
            sup_end.get("fds") is not None
            and sup_base.get("fds") is not None
            and sup_end["fds"] <= sup_base["fds"] + margin
        )
        passed &= sup_ok
        rows.append(
            {
                "slot": "supervisor",
                "baseline_pid": sup_base.get("pid"),
                "baseline": sup_base.get("fds"),
                "peak": max((r["supervisor"] or {}).get("fds", 0) for r in self.samples)
                if self.samples
                else None,
                "final_pid": sup_end.get("pid"),
                "final": sup_end.get("fds"),
                "final_tcp_connections": None,
                "passed": sup_ok,
            }
        )
        return {"passed": passed, "margin": margin, "rows": rows}

    def judge_metrics_dir(self) -> dict[str, Any]:
        """Bounded, as service/telemetry/metrics_dir.py promises: a dead worker's live gauges go (the
        supervisor marks it dead), its counters and histograms stay (so rate() never goes backwards) until the
        next start, and MAX_RESTARTS bounds how many dead workers there can be. So the file count
        may grow by the kept files of each restart and by nothing else (not with traffic, not with
        time): at every sample it is at most the baseline plus the kept files of the kills so far,
        no live-gauge file of a killed worker is left, and the files do not swell (bytes per file at
        the end at most twice the baseline's: one growth of prometheus-client's mmap at most, which
        happens only with new label values, and those are bounded)."""
        base = self.baseline.get("metrics_dir", {})
        base_files, base_bytes = base.get("files", 0), base.get("bytes", 0)
        over = []
        for row in self.samples:
            kept = sum(len(k.kept) for k in self.kills if k.t <= row["t"])
            bound = base_files + kept
            if row["metrics_dir"]["files"] > bound:
                over.append({"t": row["t"], "files": row["metrics_dir"]["files"], "bound": bound})
        end = self.final.get("metrics_dir", {})
        end_bound = base_files + sum(len(k.kept) for k in self.kills)
        live_left = [n for k in self.kills for n in k.live_left]
        per_file_base = base_bytes / base_files if base_files else 0
        per_file_end = end.get("bytes", 0) / end["files"] if end.get("files") else 0
        swelled = per_file_base and per_file_end > 2 * per_file_base
        kept_per_restart = max((len(k.kept) for k in self.kills), default=0)
        passed = not over and not live_left and not swelled and end.get("files", 0) <= end_bound
        return {
            "passed": passed,
            "baseline_files": base_files,
            "baseline_bytes": base_bytes,
            "end_files": end.get("files"),
            "end_bytes": end.get("bytes"),
            "end_allocated": end.get("allocated"),
            "end_bound": end_bound,
            "max_files": max((r["metrics_dir"]["files"] for r in self.samples), default=0),
            "max_bytes": max((r["metrics_dir"]["bytes"] for r in self.samples), default=0),
            "kept_per_restart": kept_per_restart,
            "kept_bytes_per_restart": max((k.kept_bytes for k in self.kills), default=0),
            "at_max_restarts_100": base_files + 100 * kept_per_restart,
            "samples_over_bound": over[:20],
            "live_gauges_left": live_left,
            "bytes_per_file": [round(per_file_base), round(per_file_end)],
        }

    def judge_errors(self) -> dict[str, Any]:
        """Zero 5xx from the service (as the clients saw them, and as its own http_requests_total counts
        them) and zero unexpected client failures; what the client aborted itself is no failure, and
        what the kills cut is counted apart (Nginx retries idempotent requests on another worker;
        a WebSocket or a POST in flight on the killed worker is lost, as the issue's crash test allows)."""
        assert self.clients is not None
        unexpected = [f for f in self.clients.failures if f.cause == "unexpected"]
        by_kill = [f for f in self.clients.failures if f.cause == "worker kill"]
        kinds = Counter(f"{f.kind}: {f.error}" for f in by_kill)
        metrics_5xx = (self.final_metrics or {}).get("requests_5xx")
        passed = not unexpected and self.clients.service_5xx == 0 and metrics_5xx == 0
        return {
            "passed": passed,
            "service_5xx_seen_by_clients": self.clients.service_5xx,
            "service_5xx_in_metrics": metrics_5xx,
            "proxy_5xx_seen_by_clients": self.clients.proxy_5xx,
            "unexpected_failures": len(unexpected),
            "cut_by_kills": len(by_kill),
            "cut_by_kills_by_kind": dict(kinds),
            "first_unexpected": [asdict(f) for f in unexpected[:30]],
            "cut_by_kills_list": [asdict(f) for f in by_kill[:30]],
        }

    def judge_restarts(self) -> dict[str, Any]:
        """Every kill was followed by a replacement (logged "worker started", serving) and counted in
        tornado_worker_restarts_total; the supervisor logged each death."""
        restarted = sum(1 for k in self.kills if k.new_pid is not None)
        counted = (self.final_metrics or {}).get("restarts")
        died = len(self.service.named("worker died, restarting"))
        passed = restarted == len(self.kills) == self.args.kills and counted == len(self.kills) == died
        return {
            "passed": passed,
            "kills": len(self.kills),
            "restarted": restarted,
            "restarts_in_metrics": counted,
            "deaths_logged": died,
            "back_after_s": [k.back_after for k in self.kills],
        }

    def verdict(self, cleanup: dict[str, Any]) -> dict[str, Any]:
        self.attribute_failures()
        checks = {
            "memory": self.judge_memory(),
            "fds": self.judge_fds(),
            "metrics_dir": self.judge_metrics_dir(),
            "errors": self.judge_errors(),
            "restarts": self.judge_restarts(),
            "cleanup": cleanup,
        }
        if self.interrupted:
            checks["completed"] = {"passed": False, "why": "interrupted"}
        return checks


def _slope(points: Iterable[tuple[float, int]]) -> float:
    """Least-squares bytes per second (for the report; the verdict uses medians)."""
    pts = list(points)
    if len(pts) < 2:
        return 0.0
    mean_t = sum(t for t, _ in pts) / len(pts)
    mean_r = sum(r for _, r in pts) / len(pts)
    var = sum((t - mean_t) ** 2 for t, _ in pts)
    return sum((t - mean_t) * (r - mean_r) for t, r in pts) / var if var else 0.0


# -- the report ------------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    c = result["checks"]
    lines = [
        f"# Soak, {result['duration_s']:g} s: {result['verdict']}",
        "",
        f"{result['when']}; {result['target']}; command `{result['command']}`; commit "
        f"{result['revision'].get('commit', '?')[:12]}"
        + (
            f" with changes in {len(result['revision']['changed'])} service file(s)"
            if result["revision"].get("changed")
            else ""
        )
        + ".",
        "",
        "| check | verdict | figures |",
        "| --- | --- | --- |",
    ]
    mem = c["memory"]
    judged = [p for p in mem["processes"] if "growth_mib" in p]
    lines.append(
        f"| memory flat per worker | {_ok(mem)} | "
        + "; ".join(
            f"w{p['slot']} pid {p['pid']} ({p['from']:.0f}-{p['to']:.0f} s): {p['middle_median_mib']} -> "
            f"{p['last_median_mib']} MiB ({p['growth_mib']:+.2f}, limit {p['limit_mib']})"
            for p in judged
        )
        + " |"
    )
    fds = c["fds"]
    lines.append(
        f"| no fd leak | {_ok(fds)} | "
        + "; ".join(
            f"{'w' if r['slot'] != 'supervisor' else ''}{r['slot']}: {r['baseline']} -> peak {r['peak']} -> "
            f"{r['final']}"
            for r in fds["rows"]
        )
        + f" (margin {fds['margin']}) |"
    )
    md = c["metrics_dir"]
    lines.append(
        f"| metrics directory bounded | {_ok(md)} | {md['baseline_files']} files at the baseline, "
        f"{md['end_files']} at the end (bound {md['end_bound']}: +{md['kept_per_restart']} kept per "
        f"restart), at most {md['max_files']}; {(md['end_bytes'] or 0) / 1024:.0f} KiB "
        f"({(md['end_allocated'] or 0) / 1024:.0f} KiB allocated); live gauges of dead workers left: "
        f"{len(md['live_gauges_left'])} |"
    )
    er = c["errors"]
    cut = ", ".join(f"{kind} {n}" for kind, n in er.get("cut_by_kills_by_kind", {}).items()) or "none"
    lines.append(
        f"| zero 5xx, zero unexpected failures | {_ok(er)} | service 5xx: "
        f"{er['service_5xx_seen_by_clients']} seen, {er['service_5xx_in_metrics']} counted; unexpected "
        f"failures {er['unexpected_failures']}; cut by the kills {er['cut_by_kills']} "
        f"({cut}; Nginx 5xx "
        f"{er['proxy_5xx_seen_by_clients']}) |"
    )
    rs = c["restarts"]
    lines.append(
        f"| killed worker back | {_ok(rs)} | {rs['kills']} SIGKILLs, {rs['restarted']} back after "
        f"{rs['back_after_s']} s, {rs['restarts_in_metrics']} in tornado_worker_restarts_total |"
    )
    cl = c["cleanup"]
    lines.append(
        f"| clean stop, nothing left | {_ok(cl)} | service exit {cl['service_exit']}, Nginx exit "
        f"{cl['nginx_exit']}, processes left {cl['left']} |"
    )
    lines += [
        "",
        "| clients | ok | aborted by the client | retried | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, counts in sorted(result["clients"].items()):
        lines.append(
            f"| {kind} | {counts.get('ok', 0):,} | {counts.get('aborted', 0):,} | "
            f"{counts.get('retried', 0):,} | {counts.get('failed', 0):,} |"
        )
    lines += ["", f"Server: {result['server_requests']:,.0f} HTTP requests counted in /metrics.", ""]
    if result["notes"]:
        lines += ["Notes:", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def revision() -> dict[str, Any]:
    """The commit this ran on, and which files the service is made of differed from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "service", "nginx", "deploy"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "changed": dirty.stdout.splitlines()}


def _ok(check: dict[str, Any]) -> str:
    return "PASS" if check["passed"] else "**FAIL**"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    when = datetime.now(UTC)
    source = revision()  # what the service is started from, before anything can change under it
    soak = Soak(args)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        soak.interrupted = True
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            soak.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            say(f"could not start: {exc}")
            return 2
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(soak.run())
        for s in previous:  # the loop's own handlers are gone with it
            signal.signal(s, on_signal)
        say("stopping the service (SIGTERM: it drains)")
        service_exit = soak.service.stop()
        nginx_exit = soak.nginx.exit_code if soak.nginx is not None else None
    except Interrupted:
        soak.cleanup()
        say("interrupted before the churn ended: no verdict")
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        soak.cleanup()
    left = soak.leftovers()
    cleanup = {
        "passed": service_exit == 0 and nginx_exit in (0, None) and not left,
        "service_exit": service_exit,
        "nginx_exit": nginx_exit,
        "left": left,
    }
    checks = soak.verdict(cleanup)
    verdict = "PASS" if all(check["passed"] for check in checks.values()) else "FAIL"
    assert soak.clients is not None
    stamp = f"{when:%Y%m%d-%H%M%S}-{args.duration:g}s"
    result = {
        "verdict": verdict,
        "when": f"{when:%Y-%m-%d %H:%M:%S} UTC",
        "duration_s": args.duration,
        "churn_s": round(soak.churn_seconds, 1),
        "target": (
            f"through Nginx (1 worker) to the service ({args.workers} workers)"
            if not args.direct
            else f"directly to the service ({args.workers} workers)"
        ),
        "command": "python -m loadtests.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        "revision": source,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checks": checks,
        "clients": {k: dict(v) for k, v in soak.clients.counts.items()},
        "server_requests": (soak.final_metrics or {}).get("requests", 0),
        "service_log": {
            "access_lines": soak.service.access_lines,
            "non_json_lines": soak.service.bad_lines[:20],
            "events": [e for e in soak.service.events if e.get("event") != "request"][:300],
            "lines_by_level_and_event": [
                [level, event, n]
                for (level, event), n in Counter(
                    (str(e.get("level")), str(e.get("event"))) for e in soak.service.events
                ).most_common(40)
            ],
        },
        "nginx_errors": soak.nginx_errors[:50],
        "kills": [asdict(k) for k in soak.kills],
        "baseline": soak.baseline,
        "final": soak.final,
        "samples": soak.samples,
        "notes": soak.notes,
    }
    args.reports.mkdir(parents=True, exist_ok=True)
    json_path = args.reports / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path = args.reports / f"{stamp}.md"
    md_path.write_text(markdown(result))
    print(markdown(result), flush=True)
    say(f"results: {json_path} and {md_path.name}")
    say(verdict)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

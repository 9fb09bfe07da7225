"""Slow clients (slowloris): thousands of connections that trickle their request, straight to the
service and through Nginx, while normal clients are served; the configured timeouts cut them.

Three kinds of slow connection, a third of the crowd each: one that trickles its request head a
byte at a time, one that trickles it a header line at a time, and one that sends a whole head
with a large Content-Length and then trickles the body. They are raw asyncio sockets, all in
one event loop. While they are held, normal clients (GETs and POSTs on new connections) must get
their answers. Then every slow connection must be closed by the server (end of stream, a reset,
or an answer such as 408 and then the end) no earlier than the timeout that applies to it, and
within a bound after it:

- the service: IDLE_TIMEOUT for the head (Tornado's header timeout is its idle timeout, counted
  from the accept; a trickle does not reset it) and BODY_TIMEOUT for the whole body (counted
  from the end of the head); Tornado closes without an answer, and logs each body timeout;
- Nginx: client_header_timeout for the head (from the accept; a trickle does not reset it) and
  client_body_timeout between two reads of the body (not for the whole body: a trickle faster
  than it is never cut, which is shown too); Nginx buffers the body, so the slow ones never
  reach the service.

Slow connections count toward a worker's MAX_CONNECTIONS: the last test shows a crowd larger
than the cap refusing normal clients (503) until the idle timeout frees the slots.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import ServiceProcess, wait_until
from metrics_client import scrape
from proxy import Nginx

from loadtests.harness.wire import parse_responses

Start = Callable[..., ServiceProcess]

PER_KIND = 1000  # slow connections of each kind: 3,000 in all
KINDS = ("head bytes", "head lines", "body")
CONNECT_BATCH = 250  # connections opened at once (the listen backlog is 2048)
HEADER_TIMEOUT = 5.0  # the service's IDLE_TIMEOUT, and Nginx's CLIENT_HEADER_TIMEOUT
BODY_TIMEOUT = 7.0  # the service's BODY_TIMEOUT (a whole body): not the head's, to tell them apart
NGINX_BODY_TIMEOUT = 3.0  # Nginx's CLIENT_BODY_TIMEOUT (between two reads of a body)
TRICKLE = 1.0  # seconds between two pieces of a slow head, or of a slow body sent to the service
NGINX_BODY_TRICKLE = 5.0  # ... of a body sent to Nginx: slower than NGINX_BODY_TIMEOUT, so it is cut
FAST_TRICKLERS = 50  # bodies trickled to Nginx faster than NGINX_BODY_TIMEOUT: never cut by it
LENGTH = 1_000_000  # the slow bodies' Content-Length, under MAX_BODY_SIZE and client_max_body_size
EARLY = 0.25  # slack when checking that a cut came no earlier than its timeout: event loops (libuv's,
# Nginx's) read the clock once per turn, so under this crowd a timer may fire that much early
GRACE = 15.0  # bound on how late after its timeout a cut may come (a loaded machine, not a target)
HELD_AT_LEAST = 2 * PER_KIND  # slow connections still open when the normal traffic is over
NORMAL_CLIENTS, NORMAL_EACH = 10, 10  # normal clients at once, and requests each (every 5th a POST)


@pytest.fixture(autouse=True, scope="module")
def enough_descriptors() -> Iterator[None]:
    """This process holds every slow socket: raise its soft open-files limit (the hard one stays)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * PER_KIND + FAST_TRICKLERS + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"the hard open-files limit ({hard}) is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the slow clients ---------------------------------------------------------------------------


@dataclass
class Slow:
    kind: str  # one of KINDS, or "fast body" (a body trickled faster than Nginx's body timeout)
    interval: float
    # Each time is taken just before the act, so the server's timer cannot have begun earlier:
    opened: float = 0.0  # the connect began (the server's accept came after)
    head_sent: float = 0.0  # the head was handed to the kernel
    last_sent: float = 0.0  # the last piece of the trickle was
    closed: float | None = None  # the server ended the connection
    ended_by: str = ""  # "end of stream", "reset", or the answer's status and how it ended
    sent: int = 0
    error: str = ""  # the connection could not be opened

    @property
    def body(self) -> bool:
        return self.kind.endswith("body")

    def timer_start(self) -> float:
        """When the timeout that should cut this connection began (the accept, or the end of the head)."""
        return self.head_sent if self.body else self.opened


def head(slow: Slow) -> bytes:
    """What a slow connection sends at once (the rest comes from `drip`)."""
    if slow.body:
        return (
            b"POST /api/publish?room=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % LENGTH
        )
    return b"G" if slow.kind == "head bytes" else b"GET /api/hello HTTP/1.1\r\n"


def drip(slow: Slow) -> Iterator[bytes]:
    """The trickle: never the end of a head, never a whole body."""
    if slow.body:
        yield from itertools.repeat(b" ")
    elif slow.kind == "head bytes":
        yield from (bytes([c]) for c in b"ET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        yield from itertools.repeat(b"x")  # an endless header line
    else:
        yield from (b"X-Slow-%d: %d\r\n" % (n, n) for n in itertools.count())


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "end of stream"


async def hold(port: int, slow: Slow, connected: asyncio.Future[None]) -> None:
    """Open one slow connection and trickle until the server ends it (or the task is cancelled)."""
    loop = asyncio.get_running_loop()
    slow.opened = loop.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
    except (OSError, TimeoutError) as exc:
        slow.error = repr(exc)
        connected.set_result(None)
        return
    first, pieces = head(slow), drip(slow)
    slow.head_sent = slow.last_sent = loop.time()
    writer.write(first)
    slow.sent = len(first)
    connected.set_result(None)
    reading = asyncio.ensure_future(read_to_end(reader))
    # The first piece within a second, spread at random: then a timer between two reads (Nginx's
    # body timer) never fires just as a piece is on its way, which would blur what was cut when.
    # Not sooner than half a second: Nginx moves a timer only by more than 300 ms (its lazy delay).
    wait = random.uniform(0.5, max(0.5, min(slow.interval, TRICKLE)))
    try:
        while True:
            done, _ = await asyncio.wait({reading}, timeout=wait)
            if done:
                data, how = reading.result()
                slow.closed = loop.time()
                statuses = [r.status for r in parse_responses(data)]
                slow.ended_by = f"{statuses[0]}, then {how}" if statuses else how
                return
            piece = next(pieces)
            slow.last_sent = loop.time()
            writer.write(piece)
            slow.sent += len(piece)
            wait = slow.interval
    finally:
        reading.cancel()
        writer.transport.abort()


async def crowd(port: int, slows: list[Slow]) -> list[asyncio.Task[None]]:
    """Start every slow connection, a batch at a time; return once all are open (or failed)."""
    loop = asyncio.get_running_loop()
    tasks = []
    for start in range(0, len(slows), CONNECT_BATCH):
        batch = slows[start : start + CONNECT_BATCH]
        opened = [loop.create_future() for _ in batch]
        tasks += [asyncio.ensure_future(hold(port, s, f)) for s, f in zip(batch, opened, strict=True)]
        await asyncio.gather(*opened)
    return tasks


# -- the normal clients -------------------------------------------------------------------------


@dataclass
class Normal:
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.latencies:
            return f"no answer ({self.errors[:3]})"
        ms = sorted(1000 * t for t in self.latencies)
        return (
            f"{len(self.statuses)} answered ({sorted(set(self.statuses))}), {len(self.errors)} failed; "
            f"latency ms median {statistics.median(ms):.1f}, max {ms[-1]:.1f}"
        )


def normal_request(index: int) -> bytes:
    if index % 5 == 4:
        body = b'{"data": "normal"}'
        return (
            b"POST /api/publish?room=normal HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    return b"GET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def one_normal(port: int, index: int, seen: Normal) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        try:
            writer.write(normal_request(index))
            data = await asyncio.wait_for(reader.read(), 10)  # Connection: close: read to the end
        finally:
            writer.transport.abort()
    except (OSError, TimeoutError) as exc:
        seen.errors.append(repr(exc))
        return
    responses = parse_responses(data)
    if not responses:
        seen.errors.append(f"no answer: {data[:100]!r}")
        return
    seen.statuses.append(responses[0].status)
    seen.latencies.append(loop.time() - began)


async def normal_traffic(port: int) -> Normal:
    seen = Normal()

    async def client(number: int) -> None:
        for index in range(NORMAL_EACH):
            await one_normal(port, number * NORMAL_EACH + index, seen)

    await asyncio.gather(*(client(n) for n in range(NORMAL_CLIENTS)))
    return seen


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    slows: list[Slow]
    normal: Normal
    held_during_normal: int  # slow connections still open when the normal traffic was over
    extra: dict[str, object] = field(default_factory=dict)

    def of(self, *kinds: str) -> list[Slow]:
        return [s for s in self.slows if s.kind in kinds]

    def report(self, title: str) -> None:
        """The figures for the manual's reliability report (docs/reliability.md) (pytest -s shows them)."""
        print(
            f"\n[{title}] {len(self.slows)} slow connections; normal clients: {self.normal.summary()}; "
            f"slow ones still held when the normal traffic was over: {self.held_during_normal}"
        )
        for kind in dict.fromkeys(s.kind for s in self.slows):
            group = self.of(kind)
            held = [s.closed - s.timer_start() for s in group if s.closed is not None]
            ends = sorted({s.ended_by for s in group if s.ended_by})
            figures = (
                f"ended {min(held):.2f}-{max(held):.2f} s after their timer began" if held else "none cut"
            )
            print(
                f"  {kind} (a piece every {group[0].interval:g} s): {len(held)}/{len(group)} cut, {figures}, "
                f"ended by {ends}; bytes sent each {min(s.sent for s in group)}-{max(s.sent for s in group)}"
            )
        for name, value in self.extra.items():
            print(f"  {name}: {value}")


def run_crowd(
    port: int,
    slows: list[Slow],
    bound: float,
    during: Callable[[], dict[str, object]] | None = None,
    keep: list[Slow] | None = None,
    keep_for: float = 0.0,
) -> Run:
    """Hold `slows` (and `keep`) against `port`, send the normal traffic while they are held, call
    `during` (in a thread), then wait until every one of `slows` is cut, at most `bound` seconds
    after the last one opened. `keep` are slow connections that should not be cut: they are
    held until `keep_for` seconds after their head, then counted (`extra["kept"]`) and closed."""
    keep = keep or []

    async def scenario() -> Run:
        loop = asyncio.get_running_loop()
        began = loop.time()
        tasks = await crowd(port, slows + keep)
        opened = loop.time()
        normal = await normal_traffic(port)
        held = sum(1 for s in slows + keep if s.closed is None and not s.error)
        times = {
            "crowd opened in (s)": round(opened - began, 2),
            "normal traffic took (s)": round(loop.time() - opened, 2),
        }
        extra = await loop.run_in_executor(None, during) if during is not None else {}
        extra = {**times, **extra}
        deadline = max(s.opened for s in slows) + bound
        await asyncio.wait(tasks[: len(slows)], timeout=max(0.1, deadline - loop.time()))
        if keep:
            await asyncio.sleep(max(0.0, max(s.head_sent for s in keep) + keep_for - loop.time()))
            extra["kept"] = sum(1 for s in keep if s.closed is None and not s.error)
            extra["kept for (s)"] = round(min(loop.time() - s.head_sent for s in keep), 2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return Run(slows + keep, normal, held, extra)

    return asyncio.run(scenario())


def crowd_of(kinds: dict[str, float], per_kind: int = PER_KIND) -> list[Slow]:
    """`per_kind` slow connections of each kind, trickling every `kinds[kind]` seconds; interleaved."""
    return [Slow(kind, interval) for _ in range(per_kind) for kind, interval in kinds.items()]


def assert_cut(slows: list[Slow], timeout: float, *, from_last_read: bool = False) -> None:
    """Every one opened, and ended by the server no earlier than `timeout` after its timer began
    (after its last piece too, for Nginx's body timer, which runs between two reads)."""
    assert slows
    assert not [s.error for s in slows if s.error], "slow connections that could not be opened"
    still = [s for s in slows if s.closed is None]
    assert not still, f"{len(still)} of {len(slows)} {slows[0].kind} connections still open, {GRACE} s late"
    early = [s for s in slows if s.closed is not None and s.closed - s.timer_start() < timeout - EARLY]
    assert not early, f"cut before {timeout} s: {[(s.closed or 0) - s.timer_start() for s in early[:5]]}"
    if from_last_read:
        early = [s for s in slows if s.closed is not None and s.closed - s.last_sent < timeout - EARLY]
        assert not early, f"cut sooner than {timeout} s after a piece: {early[:3]}"


def assert_normal_served(run: Run) -> None:
    assert not run.normal.errors, run.normal.errors[:5]
    assert len(run.normal.statuses) == NORMAL_CLIENTS * NORMAL_EACH
    assert set(run.normal.statuses) <= {200, 202}, run.normal.statuses  # 202: the POSTs (a publish)
    # The point: they were served while the crowd was there (all of it, or nearly: on a loaded
    # machine the first heads may reach their timeout before the last normal answer).
    assert run.held_during_normal >= HELD_AT_LEAST, run.held_during_normal


# -- the tests ----------------------------------------------------------------------------------


def test_slowloris_straight_to_the_service(start_service: Start) -> None:
    svc = start_service("--idle-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT), workers=2)
    workers = svc.live_workers()

    def during() -> dict[str, object]:
        metrics = scrape(svc)
        return {
            "open connections (sampled each second, both workers)": metrics.total("tornado_connections_open"),
            "MAX_CONNECTIONS per worker": metrics.total("tornado_max_connections") / len(workers),
        }

    run = run_crowd(
        svc.port, crowd_of(dict.fromkeys(KINDS, TRICKLE)), max(HEADER_TIMEOUT, BODY_TIMEOUT) + GRACE, during
    )

    def body_timeouts() -> int:
        return sum(1 for e in list(svc.events) if str(e.get("event", "")).startswith("Timeout reading body"))

    wait_until(lambda: body_timeouts() >= PER_KIND, 5)  # log lines are written in batches
    run.extra["Tornado's 'Timeout reading body' log lines"] = body_timeouts()
    run.report("straight to the service")

    assert_normal_served(run)
    assert_cut(run.of("head bytes"), HEADER_TIMEOUT)
    assert_cut(run.of("head lines"), HEADER_TIMEOUT)
    assert_cut(run.of("body"), BODY_TIMEOUT)
    assert body_timeouts() == PER_KIND  # one per slow body: its timeout cut it, nothing else
    assert scrape(svc).total("tornado_connections_refused_total") == 0  # the cap never came into it
    assert svc.live_workers() == workers
    assert svc.request("/api/hello")[0] == 200


def service_side_connections(port: int) -> int:
    """Established TCP connections whose local end is the service's port (its side of each)."""
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr[1] == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_slowloris_through_nginx(start_service: Start, tmp_path: Path) -> None:
    svc = start_service(workers=2)  # the service's own timeouts at their defaults (60 s, 30 s)
    nginx = Nginx(
        tmp_path,
        svc.port,
        CLIENT_HEADER_TIMEOUT=f"{HEADER_TIMEOUT:g}s",
        CLIENT_BODY_TIMEOUT=f"{NGINX_BODY_TIMEOUT:g}s",
    )
    slows = crowd_of({"head bytes": TRICKLE, "head lines": TRICKLE, "body": NGINX_BODY_TRICKLE})
    fast = [Slow("fast body", NGINX_BODY_TIMEOUT / 4) for _ in range(FAST_TRICKLERS)]
    try:
        nginx.start()
        run = run_crowd(
            nginx.http_port,
            slows,
            max(HEADER_TIMEOUT, NGINX_BODY_TRICKLE + NGINX_BODY_TIMEOUT) + GRACE,
            lambda: {
                "the service's connections while the crowd was held": service_side_connections(svc.port)
            },
            keep=fast,
            keep_for=2 * NGINX_BODY_TIMEOUT,
        )
        timed_out = [line for line in nginx.access_lines() if line["status"] == 408]
        alive = nginx.proc is not None and nginx.proc.poll() is None
    finally:
        nginx.stop()
    run.extra["Nginx access lines with 408"] = len(timed_out)
    run.extra["of those, sent to the service"] = sum(1 for line in timed_out if line["upstream_addr"])
    run.report("through Nginx")

    assert_normal_served(run)
    assert_cut(run.of("head bytes"), HEADER_TIMEOUT)
    assert_cut(run.of("head lines"), HEADER_TIMEOUT)
    assert_cut(run.of("body"), NGINX_BODY_TIMEOUT, from_last_read=True)
    # client_body_timeout is between two reads: a trickle faster than it is not cut by it.
    assert run.extra["kept"] == FAST_TRICKLERS
    # Nginx buffers bodies and waits for whole heads: the crowd never reached the service.
    assert run.extra["the service's connections while the crowd was held"] < 100
    assert len(timed_out) == len(slows) and run.extra["of those, sent to the service"] == 0
    assert alive


def test_slow_clients_count_toward_the_connection_cap(start_service: Start) -> None:
    """A crowd larger than MAX_CONNECTIONS fills the cap: normal clients get the 503 until the
    idle timeout cuts the crowd, and are served again right after."""
    cap = 300
    svc = start_service("--idle-timeout", str(HEADER_TIMEOUT), "--max-connections", str(cap), workers=1)
    slows = crowd_of({"head lines": TRICKLE}, per_kind=2 * cap)

    def during() -> dict[str, object]:
        status = svc.request("/api/hello")[0]
        began = time.monotonic()
        while svc.request("/api/hello")[0] != 200 and time.monotonic() - began < HEADER_TIMEOUT + GRACE:
            time.sleep(0.1)
        return {
            "a normal request while the crowd was held": status,
            "normal requests refused for (s, from then on)": round(time.monotonic() - began, 2),
        }

    run = run_crowd(svc.port, slows, HEADER_TIMEOUT + GRACE, during)
    run.report(f"a crowd of {len(slows)} against MAX_CONNECTIONS {cap}, one worker")
    refused = [s for s in slows if s.ended_by.startswith("503")]
    held = [s for s in slows if not s.ended_by.startswith("503")]
    assert run.extra["a normal request while the crowd was held"] == 503
    assert len(held) <= cap and len(refused) >= len(slows) - cap
    assert_cut(held, HEADER_TIMEOUT)
    assert svc.request("/api/hello")[0] == 200
    assert scrape(svc).total("tornado_connections_refused_total") >= len(refused)

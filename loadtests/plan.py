"""How a run is spread over processes so that none of them passes this machine's limits.

The limits that matter when one machine holds tens of thousands of connections (measured on the
project's machines, read again at run time):

- open files per process, `RLIMIT_NOFILE` hard (20,000 here, and it cannot be raised): every
  process holding sockets (each k6, each Nginx worker, each service worker) must stay below it;
- ephemeral ports, `net.ipv4.ip_local_port_range` (28,232 here): that many connections at most
  from one source address to one destination address and port;
- cores (2 here), shared by the load generator and everything it measures.

So: long-lived clients (WebSockets, long polls) are split over several k6 processes, each with a
loopback source address of its own (`--local-ips 127.0.0.2`, `127.0.0.3`...); Nginx gets enough
workers that each holds its share of two connections per client (client side and upstream side)
within its open files, with `worker_connections` to match; the service gets enough workers, and
a `MAX_CONNECTIONS`, for its share. Nginx reaches the service at one address and port, so past
about one port range of clients its upstream connections get source addresses of their own too
(`UPSTREAM_SOURCE_ADDRESSES`, Nginx's `proxy_bind`, from 127.0.0.201 up).
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# One k6 process held 9,000-10,000 sockets comfortably here (memory about 80 KB a socket, one
# JavaScript event loop per VU): keep each below that, whatever its open-files limit allows.
K6_SOCKETS_PER_PROCESS = 9_000
SOCKETS_PER_VU = 500  # sockets one VU's event loop drives
PORT_SHARE = 0.85  # of the port range, per source address (TIME_WAIT of earlier runs takes some)
FD_HEADROOM = 1_000  # descriptors per process kept for everything but client sockets
SERVICE_FD_RESERVE = 256  # what the service's supervisor keeps beside MAX_CONNECTIONS
IMBALANCE = 1.2  # SO_REUSEPORT spreads connections by a hash: allow a worker 20% above its share
SERVICE_DEFAULT_MAX_CONNECTIONS = 10_000
NGINX_DEFAULT_WORKER_CONNECTIONS = 10_000
FIRST_UPSTREAM_SOURCE = 201  # 127.0.0.201...: Nginx's source addresses to the service (k6 uses 2 up)
K6_BYTES_PER_SOCKET = 80_000

# Scenarios whose clients each hold one connection for the whole run.
HELD_SCENARIOS = ("websockets", "longpoll", "rooms")


@dataclass(frozen=True)
class Limits:
    open_files: int
    ports: int
    cores: int

    @classmethod
    def of_this_machine(cls) -> Limits:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        open_files = 1_048_576 if hard == resource.RLIM_INFINITY else int(hard)
        try:
            low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
            ports = high - low + 1
        except (OSError, ValueError):
            ports = 28_232
        return cls(open_files=open_files, ports=ports, cores=len(os.sched_getaffinity(0)) or 1)


@dataclass
class K6Process:
    clients: int  # sockets or long-poll clients (0: the scenario's own count, e.g. HTTP)
    vus: int
    rate: float  # new clients per second, this process's share
    local_ips: str  # k6 --local-ips, or "" for the default route


@dataclass
class Plan:
    scenario: str
    clients: int  # connections held at once at the peak (what everything is sized for)
    through_nginx: bool
    k6: list[K6Process]
    service_workers: int
    max_connections: int
    nginx_workers: int
    nginx_worker_connections: int
    nginx_rlimit_nofile: int
    limits: Limits
    nginx_upstream_sources: str = ""  # UPSTREAM_SOURCE_ADDRESSES, comma-separated; "": the kernel's choice
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def make_plan(
    scenario: str, clients: int, rate: float, limits: Limits, *, loopback: bool, through_nginx: bool = True,
    local_stack: bool = True, service_workers: int | None = None, vus: int | None = None,
    sockets_per_process: int = K6_SOCKETS_PER_PROCESS,
) -> Plan:
    """Processes and sizes for `clients` connections held at once (`scenario` in HELD_SCENARIOS),
    or for a small run of any other scenario (one k6 process, default sizes)."""
    notes: list[str] = []
    errors: list[str] = []
    held = clients if scenario in HELD_SCENARIOS else 0
    usable = limits.open_files - FD_HEADROOM

    # -- the load generator ------------------------------------------------------------------
    per_process = max(1, min(sockets_per_process, usable))
    processes = max(1, math.ceil(held / per_process)) if held else 1
    k6: list[K6Process] = []
    port_budget = max(1, int(limits.ports * PORT_SHARE))
    next_ip = 2
    total_vus = vus or 0
    for i, share in enumerate(_split(held, processes) if held else [0]):
        ips = ""
        if held and loopback:
            count = max(1, math.ceil(share / port_budget))
            first, last = next_ip, next_ip + count - 1
            if last > 254:
                errors.append("more loopback source addresses needed than 127.0.0.2-254")
            ips = f"127.0.0.{first}" + (f"-127.0.0.{last}" if last > first else "")
            next_ip = last + 1
        if held:
            wanted = _split(total_vus, processes)[i] if total_vus else math.ceil(share / SOCKETS_PER_VU)
            process_vus = max(1, min(share, wanted))
        else:
            process_vus = 0
        k6.append(K6Process(clients=share, vus=process_vus, rate=rate / processes, local_ips=ips))
    if held:
        notes.append(
            f"k6: {held:,} clients over {processes} process(es) of at most {per_process:,} "
            f"(open files {limits.open_files:,} a process; about {K6_BYTES_PER_SOCKET // 1000} KB of k6 "
            f"memory a socket, {held * K6_BYTES_PER_SOCKET / 2**20:,.0f} MiB in all)"
        )
        if loopback:
            notes.append(
                "k6 source addresses: " + ", ".join(p.local_ips for p in k6)
                + f" (at most {port_budget:,} connections each to one destination: "
                f"{limits.ports:,} ephemeral ports, {int(PORT_SHARE * 100)}% used)"
            )
        elif held > port_budget:
            notes.append(f"remote target: {held:,} clients from this host's one address need more than "
                         f"{port_budget:,} ports to one destination; expect failures past that")

    # -- the service -------------------------------------------------------------------------
    fits = limits.open_files - SERVICE_FD_RESERVE - FD_HEADROOM // 2
    workers = service_workers or limits.cores
    needed = math.ceil(held * IMBALANCE / fits) if held else 1
    if service_workers is None and needed > workers:
        workers = needed
    per_worker = math.ceil(held * IMBALANCE / workers) if held else 0
    max_connections = min(limits.open_files - SERVICE_FD_RESERVE,
                          max(SERVICE_DEFAULT_MAX_CONNECTIONS, per_worker + 100))
    if held and local_stack:
        notes.append(
            f"service: {workers} worker(s) with SO_REUSEPORT, MAX_CONNECTIONS {max_connections:,} "
            f"(a worker's share {math.ceil(held / workers):,}, +{round((IMBALANCE - 1) * 100)}% for an "
            f"uneven spread; open files {limits.open_files:,} less {SERVICE_FD_RESERVE} for the supervisor)"
        )
        if per_worker > limits.open_files - SERVICE_FD_RESERVE:
            errors.append(f"a service worker would hold {per_worker:,} connections, past its open files")
        if workers > limits.cores:
            notes.append(f"service: {workers} workers on {limits.cores} cores: more workers than cores, "
                         "because of the open-files limit, not for CPU")

    # -- Nginx ---------------------------------------------------------------------------------
    # worker_rlimit_nofile is at least twice worker_connections (gixy's rule, and room for the
    # descriptors a worker holds beside its connections), and the hard open-files limit caps it.
    connections_cap = limits.open_files // 2
    nginx_workers = limits.cores
    proxied = 2 * held if through_nginx else 0
    if proxied:
        nginx_workers = max(nginx_workers, math.ceil(proxied * IMBALANCE / (connections_cap - 512)))
    worker_connections = NGINX_DEFAULT_WORKER_CONNECTIONS
    if proxied:
        worker_connections = max(worker_connections, math.ceil(proxied * IMBALANCE / nginx_workers) + 512)
    worker_connections = min(worker_connections, connections_cap)
    upstream_sources = ""
    # Half a port range per upstream source address: the TIME_WAIT left by an earlier run through
    # the same pair holds ports for a minute (seen: 2,535 "Cannot assign requested address" at 20,000).
    upstream_share = port_budget // 2
    if held and through_nginx and loopback and local_stack and held > upstream_share:
        count = math.ceil(held / upstream_share)
        upstream_sources = ",".join(f"127.0.0.{FIRST_UPSTREAM_SOURCE + i}" for i in range(count))
        if FIRST_UPSTREAM_SOURCE + count - 1 > 254:
            errors.append("more loopback addresses for Nginx's upstream side than 127.0.0.201-254")
    if held and through_nginx and local_stack:
        notes.append(
            f"Nginx: {nginx_workers} worker(s), worker_connections {worker_connections:,}, "
            f"worker_rlimit_nofile {limits.open_files:,} ({proxied:,} connections: two a client, "
            f"client side and upstream side; listeners with reuseport)"
        )
        if upstream_sources:
            notes.append(
                f"Nginx to the service: {held:,} connections from {upstream_sources} "
                "(UPSTREAM_SOURCE_ADDRESSES; "
                f"at most {upstream_share:,} from one source address to the service's one port)"
            )
    if held and not through_nginx:
        notes.append("clients go to the service directly (--direct); Nginx carries none of them")
    return Plan(
        scenario=scenario, clients=held, through_nginx=through_nginx, k6=k6, service_workers=workers,
        max_connections=max_connections, nginx_workers=nginx_workers,
        nginx_worker_connections=worker_connections, nginx_rlimit_nofile=limits.open_files,
        limits=limits, nginx_upstream_sources=upstream_sources, notes=notes, errors=errors,
    )

"""What is read while the soak runs: each worker's memory and descriptors (psutil), the metrics
directory's files, the service's own /metrics; and what a worker kill left behind (`Kill`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadtests.soak.wire import HttpConnection, ProtocolError


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

"""What every part of the soak shares: where it runs from, the units and names it reads, and its
console line."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "loadtests" / "reports" / "soak"
MIB = 1024 * 1024
WORKER_PREFIX = "tornado-w"  # service/process/worker.py names worker N's process tornado-wN
LIVE_GAUGE_PREFIX = "gauge_live"  # prometheus-client's live gauges: removed when a process is marked dead
IDEMPOTENT = frozenset({"GET", "HEAD"})


def say(message: str) -> None:
    print(f"soak: {message}", flush=True)


class Interrupted(Exception):
    pass

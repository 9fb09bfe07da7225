"""Loopback ports for servers a test or a run starts, and waiting for them to listen."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

_handed_out: set[int] = set()
_LOWEST = 10_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, for a server started a moment later; never the same one twice
    in a process.

    Not a port the kernel picked (port 0): those come from the ephemeral range, where any
    outgoing connection (one of a load generator's thousands of client sockets, Nginx's to its
    upstream) may take it before the server binds it. Below that range only a listener can take
    a port.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randrange(_LOWEST, low)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between {_LOWEST} and {low}")


def port_open(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Wait until 127.0.0.1:port accepts a connection; False once `alive()` fails or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            if not alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)

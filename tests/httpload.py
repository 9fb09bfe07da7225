"""Plain HTTP load from threads, on keep-alive connections, for the tests that break something
under load (tests/test_faults.py, tests/test_nginx.py): every answer that is not a 200 is kept."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Sequence


class HttpLoad:
    """Threads sending GETs (the paths in turn) until told to stop; a failed connection is replaced."""

    def __init__(self, port: int, paths: Sequence[str], threads: int = 6, timeout: float = 15.0) -> None:
        self.port = port
        self.paths = paths
        self.timeout = timeout
        self.failures: list[str] = []
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        for i in range(100_000):  # bounded in count as well as by the stop
            if self._stop.is_set():
                break
            path = self.paths[i % len(self.paths)]
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.failures.append(f"{path}: {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{path}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            with self._lock:
                self.done += 1
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)

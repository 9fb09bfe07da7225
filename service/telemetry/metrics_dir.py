"""The contract of the multiprocess metrics directory, all of it in this one module.

1. **Where it is.** PROMETHEUS_MULTIPROC_DIR when the operator sets it (emptied of a previous
   run's `*.db` files, whose workers would otherwise be summed in forever); else a private
   temporary directory, which the supervisor removes when it exits.
2. **When prometheus-client may be imported.** Only after `prepare`: the library chooses
   multiprocess mode from the environment once, at its first import, and a process that imported
   it earlier would count in its own memory, invisible to every scrape. `prepare` refuses to run
   once the library is loaded, so the mistake stops start-up instead of losing metrics.
3. **Who marks a process dead.** The supervisor, through `MetricsDirectory.mark_dead`, at the one
   place it learns that a worker died: the worker's live gauges stop counting, its counters and
   histograms stay (so `rate()` never goes backwards).

The path is passed to whoever needs it (the supervisor, and through it each worker's /metrics
renderer); nothing re-reads the variable. A leaf: it imports nothing from the service.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class MetricsDirectory:
    path: Path
    owned: bool  # made by `prepare`, so removed by `remove`

    def mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.path))

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


def prepare(environ: MutableMapping[str, str] = os.environ) -> MetricsDirectory:
    """Make the directory ready and export it, before prometheus-client is first imported."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before the metrics directory was prepared: it would "
            "count in this process only. Import service.telemetry.metrics (or prometheus_client) only after "
            "service.telemetry.metrics_dir.prepare()."
        )
    given = environ.get(ENV) or environ.get(ENV.lower())
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        directory = MetricsDirectory(path, owned=False)
    else:
        directory = MetricsDirectory(Path(tempfile.mkdtemp(prefix="tornado-service-metrics-")), owned=True)
    environ[ENV] = str(directory.path)
    return directory

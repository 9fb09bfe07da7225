"""The directory where every process writes its Prometheus samples, prepared before any metric exists.

prometheus_client picks multiprocess mode when it is imported, from PROMETHEUS_MULTIPROC_DIR,
so this module must run before anything imports `service.metrics` (it imports nothing that
would). A directory given by the operator is emptied of old samples (a previous run's workers
would otherwise be summed in forever); without one, a private temporary directory is made and
removed again when the supervisor exits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> tuple[Path, bool]:
    """Make the directory ready and export it; returns (path, whether we created it)."""
    given = os.environ.get(ENV) or os.environ.get(ENV.lower())
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        created = False
    else:
        path = Path(tempfile.mkdtemp(prefix="tornado-service-metrics-"))
        created = True
    os.environ[ENV] = str(path)
    return path, created


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

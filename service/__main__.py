"""`python -m service`: parse the settings, set up logging and the metrics directory, run the supervisor."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service import config
from service.telemetry import logs, metrics_dir


def main(argv: Sequence[str] | None = None) -> int:
    settings = config.load(argv)
    logs.configure(settings.log_level, settings.log_format)
    directory = metrics_dir.prepare()  # before prometheus-client is imported: it refuses otherwise
    from service.process.supervisor import (
        Supervisor,  # imports service.telemetry.metrics, and so prometheus-client
    )

    try:
        return Supervisor(settings, directory).run()  # workers never return here (os._exit)
    finally:
        directory.remove()


if __name__ == "__main__":
    sys.exit(main())

"""`python -m service`: parse the settings, set up logging and metrics, hand over to the supervisor."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service import config, logs, metrics_dir


def main(argv: Sequence[str] | None = None) -> int:
    settings = config.load(argv)
    logs.configure(settings.log_level, settings.log_format)
    path, created = metrics_dir.prepare()
    # Imported only now: prometheus_client picks multiprocess mode when it is first imported.
    from service import supervisor

    try:
        return supervisor.run(settings)  # workers never return here (they leave with os._exit)
    finally:
        if created:
            metrics_dir.remove(path)


if __name__ == "__main__":
    sys.exit(main())

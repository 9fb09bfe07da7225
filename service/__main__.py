"""`python -m service`: parse the settings, set up logging, hand over to the supervisor."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service import config, logs, supervisor


def main(argv: Sequence[str] | None = None) -> int:
    settings = config.load(argv)
    logs.configure(settings.log_level, settings.log_format)
    return supervisor.run(settings)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m service.healthcheck`: exit 0 if the service on this host answers /healthz, else 1.

For a container's HEALTHCHECK (and compose's healthcheck), where the slim image has no curl.
It reads the same settings as the service (PORT and ADDRESS from the environment), so an image
whose port is moved by `-e PORT=9000` stays healthy. A port set only with a `--port` flag on
the service's command line is not seen here: pass the same flag to the check
(`python -m service.healthcheck --port 9000`).
"""

from __future__ import annotations

import http.client
import sys
from collections.abc import Sequence

from service import config

WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def main(argv: Sequence[str] | None = None, path: str = "/healthz") -> int:
    settings = config.load(argv)
    host = "127.0.0.1" if settings.address in WILDCARDS else settings.address
    conn = http.client.HTTPConnection(host, settings.port, timeout=3)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except OSError as exc:
        print(f"unhealthy: {host}:{settings.port}{path}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"unhealthy: {host}:{settings.port}{path} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The soak's flags, checked so that a run that cannot be judged is refused before it starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtests.soak.common import REPORTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.soak",
        description=sys.modules[__package__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--duration", type=float, default=600.0, help="seconds of churn (default 600)")
    add("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    add("--workers", type=int, default=2, help="service workers (default 2)")
    add("--ws", type=int, default=48, help="WebSocket seats: each opens, holds, closes, again (default 48)")
    add("--keepalive", type=int, default=6, help="HTTP clients on keep-alive connections (default 6)")
    add("--fresh", type=int, default=3, help="HTTP clients with a new connection per request (default 3)")
    add("--pollers", type=int, default=12, help="long-poll clients (default 12)")
    add("--aborters", type=int, default=2, help="clients that abort requests mid-way (default 2)")
    add("--publish-rate", type=float, default=4.0, help="POST /api/publish per second (default 4)")
    add("--think", type=float, default=0.03, help="most seconds an HTTP client waits between requests")
    add("--kills", type=int, default=3, help="SIGKILLs of one worker, between 20%% and 50%% of the run")
    add("--tick-interval", type=float, default=0.5, help="the service's TICK_INTERVAL (default 0.5)")
    add("--direct", action="store_true", help="clients straight to the service, no Nginx")
    add("--rss-growth-mib", type=float, default=4.0, help="memory rule: MiB allowed (default 4)")
    add("--rss-growth-pct", type=float, default=5.0, help="memory rule: or %% of the middle third if more")
    add(
        "--fd-margin", type=int, default=2, help="fd rule: descriptors above the baseline allowed (default 2)"
    )
    add("--seed", type=int, default=1, help="the clients' random choices")
    add("--reports", type=Path, default=REPORTS, help="where the JSON and Markdown results go")
    args = parser.parse_args(argv)
    if args.duration < 20 or args.interval <= 0 or args.workers < 2:
        parser.error("--duration is at least 20 s, --interval positive, --workers at least 2")
    if args.duration > 7200 or max(args.ws, args.keepalive, args.fresh, args.pollers, args.aborters) > 1000:
        parser.error("bounded: --duration at most 7200 s, at most 1000 clients of each kind")
    if min(args.ws, args.keepalive, args.fresh, args.pollers, args.aborters, args.kills) < 0:
        parser.error("client counts and --kills cannot be negative")
    if args.interval * 9 > args.duration / 2:
        parser.error("--interval too long for --duration: a judged worker needs 9 samples in half the run")
    return args

"""`python -m loadtests.soak`: start, churn, judge, report, and stop everything it started however
it ends (see the package's docstring, which is also its --help)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime
from types import FrameType

import uvloop

from loadtests.soak import report
from loadtests.soak.common import Interrupted, say
from loadtests.soak.options import parse_args
from loadtests.soak.run import Soak


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    when = datetime.now(UTC)
    source = report.revision()  # what the service is started from, before anything can change under it
    soak = Soak(args)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        soak.interrupted = True
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            soak.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            say(f"could not start: {exc}")
            return 2
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(soak.run())
        for s in previous:  # the loop's own handlers are gone with it
            signal.signal(s, on_signal)
        say("stopping the service (SIGTERM: it drains)")
        service_exit = soak.service.stop()
        nginx_exit = soak.nginx.exit_code if soak.nginx is not None else None
    except Interrupted:
        soak.cleanup()
        say("interrupted before the churn ended: no verdict")
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        soak.cleanup()
    left = soak.leftovers()
    cleanup = {
        "passed": service_exit == 0 and nginx_exit in (0, None) and not left,
        "service_exit": service_exit,
        "nginx_exit": nginx_exit,
        "left": left,
    }
    checks = soak.verdict(cleanup)
    verdict = "PASS" if all(check["passed"] for check in checks.values()) else "FAIL"
    stamp = f"{when:%Y%m%d-%H%M%S}-{args.duration:g}s"
    result = report.build(soak, args, argv, when, source, checks, verdict)
    json_path, md_path = report.write(result, args.reports, stamp)
    print(report.markdown(result), flush=True)
    say(f"results: {json_path} and {md_path.name}")
    say(verdict)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

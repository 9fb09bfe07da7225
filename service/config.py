"""Every setting of the service, in one place, from flags and environment variables.

A setting is read from its command-line flag, else from its environment variable (12-factor),
else it takes its built-in default, so `python -m service` runs with no configuration at all.
A value that does not parse or is out of range stops start-up with exit code 2 and a message
that names both the flag and the variable: an operator who mistyped `PORT=70000` should learn
that before a single worker is forked, not from a crash loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service import __version__

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


@dataclass(frozen=True)
class Settings:
    """The validated configuration; immutable so a forked worker sees exactly what the parent saw."""

    port: int = 8888
    address: str = ""
    workers: int | None = None  # None: derived from the CPUs this process may use (service.cpus)
    backlog: int = 2048
    reuse_port: bool = False
    shutdown_grace: float = 20.0
    drain_delay: float = 0.0
    tick_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = True
    access_log_sample: float = 1.0
    max_body_size: int = 1024 * 1024
    max_header_size: int = 64 * 1024
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    ws_max_message_size: int = 64 * 1024
    ws_ping_interval: float = 20.0
    max_connections: int = 10_000
    max_write_buffer: int = 4 * 1024 * 1024
    max_restarts: int = 100
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")


class SettingError(ValueError):
    """A value that cannot be used; the message says what would be accepted."""


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise SettingError("not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise SettingError(f"must be {bound}")
        return value

    return parse


def _seconds(low: float, *, above: bool = False, high: float = 86_400.0) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingError("not a number of seconds") from None
        if not math.isfinite(value) or value > high or value < low or (above and value == low):
            op = ">" if above else ">="
            raise SettingError(f"must be {op} {low:g} and <= {high:g} seconds")
        return value

    return parse


def _address(raw: str) -> str:
    value = raw.strip()
    if value:
        try:
            socket.getaddrinfo(value, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            raise SettingError(f"not an address of this machine ({exc})") from None
    return value


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingError("not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise SettingError("must be from 0 to 1")
    return value


def _workers(raw: str) -> int | None:
    if raw.strip().lower() in ("", "auto"):
        return None
    try:
        return _int_in(1, 1024)(raw)
    except SettingError as exc:
        raise SettingError(f"{exc} (or 'auto')") from None


def _proxies(raw: str) -> tuple[str, ...]:
    """`*`, or comma-separated addresses and CIDRs; empty trusts no one."""
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if items == ("*",):
        return items
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingError(f"{item!r} is not an IP address or CIDR ('*' alone: any peer)") from None
    return items


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingError("must be true or false")


@dataclass(frozen=True)
class _Option:
    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    flag: str = ""

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


OPTIONS: tuple[_Option, ...] = (
    _Option("port", "PORT", _int_in(0, 65535), "TCP port to listen on (0 picks a free port, logged)"),
    _Option("address", "ADDRESS", _address, "address to bind; empty means every interface, IPv4 and IPv6"),
    _Option(
        "workers",
        "WEB_CONCURRENCY",
        _workers,
        "worker processes; 'auto' counts the CPUs this process may use (cgroup quota, affinity)",
    ),
    _Option("backlog", "BACKLOG", _int_in(1, 65535), "listen backlog (the kernel caps it at somaxconn)"),
    _Option(
        "reuse_port",
        "REUSE_PORT",
        _boolean,
        "bind one SO_REUSEPORT socket per worker so the kernel spreads connections evenly",
    ),
    _Option(
        "shutdown_grace",
        "SHUTDOWN_GRACE",
        _seconds(0, above=True, high=3600),
        "seconds a SIGTERM'd service has to finish in-flight requests before it is killed",
    ),
    _Option(
        "drain_delay",
        "DRAIN_DELAY",
        _seconds(0, high=3600),
        "seconds between turning /readyz to 503 and closing the listener (load balancer catch-up)",
    ),
    _Option(
        "tick_interval",
        "TICK_INTERVAL",
        _seconds(0.01, high=3600),
        "seconds between tick events on /ws/ticker and /api/poll",
    ),
    _Option("log_level", "LOG_LEVEL", _choice(LOG_LEVELS), "lowest log level written"),
    _Option("log_format", "LOG_FORMAT", _choice(LOG_FORMATS), "json (one event per line) or console"),
    _Option("access_log", "ACCESS_LOG", _boolean, "write one JSON line per request (5xx always)"),
    _Option(
        "access_log_sample",
        "ACCESS_LOG_SAMPLE",
        _fraction,
        "fraction of requests below 500 that get an access line (1: all, 0.01: one in a hundred)",
    ),
    _Option("max_body_size", "MAX_BODY_SIZE", _int_in(0), "largest request body accepted, in bytes"),
    _Option("max_header_size", "MAX_HEADER_SIZE", _int_in(1024), "largest request head, in bytes"),
    _Option(
        "idle_timeout",
        "IDLE_TIMEOUT",
        _seconds(0, above=True),
        "seconds a connection may wait for a request's headers (idle keep-alive included)",
    ),
    _Option(
        "body_timeout",
        "BODY_TIMEOUT",
        _seconds(0, above=True),
        "seconds a client may take to send a request body",
    ),
    _Option(
        "ws_max_message_size",
        "WS_MAX_MESSAGE_SIZE",
        _int_in(1),
        "largest WebSocket message accepted, in bytes (larger ones close the socket with 1009)",
    ),
    _Option(
        "ws_ping_interval",
        "WS_PING_INTERVAL",
        _seconds(0),
        "seconds between WebSocket pings that detect dead peers (0 turns them off)",
    ),
    _Option(
        "max_connections",
        "MAX_CONNECTIONS",
        _int_in(1, 1_000_000),
        "open connections per worker beyond which new ones get a 503 and are closed",
    ),
    _Option(
        "max_write_buffer",
        "MAX_WRITE_BUFFER",
        _int_in(64 * 1024),
        "bytes queued for one slow reader before it is disconnected (bounds memory per connection)",
    ),
    _Option(
        "max_restarts",
        "MAX_RESTARTS",
        _int_in(0),
        "worker restarts after which the supervisor gives up and exits 1 (crash-loop bound)",
    ),
    _Option(
        "forwarded_allow_ips",
        "FORWARDED_ALLOW_IPS",
        _proxies,
        "peers (addresses or CIDRs, comma-separated; '*' for any) whose X-Forwarded-For, X-Real-IP "
        "and X-Forwarded-Proto are believed: your own proxy only",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=(
            "Pre-fork Tornado service. Every flag can also be set through the environment "
            "variable shown beside it; a flag wins over its variable."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for opt in OPTIONS:
        default = getattr(defaults, opt.field)
        shown = "auto" if default is None else (repr(default) if default == "" else default)
        if isinstance(default, tuple):
            shown = ",".join(default)
        help_text = f"{opt.help} [env {opt.env}; default {shown}]"
        if opt.parse is _boolean:
            parser.add_argument(
                opt.cli, dest=opt.field, default=None, action="store_const", const="true", help=help_text
            )
            parser.add_argument(
                "--no-" + opt.cli[2:], dest=opt.field, action="store_const", const="false",
                help=argparse.SUPPRESS,
            )
        else:
            parser.add_argument(opt.cli, dest=opt.field, default=None, metavar=opt.env, help=help_text)
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and environment into Settings, or exit 2 naming the setting that is wrong."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        from_flag = getattr(args, opt.field)
        if from_flag is not None:
            raw, source = from_flag, f"{opt.cli} (env {opt.env})"
        elif opt.env in env:
            raw, source = env[opt.env], f"{opt.env} (flag {opt.cli})"
        else:
            continue
        try:
            values[opt.field] = opt.parse(raw)
        except SettingError as exc:
            parser.error(f"invalid value {raw!r} for {source}: {exc}")
    settings = Settings(**values)
    if settings.drain_delay >= settings.shutdown_grace:
        parser.error(
            f"DRAIN_DELAY (--drain-delay) {settings.drain_delay:g}s must be shorter than "
            f"SHUTDOWN_GRACE (--shutdown-grace) {settings.shutdown_grace:g}s"
        )
    return settings


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as a plain dict, for the start-up log line."""
    return dataclasses.asdict(settings)

"""Every setting of the service, in one place, from flags and environment variables.

A setting is read from its command-line flag, else from its environment variable (12-factor),
else it takes its built-in default, so `python -m service` runs with no configuration at all.
A value that does not parse or is out of range stops start-up with exit code 2 and a message
that names both the flag and the variable: an operator who mistyped `PORT=70000` should learn
that before a single worker is forked, not from a crash loop.

Each setting is declared once, as a Settings field whose metadata holds its variable, flag, parser
and help: the parser, --help and the generated docs/reference/settings.md (deploy/reference.py) all
read OPTIONS, which is made from those fields, so none of them can drift from the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from service import __version__

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


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


REDIS_DEFAULT_PORT = 6379
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}\Z")
_CHANNEL = re.compile(r"[!-~]{1,100}\Z")  # printable ASCII, no space
_CLASS = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
MAX_ROOM_CLASSES = 32


def _broadcast_url(raw: str) -> str:
    """Empty (the embedded backplane), or `redis://HOST[:PORT][/DB]`, returned as `redis://HOST:PORT/DB`.

    No user or password: the start-up line logs every setting, and a secret has no place there
    (README, Rooms: reach Redis over a network only the service can use). No `rediss://`.
    """
    value = raw.strip()
    if not value:
        return ""
    try:
        host, port, db = redis_address(value)
    except ValueError as exc:
        expected = "expected empty (the embedded backplane) or redis://HOST:PORT/DB"
        raise SettingError(f"{exc}; {expected}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"redis://{shown}:{port}/{db}"


def redis_address(url: str) -> tuple[str, int, int]:
    """(host, port, db) of a `redis://HOST[:PORT][/DB]` URL; ValueError says what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"scheme {parts.scheme or 'missing'!r} is not redis")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no user or password in the URL (it would be logged)")
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise ValueError(f"host {host!r} is not a host name or an IP address") from None
    port = parts.port  # urlsplit raises ValueError for a port out of range
    if port == 0:
        raise ValueError("port 0 is no Redis port")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit() and int(path) <= 1_000_000):
        raise ValueError(f"database {path!r} is not a number")
    return host, port or REDIS_DEFAULT_PORT, int(path or 0)


def _without_credentials(raw: str) -> str:
    """A refused BROADCAST_URL as the error shows it: any user and password replaced by ***."""
    return repr(re.sub(r"(?<=://)[^@/]*@", "***@", raw))


def _channel(raw: str) -> str:
    value = raw.strip()
    if not _CHANNEL.match(value):
        raise SettingError("must be 1-100 printable ASCII characters without spaces")
    return value


def _room_classes(raw: str) -> tuple[str, ...]:
    """Comma-separated names of 1-32 characters of [A-Za-z0-9_-], at most 32 (bounded metric labels)."""
    items = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    for item in items:
        if not _CLASS.match(item):
            raise SettingError(f"{item!r} is not 1-32 characters of A-Z, a-z, 0-9, _ and -")
    if len(items) > MAX_ROOM_CLASSES:
        raise SettingError(f"at most {MAX_ROOM_CLASSES} classes (each is a metric label value)")
    return items


def _rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingError("not a number") from None
    if not 0.0 <= value <= 100_000.0:  # NaN fails this too
        raise SettingError("must be from 0 (no limit) to 100000 per second")
    return value


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingError(f"must be one of {', '.join(options)}")
        return value

    return parse


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108, with its NUL)


def _backplane_directory(raw: str) -> str:
    """Empty, or an absolute directory short enough for the sockets' paths (`<dir>/w<id>.sock`)."""
    value = raw.strip()
    if value and not os.path.isabs(value):
        raise SettingError("must be an absolute path (or empty: a private temporary directory)")
    try:
        size = len(os.fsencode(value + "/w1024.sock"))
    except UnicodeError:
        raise SettingError("not a path this system can name") from None
    if "\x00" in value or size > UNIX_PATH_MAX:
        raise SettingError(f"must be a path (no NUL) short enough for {UNIX_PATH_MAX} bytes of socket path")
    return value


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingError("must be true or false")


T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """One setting as the command line, the environment and the reference pages see it."""

    field: str
    default: Any
    env: str
    parse: Callable[[str], Any]
    help: str
    flag: str = ""
    shown: Callable[[str], str] = repr  # how a refused value is quoted in the error

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def shown_default(self) -> str:
        """The default as --help and docs/reference/settings.md write it."""
        if self.default is None:
            return "auto"
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return repr(self.default) if self.default == "" else str(self.default)


def _setting(
    default: T, env: str, parse: Callable[[str], Any], help: str, *, flag: str = "",
    shown: Callable[[str], str] = repr,
) -> T:
    """A Settings field that carries its own variable, parser and help, so a setting is declared once."""
    spec = {"env": env, "parse": parse, "help": help, "flag": flag, "shown": shown}
    return dataclasses.field(default=default, metadata=spec)


@dataclass(frozen=True)
class Settings:
    """The validated configuration; immutable so a forked worker sees exactly what the parent saw."""

    port: int = _setting(
        8888, "PORT", _int_in(0, 65535), "TCP port to listen on (0 picks a free port, logged)"
    )
    address: str = _setting(
        "", "ADDRESS", _address, "address to bind; empty means every interface, IPv4 and IPv6"
    )
    workers: int | None = _setting(  # None: derived from the CPUs this process may use (service.process.cpus)
        None, "WEB_CONCURRENCY", _workers,
        "worker processes; 'auto' counts the CPUs this process may use (cgroup quota, affinity)",
    )
    backlog: int = _setting(
        2048, "BACKLOG", _int_in(1, 65535), "listen backlog (the kernel caps it at somaxconn)"
    )
    reuse_port: bool = _setting(
        False, "REUSE_PORT", _boolean,
        "bind one SO_REUSEPORT socket per worker so the kernel spreads connections evenly",
    )
    shutdown_grace: float = _setting(
        20.0, "SHUTDOWN_GRACE", _seconds(0, above=True, high=3600),
        "seconds a SIGTERM'd service has to finish in-flight requests before it is killed",
    )
    drain_delay: float = _setting(
        0.0, "DRAIN_DELAY", _seconds(0, high=3600),
        "seconds between turning /readyz to 503 and closing the listener (load balancer catch-up)",
    )
    tick_interval: float = _setting(
        1.0, "TICK_INTERVAL", _seconds(0.01, high=3600),
        "seconds between tick events on /ws/ticker and /api/poll",
    )
    log_level: str = _setting("info", "LOG_LEVEL", _choice(LOG_LEVELS), "lowest log level written")
    log_format: str = _setting(
        "json", "LOG_FORMAT", _choice(LOG_FORMATS), "json (one event per line) or console"
    )
    access_log: bool = _setting(True, "ACCESS_LOG", _boolean, "write one JSON line per request (5xx always)")
    access_log_sample: float = _setting(
        1.0, "ACCESS_LOG_SAMPLE", _fraction,
        "fraction of requests below 500 that get an access line (1: all, 0.01: one in a hundred)",
    )
    max_body_size: int = _setting(
        1024 * 1024, "MAX_BODY_SIZE", _int_in(0), "largest request body accepted, in bytes"
    )
    max_header_size: int = _setting(
        64 * 1024, "MAX_HEADER_SIZE", _int_in(1024), "largest request head, in bytes"
    )
    idle_timeout: float = _setting(
        60.0, "IDLE_TIMEOUT", _seconds(0, above=True),
        "seconds a connection may wait for a request's headers (idle keep-alive included)",
    )
    body_timeout: float = _setting(
        30.0, "BODY_TIMEOUT", _seconds(0, above=True), "seconds a client may take to send a request body"
    )
    ws_max_message_size: int = _setting(
        64 * 1024, "WS_MAX_MESSAGE_SIZE", _int_in(1),
        "largest WebSocket message accepted, in bytes (larger ones close the socket with 1009)",
    )
    ws_ping_interval: float = _setting(
        20.0, "WS_PING_INTERVAL", _seconds(0),
        "seconds between WebSocket pings that detect dead peers (0 turns them off)",
    )
    max_connections: int = _setting(
        10_000, "MAX_CONNECTIONS", _int_in(1, 1_000_000),
        "open connections per worker beyond which new ones get a 503 and are closed",
    )
    memory_shed_at: float = _setting(
        0.9, "MEMORY_SHED_AT", _fraction,
        "fraction of the cgroup's memory limit (working set: usage less inactive file cache) at which a "
        "worker takes no more connections than it holds: new ones get a 503 (0: never; no limit: off)",
    )
    max_write_buffer: int = _setting(
        4 * 1024 * 1024, "MAX_WRITE_BUFFER", _int_in(64 * 1024),
        "bytes queued for one slow reader before it is disconnected (bounds memory per connection)",
    )
    max_restarts: int = _setting(
        100, "MAX_RESTARTS", _int_in(0),
        "worker restarts after which the supervisor gives up and exits 1 (crash-loop bound)",
    )
    forwarded_allow_ips: tuple[str, ...] = _setting(
        ("127.0.0.1", "::1"), "FORWARDED_ALLOW_IPS", _proxies,
        "peers (addresses or CIDRs, comma-separated; '*' for any) whose X-Forwarded-For, X-Real-IP "
        "and X-Forwarded-Proto are believed: your own proxy only",
    )
    broadcast_url: str = _setting(
        "", "BROADCAST_URL", _broadcast_url,
        "the rooms' backplane: empty for the embedded backplane between this service's workers (one "
        "machine, nothing else to run), or redis://HOST:PORT/DB for Redis pub/sub between instances",
        shown=_without_credentials,
    )
    broadcast_channel: str = _setting(
        "tornado-rooms", "BROADCAST_CHANNEL", _channel,
        "the Redis pub/sub channel of the rooms (pub/sub ignores the database number: services "
        "sharing one Redis need channels of their own)",
    )
    # "": a private temporary directory, made by the supervisor before the fork
    broadcast_dir: str = _setting(
        "", "BROADCAST_DIR", _backplane_directory,
        "directory of the embedded backplane's sockets, made before the fork; empty: a private temporary one",
    )
    room_publish_rate: float = _setting(
        20.0, "ROOM_PUBLISH_RATE", _rate,
        "messages per second one WebSocket (or one client address, for POST /api/publish) may "
        "publish, on average; faster closes the socket with 4029 or answers 429 (0: no limit)",
    )
    room_publish_burst: int = _setting(
        40, "ROOM_PUBLISH_BURST", _int_in(1, 1_000_000),
        "messages a publisher may send at once before ROOM_PUBLISH_RATE applies",
    )
    room_classes: tuple[str, ...] = _setting(
        (), "ROOM_CLASSES", _room_classes,
        "room classes for metric labels, comma-separated: room 'chat.42' is of class 'chat' when "
        "it is listed, every other room of class 'other' (a room name is never a label)",
    )


OPTIONS: tuple[Option, ...] = tuple(
    Option(field=f.name, default=f.default, **f.metadata) for f in dataclasses.fields(Settings)
)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=(
            "Pre-fork Tornado service. Every flag can also be set through the environment "
            "variable shown beside it; a flag wins over its variable."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for opt in OPTIONS:
        help_text = f"{opt.help} [env {opt.env}; default {opt.shown_default}]"
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


EMBEDDED_BUS_OVERHEAD = 256  # bytes of a backplane record that are not the message: header and room name


def embedded_bus_limit() -> int:
    """The largest message the embedded backplane can carry in one datagram on this machine.

    Linux refuses a Unix datagram larger than the sending socket's buffer (less 32 bytes), and
    caps that buffer at twice `net.core.wmem_max`; asking for far more and reading back what was
    granted measures it without reading /proc (which a container may not show).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
        granted = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return int(granted) - 32 - EMBEDDED_BUS_OVERHEAD


def load(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
    bus_limit: Callable[[], int] = embedded_bus_limit,
) -> Settings:
    """Parse flags and environment into Settings, or exit 2 naming the setting that is wrong.

    `bus_limit` measures the embedded backplane's largest message (a parameter, so tests can shrink it).
    """
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
            parser.error(f"invalid value {opt.shown(raw)} for {source}: {exc}")
    settings = Settings(**values)
    if settings.drain_delay >= settings.shutdown_grace:
        parser.error(
            f"DRAIN_DELAY (--drain-delay) {settings.drain_delay:g}s must be shorter than "
            f"SHUTDOWN_GRACE (--shutdown-grace) {settings.shutdown_grace:g}s"
        )
    if not settings.broadcast_url and settings.ws_max_message_size > (limit := bus_limit()):
        parser.error(
            f"WS_MAX_MESSAGE_SIZE (--ws-max-message-size) {settings.ws_max_message_size} is larger "
            f"than the embedded backplane carries on this machine ({limit} bytes, from net.core.wmem_max): "
            "lower it, or set BROADCAST_URL to use Redis"
        )
    return settings


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as a plain dict, for the start-up log line."""
    return dataclasses.asdict(settings)

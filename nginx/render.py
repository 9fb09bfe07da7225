"""Render nginx.conf.template: fill every ${UPPER_CASE} name, refuse to leave one unfilled.

Values come from `--set NAME=VALUE`, else the environment variable NGINX_<NAME>, else the
default below. Nginx's own variables ($remote_addr, lower case) are never touched, so the
template stays readable as Nginx configuration. Usage:

    python -m nginx.render --out /etc/nginx/nginx.conf --set UPSTREAM=127.0.0.1:8888
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
_NAME = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

DEFAULTS: dict[str, str] = {
    "UPSTREAM": "127.0.0.1:8888",  # the service (comma-separated for several); expands UPSTREAM_SERVERS
    "LISTEN_ADDRESS": "0.0.0.0",
    "HTTP_PORT": "8080",
    "TLS_PORT": "8443",
    "STATUS_PORT": "8081",
    "TLS_CERT": "/etc/nginx/tls/tls.crt",
    "TLS_KEY": "/etc/nginx/tls/tls.key",
    "CLIENT_MAX_BODY_SIZE": "1048576",  # bytes; keep equal to the service's MAX_BODY_SIZE
    "PROXY_READ_TIMEOUT": "60s",  # plain requests (the service's /api/sleep is at most 60 s)
    "LONG_READ_TIMEOUT": "330s",  # WebSockets and long polls (a long poll lasts at most 300 s)
    # Slow clients (see the template): the whole request head within this of the accept (TLS
    # handshake included; a byte at a time does not reset it). A client sends its head in one or
    # two round trips; 10 s covers a slow mobile link many times over, and is what a slowloris
    # connection holds a slot for (Nginx's default: 60 s).
    "CLIENT_HEADER_TIMEOUT": "10s",
    # Longest silence between two reads of a body (Nginx has no timer for a whole body). A
    # lossy link stalls an upload for TCP's retransmission backoff, 1+2+4+8 = 15 s after four
    # losses in a row; 30 s lets that upload live, and is the service's own BODY_TIMEOUT figure.
    "CLIENT_BODY_TIMEOUT": "30s",
    "WORKER_PROCESSES": "auto",  # auto: one per core of the machine (not of a container's CPU limit)
    "WORKER_CONNECTIONS": "10000",  # at most half of WORKER_RLIMIT_NOFILE (see the template)
    "WORKER_RLIMIT_NOFILE": "20000",  # at most the hard open-files limit (ulimit -Hn)
    "RUN_DIR": "/tmp/nginx",
    "ACCESS_LOG": "/dev/stdout",
    "ERROR_LOG": "/dev/stderr",
    "USER_DIRECTIVE": "",  # e.g. "user nginx;" when the master runs as root
    # Proxies in front of Nginx (an Ingress controller, a load balancer) whose X-Forwarded-For is
    # believed, comma-separated addresses or CIDRs; empty: none, the peer is the client.
    "REAL_IP_FROM": "",
    # Source addresses for the connections to the service, comma-separated (e.g.
    # 127.0.0.11,127.0.0.12 on loopback); empty: the kernel picks, as usual. One source address
    # has one ephemeral port range (about 28,000 ports) to one service address and port, so past
    # that many WebSockets or long polls at once each extra address adds another range.
    "UPSTREAM_SOURCE_ADDRESSES": "",
}
UPSTREAM_REPEAT = 8  # why: see the comment on `upstream tornado` in the template
# Nginx's time syntax: a number and a unit (ms, s, m, h, d, w, M, y; none: seconds), or several
# run together (1m30s: a space would make two arguments of the directive).
_TIME_PART = re.compile(r"(\d+)(ms|[smhdwMy]?)")
_TIME_UNITS_MS = {"ms": 1, "": 1000, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
                  "w": 7 * 86_400_000, "M": 30 * 86_400_000, "y": 365 * 86_400_000}


def upstream_servers(upstream: str) -> str:
    addresses = [a.strip() for a in upstream.split(",") if a.strip()]
    if not addresses:
        raise ValueError("UPSTREAM names no address")
    return "\n".join(
        f"        server {address} max_fails=0;" for _ in range(UPSTREAM_REPEAT) for address in addresses
    )


def real_ip_directives(trusted: str) -> str:
    """Nginx's realip module: the client is the last X-Forwarded-For hop not in `trusted`."""
    sources = [a.strip() for a in trusted.split(",") if a.strip()]
    if not sources:
        return "    # REAL_IP_FROM is empty: no proxy in front, $remote_addr is the client."
    lines = [f"    set_real_ip_from {source};" for source in sources]
    return "\n".join([*lines, "    real_ip_header X-Forwarded-For;", "    real_ip_recursive on;"])


def upstream_bind_directives(sources: str) -> str:
    """Spread the connections to the service over several source addresses (proxy_bind)."""
    addresses = [a.strip() for a in sources.split(",") if a.strip()]
    if not addresses:
        return "    # UPSTREAM_SOURCE_ADDRESSES is empty: the kernel picks the upstream source address."
    if len(addresses) == 1:
        return f"    proxy_bind {addresses[0]};"
    share = math.floor(10_000 / len(addresses)) / 100  # split_clients takes two decimals at most
    lines = ['    split_clients "$remote_addr$remote_port$connection" $upstream_source {']
    lines += [f"        {share:.2f}% {address};" for address in addresses[:-1]]
    lines += [f"        * {addresses[-1]};", "    }", "    proxy_bind $upstream_source;"]
    return "\n".join(lines)


def duration_ms(value: str) -> int:
    """An Nginx time (`10s`, `500ms`, `1m30s`, a bare number is seconds) in milliseconds;
    ValueError for what is none (Nginx would refuse to start), or zero (a timeout that fires at once)."""
    text, total, at = value.strip(), 0, 0
    while at < len(text):
        part = _TIME_PART.match(text, at)
        if part is None or part.end() == at:
            raise ValueError(f"{value!r} is not an Nginx time (e.g. 10s, 500ms, 1m30s)")
        total += int(part.group(1)) * _TIME_UNITS_MS[part.group(2)]
        at = part.end()
    if total <= 0:
        raise ValueError(f"{value!r} is not an Nginx time above zero (e.g. 10s, 500ms, 1m30s)")
    return total


def values(overrides: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    merged = {
        name: overrides.get(name, environ.get(f"NGINX_{name}", default)) for name, default in DEFAULTS.items()
    }
    for name in [name for name in DEFAULTS if name.endswith("_TIMEOUT")]:  # here, not when Nginx starts
        try:
            duration_ms(merged[name])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    merged["UPSTREAM_SERVERS"] = upstream_servers(merged["UPSTREAM"])
    merged["REAL_IP_DIRECTIVES"] = real_ip_directives(merged["REAL_IP_FROM"])
    merged["UPSTREAM_BIND_DIRECTIVES"] = upstream_bind_directives(merged["UPSTREAM_SOURCE_ADDRESSES"])
    return merged


def render(template: str, settings: Mapping[str, str]) -> str:
    missing = sorted({name for name in _NAME.findall(template) if name not in settings})
    if missing:
        raise ValueError(f"template names unset value(s): {', '.join(missing)}")
    return _NAME.sub(lambda m: settings[m.group(1)], template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write nginx.conf")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="one setting; defaults: " + ", ".join(f"{k}={v!r}" for k, v in DEFAULTS.items()))
    args = parser.parse_args(argv)
    try:
        overrides = dict(item.split("=", 1) for item in args.set)
    except ValueError:
        parser.error("--set takes NAME=VALUE")
    try:
        text = render(args.template.read_text(), values(overrides, os.environ))
    except ValueError as exc:
        parser.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

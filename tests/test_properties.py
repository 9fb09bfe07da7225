"""Property-based tests (hypothesis) of everything that parses what a client or an operator typed.

- The query parameter parsers (`int_arg`, `seconds_arg` of service/handlers/base.py), called
  directly for any string, and through the real service for any bytes in a query.
- The settings (service/config.py): any string for any setting, as a flag or a variable, loads
  or stops start-up naming that setting; no other exception ever.
- The WebSocket guard's frame checks (service/ws/wsguard.py), against RFC 6455's rules.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import socket
import struct
import urllib.parse
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from conftest import ServiceProcess
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service import config
from service.handlers.base import BaseHandler
from service.http.errors import ApiError
from service.ws import wsguard

# No example database in the tree; in CI the same examples every run (a failure is reproducible).
settings.register_profile(
    "service", deadline=None, database=None, derandomize=os.environ.get("CI", "") in ("true", "1", "yes"),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("service")

# Strings that look like what the parsers are after, and anything at all.
NUMBERISH = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "infinity", "1e3", "1_000", "0x10", "1.5", "+7",
                     "-0", " 7 ", "\t7\n", "9" * 5000, "\udcff", "1\x00", "\u0663", "\uff11"]),
)
ANY_TEXT = st.one_of(NUMBERISH, st.text(), st.text(st.characters(codec="utf-8"), max_size=8))


class _OneArgument:
    """Stands in for a handler whose query has `raw` as its one argument (None: absent)."""

    def __init__(self, raw: str | None) -> None:
        self.raw = raw

    def get_query_argument(self, name: str, default: str | None = None) -> str | None:
        return default if self.raw is None else self.raw


def int_arg(raw: str | None, low: int, high: int, default: int | None = None) -> int:
    return BaseHandler.int_arg(_OneArgument(raw), "n", low, high, default)  # type: ignore[arg-type]


def seconds_arg(raw: str | None, low: float, high: float, default: float = 1.0) -> float:
    return BaseHandler.seconds_arg(_OneArgument(raw), "t", low, high, default)  # type: ignore[arg-type]


def bounds_int() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(-10**6, 10**6), st.integers(0, 10**7)).map(lambda t: (t[0], t[0] + t[1]))


@given(raw=ANY_TEXT, bounds=bounds_int())
def test_int_arg_gives_an_int_in_range_or_a_400_naming_it(raw: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    try:
        value = int_arg(raw, low, high)
    except ApiError as error:
        assert error.status_code == 400 and "'n'" in error.message
    else:
        assert type(value) is int and low <= value <= high


@given(value=st.integers(-10**8, 10**8), bounds=bounds_int())
def test_int_arg_takes_every_integer_in_range_and_none_outside(value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if low <= value <= high:
        assert int_arg(str(value), low, high) == value
    else:
        with pytest.raises(ApiError):
            int_arg(str(value), low, high)


@given(bounds=bounds_int(), default=st.none() | st.integers())
def test_int_arg_absent_is_the_default_or_a_400(bounds: tuple[int, int], default: int | None) -> None:
    if default is None:
        with pytest.raises(ApiError, match="'n' is required"):
            int_arg(None, *bounds)
    else:
        assert int_arg(None, *bounds, default=default) == default


@given(raw=ANY_TEXT, low=st.floats(0, 1000), span=st.floats(0, 1000))
def test_seconds_arg_gives_seconds_in_range_or_a_400_naming_it(raw: str, low: float, span: float) -> None:
    high = low + span
    try:
        value = seconds_arg(raw, low, high)
    except ApiError as error:
        assert error.status_code == 400 and "'t'" in error.message
    else:
        assert math.isfinite(value) and low <= value <= high


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_seconds_arg_takes_every_number_in_range(value: float) -> None:
    if 0.0 <= value <= 300.0:
        assert seconds_arg(repr(value), 0.0, 300.0) == value
    else:
        with pytest.raises(ApiError):
            seconds_arg(repr(value), 0.0, 300.0)


# -- the same parsers through the real service ---------------------------------------------------


def few_digits(raw: bytes) -> bool:
    """At most two digits in any script: whatever parses sleeps at most 99 ms."""
    return sum(ch.isdigit() for ch in raw.decode("utf-8", "replace")) <= 2


@given(raw=st.one_of(st.binary(max_size=24), st.text(max_size=24).map(str.encode)))
@settings(max_examples=150)
def test_any_bytes_in_a_query_get_200_or_a_json_400(service: ServiceProcess, raw: bytes) -> None:
    """Any percent-encoded bytes as `ms`: a 200 for what parses, a JSON 400 for the rest, never a 5xx."""
    assume(few_digits(raw))
    status, headers, body = service.request("/api/sleep?ms=" + urllib.parse.quote_from_bytes(raw, safe=""))
    answer = json.loads(body)
    assert headers["content-type"] == "application/json"
    if status == 200:
        assert 0 <= answer["slept_ms"] <= 99
    else:
        assert status == 400 and answer["status"] == 400
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # Tornado's own refusal, before the handler: it names nothing
            assert answer["error"] == "Bad Request"
        else:
            assert "'ms'" in answer["error"]


@given(raw=st.one_of(NUMBERISH, st.text(max_size=12)))
@settings(max_examples=100)
def test_any_poll_timeout_gets_an_answer_or_a_json_400(service: ServiceProcess, raw: str) -> None:
    try:
        timeout = float(raw.strip())
    except ValueError:
        timeout = 0.0
    assume(not timeout > 0.05)  # NaN and what is not a number pass: they must be refused at once
    query = urllib.parse.quote(raw, safe="", errors="surrogateescape")  # a lone surrogate: its byte
    status, _, body = service.request("/api/poll?timeout=" + query, timeout=10)
    assert status in (200, 204, 400)
    if status == 400:
        assert json.loads(body)["status"] == 400


# -- settings -------------------------------------------------------------------------------------

REAL_GETADDRINFO = socket.getaddrinfo


def numeric_getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> Any:
    """getaddrinfo without a name lookup: no example may reach a DNS server."""
    return REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    with mock.patch.object(socket, "getaddrinfo", numeric_getaddrinfo):
        yield


OPTIONS = st.sampled_from(config.OPTIONS)


@given(option=OPTIONS, raw=ANY_TEXT)
def test_every_setting_parser_gives_a_value_or_a_setting_error(option: Any, raw: str) -> None:
    with offline():
        try:
            value = option.parse(raw)
        except config.SettingError as error:
            assert str(error)  # says what would be accepted
            return
    default = getattr(config.Settings(), option.field)
    assert value is None or default is None or isinstance(value, type(default))
    if isinstance(value, float):
        assert math.isfinite(value)


def load(argv: list[str], environ: dict[str, str]) -> tuple[config.Settings | None, str]:
    """load(), and what it wrote to stderr when it stopped start-up (exit code 2)."""
    stderr = io.StringIO()
    with offline(), contextlib.redirect_stderr(stderr):
        try:
            return config.load(argv, environ), ""
        except SystemExit as stop:
            assert stop.code == 2
            return None, stderr.getvalue()


@given(option=OPTIONS, raw=ANY_TEXT)
def test_any_string_in_any_variable_loads_or_stops_naming_it(option: Any, raw: str) -> None:
    loaded, message = load([], {option.env: raw})
    if loaded is None:
        assert option.env in message and option.cli in message
    else:
        with offline():
            assert getattr(loaded, option.field) == option.parse(raw)


@given(option=OPTIONS.filter(lambda o: o.parse is not config._boolean), raw=ANY_TEXT)
def test_any_string_as_a_flag_loads_or_stops_naming_it(option: Any, raw: str) -> None:
    assume("\x00" not in raw)  # no command line can carry a NUL
    loaded, message = load([f"{option.cli}={raw}"], {option.env: "ignored: the flag wins"})
    if loaded is None:
        assert option.cli in message
    else:
        with offline():
            assert getattr(loaded, option.field) == option.parse(raw)


@given(grace=NUMBERISH, delay=NUMBERISH)
def test_drain_delay_and_grace_together_load_or_stop_naming_them(grace: str, delay: str) -> None:
    loaded, message = load([], {"SHUTDOWN_GRACE": grace, "DRAIN_DELAY": delay})
    if loaded is None:
        assert "SHUTDOWN_GRACE" in message or "DRAIN_DELAY" in message
    else:
        assert loaded.drain_delay < loaded.shutdown_grace


# -- the WebSocket guard --------------------------------------------------------------------------


def rfc6455_allows(first: int, second: int, in_message: bool) -> bool:
    """RFC 6455 section 5, read directly: a client frame's first two bytes, no extension."""
    fin, rsv, opcode = first >> 7, (first >> 4) & 7, first & 0xF
    masked, length = second >> 7, second & 0x7F
    if not masked or rsv:
        return False
    if opcode in (0x8, 0x9, 0xA):
        return bool(fin) and length <= 125
    if opcode == 0x0:
        return in_message
    if opcode in (0x1, 0x2):
        return not in_message
    return False


def test_the_frame_header_check_is_exactly_the_rfc() -> None:
    """Every possible header (2^16) in and out of a fragmented message."""
    for first in range(256):
        for second in range(256):
            for in_message in (False, True):
                refused = wsguard.header_problem(first, second, in_message) is not None
                assert refused != rfc6455_allows(first, second, in_message), (first, second, in_message)


@given(code=st.integers(0, 65535), reason=st.text(max_size=40))
def test_a_close_frame_is_refused_for_its_code_only(code: int, reason: str) -> None:
    problem = wsguard.close_problem(struct.pack("!H", code) + reason.encode())
    allowed = 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    assert problem == (None if allowed else (1002, f"invalid close code {code}"))


@given(reason=st.binary(max_size=40))
def test_a_close_reason_must_be_utf8(reason: bytes) -> None:
    try:
        reason.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    problem = wsguard.close_problem(struct.pack("!H", 1000) + reason)
    assert (problem is None) == valid and (valid or problem == (1007, "close reason not UTF-8"))


@given(key=st.binary(max_size=32))
def test_a_handshake_key_is_the_base64_of_16_bytes(key: bytes) -> None:
    assert (wsguard.key_problem(base64.b64encode(key).decode()) is None) == (len(key) == 16)

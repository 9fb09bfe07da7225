"""Settings from flags and an explicit environment dict: defaults, parsing, precedence, errors."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import OPTIONS, Settings, embedded_bus_limit, load


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    """Run load() expecting a usage error (exit 2); return the "error:" line it wrote to stderr.

    Only that line is returned because the usage text above it lists every flag and metavar
    (`--port PORT`), so a check against the whole of stderr would always pass.
    """
    with pytest.raises(SystemExit) as exited:
        load(argv, environ)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_defaults_with_no_flags_and_an_empty_environment() -> None:
    settings = load([], {})

    assert settings == Settings()
    assert settings.port == 8888
    assert settings.workers is None
    assert settings.log_level == "info"
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    ("environ", "field", "expected"),
    [
        ({"PORT": "9000"}, "port", 9000),
        ({"PORT": "0"}, "port", 0),
        ({"WEB_CONCURRENCY": "4"}, "workers", 4),
        ({"WEB_CONCURRENCY": "auto"}, "workers", None),
        ({"WEB_CONCURRENCY": "AUTO"}, "workers", None),
        ({"WEB_CONCURRENCY": ""}, "workers", None),
        ({"SHUTDOWN_GRACE": "5.5"}, "shutdown_grace", 5.5),
        ({"TICK_INTERVAL": "0.25"}, "tick_interval", 0.25),
        ({"LOG_LEVEL": "debug"}, "log_level", "debug"),
        ({"LOG_LEVEL": "WARNING"}, "log_level", "warning"),
        ({"LOG_FORMAT": "console"}, "log_format", "console"),
        ({"REUSE_PORT": "true"}, "reuse_port", True),
        ({"REUSE_PORT": "1"}, "reuse_port", True),
        ({"REUSE_PORT": "false"}, "reuse_port", False),
        ({"REUSE_PORT": "off"}, "reuse_port", False),
        ({"FORWARDED_ALLOW_IPS": "10.0.0.0/8, ::1"}, "forwarded_allow_ips", ("10.0.0.0/8", "::1")),
        ({"FORWARDED_ALLOW_IPS": "*"}, "forwarded_allow_ips", ("*",)),
        ({"FORWARDED_ALLOW_IPS": ""}, "forwarded_allow_ips", ()),
        ({"BROADCAST_URL": ""}, "broadcast_url", ""),
        ({"BROADCAST_URL": "redis://127.0.0.1:6380/2"}, "broadcast_url", "redis://127.0.0.1:6380/2"),
        ({"BROADCAST_URL": "redis://redis"}, "broadcast_url", "redis://redis:6379/0"),
        ({"BROADCAST_URL": " redis://[::1]/ "}, "broadcast_url", "redis://[::1]:6379/0"),
        ({"BROADCAST_CHANNEL": "app:rooms"}, "broadcast_channel", "app:rooms"),
        ({"BROADCAST_DIR": "/run/tornado-bus"}, "broadcast_dir", "/run/tornado-bus"),
        ({"ROOM_PUBLISH_RATE": "0"}, "room_publish_rate", 0.0),
        ({"ROOM_PUBLISH_RATE": "2.5"}, "room_publish_rate", 2.5),
        ({"ROOM_PUBLISH_BURST": "1"}, "room_publish_burst", 1),
        ({"ROOM_CLASSES": "chat, feed,chat"}, "room_classes", ("chat", "feed")),
        ({"ROOM_CLASSES": ""}, "room_classes", ()),
        ({}, "memory_shed_at", 0.9),
        ({"MEMORY_SHED_AT": "0.8"}, "memory_shed_at", 0.8),
        ({"MEMORY_SHED_AT": "0"}, "memory_shed_at", 0.0),
        ({"MEMORY_SHED_AT": "1"}, "memory_shed_at", 1.0),
    ],
)
def test_environment_values_are_parsed(environ: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(load([], environ), field) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "field", "expected"),
    [
        (["--port", "9001"], {"PORT": "9000"}, "port", 9001),
        (["--workers", "3"], {"WEB_CONCURRENCY": "5"}, "workers", 3),
        (["--workers", "auto"], {"WEB_CONCURRENCY": "5"}, "workers", None),
        (["--log-level", "error"], {"LOG_LEVEL": "debug"}, "log_level", "error"),
        (["--shutdown-grace", "7"], {"SHUTDOWN_GRACE": "30"}, "shutdown_grace", 7.0),
        (["--reuse-port"], {"REUSE_PORT": "false"}, "reuse_port", True),
        (["--no-reuse-port"], {"REUSE_PORT": "true"}, "reuse_port", False),
        (["--port", "9001"], {"PORT": "not-a-port"}, "port", 9001),  # the overridden variable is not read
        (["--memory-shed-at", "0.75"], {"MEMORY_SHED_AT": "0.5"}, "memory_shed_at", 0.75),
    ],
)
def test_a_flag_wins_over_its_variable(
    argv: list[str], environ: dict[str, str], field: str, expected: Any
) -> None:
    assert getattr(load(argv, environ), field) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "env_name", "flag"),
    [
        ([], {"PORT": "70000"}, "PORT", "--port"),
        (["--port", "70000"], {}, "PORT", "--port"),
        ([], {"PORT": "http"}, "PORT", "--port"),
        ([], {"WEB_CONCURRENCY": "-3"}, "WEB_CONCURRENCY", "--workers"),
        (["--workers", "0"], {}, "WEB_CONCURRENCY", "--workers"),
        ([], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL", "--log-level"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT", "--log-format"),
        ([], {"REUSE_PORT": "maybe"}, "REUSE_PORT", "--reuse-port"),
        ([], {"SHUTDOWN_GRACE": "0"}, "SHUTDOWN_GRACE", "--shutdown-grace"),
        ([], {"SHUTDOWN_GRACE": "abc"}, "SHUTDOWN_GRACE", "--shutdown-grace"),
        ([], {"TICK_INTERVAL": "nan"}, "TICK_INTERVAL", "--tick-interval"),
        ([], {"TICK_INTERVAL": "inf"}, "TICK_INTERVAL", "--tick-interval"),
        ([], {"DRAIN_DELAY": "20"}, "DRAIN_DELAY", "--drain-delay"),  # equal to the default grace
        ([], {"DRAIN_DELAY": "10", "SHUTDOWN_GRACE": "5"}, "DRAIN_DELAY", "--drain-delay"),
        (["--drain-delay", "6"], {"SHUTDOWN_GRACE": "5"}, "DRAIN_DELAY", "--drain-delay"),
        ([], {"FORWARDED_ALLOW_IPS": "nginx"}, "FORWARDED_ALLOW_IPS", "--forwarded-allow-ips"),
        ([], {"FORWARDED_ALLOW_IPS": "10.0.0.0/33"}, "FORWARDED_ALLOW_IPS", "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "*,10.0.0.1"], {}, "FORWARDED_ALLOW_IPS", "--forwarded-allow-ips"),
        ([], {"BROADCAST_URL": "http://127.0.0.1:6379"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "rediss://127.0.0.1"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://h:0/0"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://h:70000/0"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://h/one"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://h/0?timeout=1"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://u:secret@h/0"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_URL": "redis://bad_host!/0"}, "BROADCAST_URL", "--broadcast-url"),
        ([], {"BROADCAST_CHANNEL": "two words"}, "BROADCAST_CHANNEL", "--broadcast-channel"),
        ([], {"BROADCAST_CHANNEL": " "}, "BROADCAST_CHANNEL", "--broadcast-channel"),
        ([], {"BROADCAST_DIR": "/" + "d" * 120}, "BROADCAST_DIR", "--broadcast-dir"),
        ([], {"ROOM_PUBLISH_RATE": "-1"}, "ROOM_PUBLISH_RATE", "--room-publish-rate"),
        ([], {"ROOM_PUBLISH_RATE": "nan"}, "ROOM_PUBLISH_RATE", "--room-publish-rate"),
        ([], {"ROOM_PUBLISH_BURST": "0"}, "ROOM_PUBLISH_BURST", "--room-publish-burst"),
        ([], {"ROOM_CLASSES": "chat,bad.class"}, "ROOM_CLASSES", "--room-classes"),
        ([], {"ROOM_CLASSES": ",".join(f"c{i}" for i in range(33))}, "ROOM_CLASSES", "--room-classes"),
        ([], {"MEMORY_SHED_AT": "1.5"}, "MEMORY_SHED_AT", "--memory-shed-at"),
        ([], {"MEMORY_SHED_AT": "-0.1"}, "MEMORY_SHED_AT", "--memory-shed-at"),
        ([], {"MEMORY_SHED_AT": "nan"}, "MEMORY_SHED_AT", "--memory-shed-at"),
        ([], {"MEMORY_SHED_AT": "90%"}, "MEMORY_SHED_AT", "--memory-shed-at"),
        (["--memory-shed-at", "ninety"], {}, "MEMORY_SHED_AT", "--memory-shed-at"),
    ],
)
def test_invalid_values_exit_2_naming_the_setting(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], env_name: str, flag: str
) -> None:
    error = _error_line(capsys, argv, environ)

    assert env_name in error
    assert flag in error


def test_drain_delay_shorter_than_grace_is_accepted() -> None:
    settings = load([], {"DRAIN_DELAY": "4.9", "SHUTDOWN_GRACE": "5"})

    assert (settings.drain_delay, settings.shutdown_grace) == (4.9, 5.0)


def test_help_mentions_every_variable_and_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal width; make it fixed
    with pytest.raises(SystemExit) as exited:
        load(["--help"], {})

    assert exited.value.code == 0
    out = capsys.readouterr().out
    missing = [opt.env for opt in OPTIONS if opt.env not in out or opt.cli not in out]
    assert not missing, f"--help does not mention {missing}"


def test_a_refused_broadcast_url_is_not_echoed_with_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    error = _error_line(capsys, [], {"BROADCAST_URL": "redis://admin:hunter2@10.0.0.5:6379/0"})

    assert "hunter2" not in error
    assert "redis://***@10.0.0.5:6379/0" in error


@pytest.mark.parametrize(
    ("environ", "limit", "refused"),
    [
        ({"WS_MAX_MESSAGE_SIZE": "4096"}, 4096, False),
        ({"WS_MAX_MESSAGE_SIZE": "4097"}, 4096, True),
        ({"WS_MAX_MESSAGE_SIZE": "4097", "BROADCAST_URL": "redis://127.0.0.1"}, 4096, False),  # no bus
    ],
)
def test_the_embedded_bus_must_carry_the_largest_websocket_message(
    capsys: pytest.CaptureFixture[str], environ: dict[str, str], limit: int, refused: bool
) -> None:
    if refused:
        with pytest.raises(SystemExit) as exited:
            load([], environ, bus_limit=lambda: limit)
        assert exited.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert "WS_MAX_MESSAGE_SIZE" in error and "BROADCAST_URL" in error
    else:
        settings = load([], environ, bus_limit=lambda: limit)
        assert settings.ws_max_message_size == int(environ["WS_MAX_MESSAGE_SIZE"])


def test_this_machine_carries_the_default_message_size() -> None:
    assert embedded_bus_limit() >= Settings().ws_max_message_size

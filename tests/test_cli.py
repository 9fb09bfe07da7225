"""The real command line: bad settings stop start-up with exit code 2, naming the setting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "PORT"),
        ([], {"PORT": "http"}, "PORT"),
        ([], {"WEB_CONCURRENCY": "-3"}, "WEB_CONCURRENCY"),
        (["--workers", "0"], {}, "--workers"),
        ([], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ([], {"SHUTDOWN_GRACE": "-1"}, "SHUTDOWN_GRACE"),
        ([], {"TICK_INTERVAL": "0"}, "TICK_INTERVAL"),
        ([], {"MAX_CONNECTIONS": "lots"}, "MAX_CONNECTIONS"),
        ([], {"REUSE_PORT": "maybe"}, "REUSE_PORT"),
    ],
)
def test_bad_setting_exits_2_naming_it(args: list[str], env: dict[str, str], named: str) -> None:
    result = _run(*args, env=env)
    assert result.returncode == 2
    assert named in result.stderr
    assert result.stdout == ""  # nothing started, nothing logged


def test_flag_wins_over_env_and_still_validates() -> None:
    result = _run("--port", "-5", env={"PORT": "8080"})
    assert result.returncode == 2 and "--port" in result.stderr


def test_help_documents_every_setting() -> None:
    from service.config import OPTIONS

    result = _run("--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option.env in result.stdout and option.cli in result.stdout


def test_console_log_format_is_for_people() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", "0", "--address", "127.0.0.1", "--workers", "1",
         "--log-format", "console"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "worker started" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=15)
    lines += rest.splitlines()
    assert proc.returncode == 0
    listening = next(line for line in lines if "listening" in line)
    assert not listening.lstrip().startswith("{") and "[info" in listening
    assert any("shutdown complete" in line for line in lines)


def test_unusable_address_exits_2_naming_it() -> None:
    result = _run("--address", "no-such-host.invalid")
    assert result.returncode == 2 and "ADDRESS" in result.stderr


def test_port_in_use_is_one_json_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("--address", "127.0.0.1", "--port", str(port), "--workers", "1")
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    [error] = [e for e in events if e["level"] == "error"]
    assert error["event"] == "cannot listen: check PORT and ADDRESS" and error["port"] == port
    assert "in use" in error["error"]

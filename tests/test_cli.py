"""The real command line, for what only it does: exit codes, the console log format, bind errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from conftest import ROOT

from loadtests.harness import processes


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30,
    )


def test_a_bad_setting_stops_the_real_command_with_exit_2_naming_it() -> None:
    """End to end, once: every setting's parsing and message are table-tested in test_config.py."""
    result = _run("--workers", "2", env={"MAX_CONNECTIONS": "lots"})
    assert result.returncode == 2
    assert "MAX_CONNECTIONS" in result.stderr and "--max-connections" in result.stderr
    assert result.stdout == ""  # nothing started, nothing logged


def test_console_log_format_is_for_people() -> None:
    proc = processes.spawn(
        [sys.executable, "-m", "service", "--port", "0", "--address", "127.0.0.1", "--workers", "1",
         "--log-format", "console"],
        output=subprocess.PIPE, cwd=ROOT, stdin=None,
    )
    lines = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if "worker started" in lines[-1]:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=15)
    lines += rest.decode().splitlines()
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

"""`make stack`: the service, Nginx and Prometheus as local processes, stopped cleanly by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, require_tool
from proxy import free_port, wait_for_port, wait_for_query


def _start(workdir: Path, user: str | None = None) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {name: free_port() for name in ("service", "http", "tls", "status", "prometheus", "exporter")}
    command = [
        sys.executable, "-m", "deploy.stack", "--dir", str(workdir),
        "--service-port", str(ports["service"]), "--http-port", str(ports["http"]),
        "--tls-port", str(ports["tls"]), "--status-port", str(ports["status"]),
        "--prometheus-port", str(ports["prometheus"]), "--exporter-port", str(ports["exporter"]),
        "--shutdown-grace", "5", "--", "--workers", "2",
    ]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        user=user, env={**os.environ, "HOME": str(workdir)},
    )
    return proc, ports


def _stop(proc: subprocess.Popen[bytes], signum: int) -> tuple[int, str, list[int]]:
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signum)
    try:
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output.decode(errors="replace"), children


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stack_serves_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    for tool in ("nginx", "prometheus", "openssl"):
        require_tool(tool)
    proc, ports = _start(tmp_path / "stack")
    failure: BaseException | None = None
    try:
        for name in ("http", "tls", "prometheus", "service"):
            wait_for_port(ports[name], timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/api/hello", timeout=10) as response:
            assert json.load(response) == {"message": "hello world"}
        wait_for_query(ports["prometheus"], 'up{job="tornado"} == 1')  # Prometheus scraped the service
    except BaseException as exc:
        failure = exc
    finally:
        code, output, children = _stop(proc, signum)
    if failure is not None:
        raise AssertionError(f"stack output:\n{output[-4000:]}") from failure
    assert code == 0, output[-3000:]
    assert "stack running" in output and f"http://127.0.0.1:{ports['http']}" in output
    assert '"event":"shutdown complete"' in output  # the service drained
    assert "stack: stopped" in output
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive
    assert (tmp_path / "stack" / "tls" / "tls.crt").exists()  # a self-signed pair was made

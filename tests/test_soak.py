"""The soak's 60-second version (`make soak` runs 600 s): loadtests/soak/ as a command, through
Nginx, with modest client counts (the suite shares 2 cores), one worker SIGKILLed twice.

What it proves: the driver's verdict is PASS, every rule of it on its own (memory flat per worker
process, fds back at the baseline once the clients and Nginx are gone, the metrics directory
within its bound, zero 5xx and zero unexpected client failures, every killed worker back and
counted, a clean stop), that every kind of client really ran, and that no process of the run is
left. No timing is asserted: the figures the verdict reads are sizes and counts.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, alive, require_tool

from loadtests.soak import judging
from loadtests.soak.clients import Failure
from loadtests.soak.sampling import Kill

ARGS = [
    "--duration", "60", "--interval", "2", "--workers", "2", "--ws", "12", "--keepalive", "2",
    "--fresh", "1", "--pollers", "4", "--aborters", "1", "--publish-rate", "2", "--think", "0.1",
    "--kills", "2",
]  # fmt: skip


def run_soak(reports: Path, timeout: float) -> tuple[int, str]:
    """The driver as CI would run it; on overstaying it gets SIGTERM (it then stops what it started)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.soak", *ARGS, "--reports", str(reports)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the soak overstayed {timeout:.0f} s:\n{output[-4000:]}")
    return proc.returncode, output


@pytest.mark.timeout(420)
def test_soak_60_seconds_passes(tmp_path: Path) -> None:
    require_tool("nginx")
    require_tool("openssl")
    reports = tmp_path / "soak"
    code, output = run_soak(reports, timeout=360)
    results = sorted(reports.glob("*.json"))
    assert len(results) == 1, f"exit {code}, no results file:\n{output[-4000:]}"
    assert results[0].with_suffix(".md").exists()
    result = json.loads(results[0].read_text())

    failed = {name: check for name, check in result["checks"].items() if not check["passed"]}
    assert not failed, json.dumps(failed, indent=1, default=str)[:6000]
    assert result["verdict"] == "PASS" and code == 0, output[-4000:]
    assert "PASS" in output

    # Every kind of client ran, and the client's own aborts were made (and are no failure).
    clients = result["clients"]
    for kind in ("ws_ticker", "ws_chat", "http_keepalive", "http_new", "long_poll", "publish"):
        assert clients.get(kind, {}).get("ok", 0) > 0, (kind, clients)
    assert clients["abort"]["aborted"] > 0
    assert result["checks"]["errors"]["unexpected_failures"] == 0

    # Each rule judged what it claims to: both worker slots' memory, every worker's and the
    # supervisor's fds, two restarts, each leaving its counters and histograms and no live gauge.
    memory = result["checks"]["memory"]
    assert {p["slot"] for p in memory["processes"] if "growth_mib" in p} == {0, 1}
    assert {row["slot"] for row in result["checks"]["fds"]["rows"]} == {"0", "1", "supervisor"}
    restarts = result["checks"]["restarts"]
    assert restarts["kills"] == restarts["restarted"] == restarts["restarts_in_metrics"] == 2
    metrics_dir = result["checks"]["metrics_dir"]
    assert metrics_dir["kept_per_restart"] > 0 and not metrics_dir["live_gauges_left"]
    assert metrics_dir["end_files"] <= metrics_dir["end_bound"]

    # Nothing of the run is left: the supervisor, every worker it ever had, Nginx.
    pids = {result["baseline"]["supervisor"]["pid"]}
    pids |= {w["pid"] for w in result["baseline"]["workers"].values()}
    pids |= {k["pid"] for k in result["kills"]} | {k["new_pid"] for k in result["kills"]}
    assert not [pid for pid in pids if alive(pid)]
    assert result["checks"]["cleanup"]["left"] == []


# -- the rules themselves (loadtests/soak/judging.py), on made-up figures, nothing started: each can fail
MIB = 1024 * 1024


def memory(samples: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    """The memory rule as a 60 s run with 2 s samples and the default limits would apply it."""
    return judging.judge_memory(samples, final, 60.0, 2.0, 2, 4.0, 5.0)


def memory_samples(rss: Callable[[float], float]) -> list[dict[str, Any]]:
    return [
        {"t": float(t), "workers": {"0": {"pid": 10, "rss": int(rss(t)), "fds": 30},
                                    "1": {"pid": 11, "rss": 50 * MIB, "fds": 30}},
         "supervisor": {"rss": 1, "fds": 9}, "metrics_dir": {"files": 9, "bytes": 9}}
        for t in range(0, 61, 2)
    ]  # fmt: skip


def test_memory_rule_passes_a_plateau_and_fails_a_leak() -> None:
    final = {"workers": {"0": {"pid": 10}, "1": {"pid": 11}}}
    plateau = memory(memory_samples(lambda t: (40 + min(t, 15) / 3) * MIB), final)
    assert plateau["passed"], plateau
    leak = memory(memory_samples(lambda t: (40 + t / 3) * MIB), final)  # 20 MiB a minute
    assert not leak["passed"]
    assert [p["verdict"] for p in leak["processes"]] == ["FAIL: grew", "flat"]


def test_memory_rule_fails_when_a_slot_is_never_judged() -> None:
    final = {"workers": {"0": {"pid": 12}, "1": {"pid": 11}}}  # worker 0's last process never sampled
    verdict = memory(memory_samples(lambda t: 40 * MIB), final)
    assert not verdict["passed"]


def test_fd_rule_fails_on_a_descriptor_or_connection_left() -> None:
    baseline = {"workers": {"0": {"pid": 10, "fds": 30}}, "supervisor": {"pid": 9, "fds": 12}}
    clean = {
        "workers": {"0": {"pid": 10, "fds": 31, "tcp_connections": 0}},
        "supervisor": {"pid": 9, "fds": 12},
    }
    assert judging.judge_fds(memory_samples(lambda t: MIB), baseline, clean, 2)["passed"]
    leaked = {
        "workers": {"0": {"pid": 10, "fds": 33, "tcp_connections": 0}},
        "supervisor": {"pid": 9, "fds": 12},
    }
    assert not judging.judge_fds(memory_samples(lambda t: MIB), baseline, leaked, 2)["passed"]
    held = {
        "workers": {"0": {"pid": 10, "fds": 30, "tcp_connections": 1}},
        "supervisor": {"pid": 9, "fds": 12},
    }
    assert not judging.judge_fds(memory_samples(lambda t: MIB), baseline, held, 2)["passed"]


def test_metrics_dir_rule_allows_kept_files_per_restart_and_nothing_else() -> None:
    kill = Kill(slot=1, pid=11, t=20.0, new_pid=13, back_after=0.5,
                     files=["counter_11.db", "gauge_livesum_11.db", "histogram_11.db"],
                     kept=["counter_11.db", "histogram_11.db"])  # fmt: skip
    baseline = {"metrics_dir": {"files": 9, "bytes": 9 * 65536}}

    def rows(after_kill: int) -> list[dict[str, Any]]:
        return [
            {"t": float(t), "workers": {}, "supervisor": None,
             "metrics_dir": {"files": 9 if t < 20 else after_kill, "bytes": 9 * 65536}}
            for t in range(0, 61, 2)
        ]  # fmt: skip

    final_ok = {"metrics_dir": {"files": 11, "bytes": 11 * 65536}}
    ok = judging.judge_metrics_dir(rows(11), baseline, final_ok, [kill])
    assert ok["passed"] and ok["end_bound"] == 11 and ok["kept_per_restart"] == 2, ok
    grown = judging.judge_metrics_dir(rows(12), baseline, final_ok, [kill])
    assert not grown["passed"]
    kill.live_left = ["gauge_livesum_11.db"]
    stale = judging.judge_metrics_dir(rows(11), baseline, final_ok, [kill])
    assert not stale["passed"]


def test_error_rule_counts_kill_cuts_apart_from_unexpected_failures() -> None:
    kill = Kill(slot=1, pid=11, t=20.0, new_pid=13, back_after=0.5)
    cut = Failure(20.1, "ws_ticker", "/ws/ticker", "lost: IncompleteReadError", 11)
    stray = Failure(40.0, "http_keepalive", "GET /api/hello", "status 500", 10)
    judging.attribute_failures([cut], [kill])
    clean = judging.judge_errors([cut], 0, 0, {"requests_5xx": 0.0})
    assert clean["passed"] and clean["cut_by_kills"] == 1, clean
    judging.attribute_failures([cut, stray], [kill])
    assert not judging.judge_errors([cut, stray], 1, 0, {"requests_5xx": 1.0})["passed"]


def test_restart_rule_needs_every_kill_back_and_counted() -> None:
    kills = [Kill(slot=1, pid=11, t=20.0, new_pid=13, back_after=0.5)]
    assert judging.judge_restarts(kills, 1, {"restarts": 1.0}, 1)["passed"]
    assert not judging.judge_restarts(kills, 1, {"restarts": 0.0}, 1)["passed"]
    kills[0].new_pid = None
    assert not judging.judge_restarts(kills, 1, {"restarts": 1.0}, 1)["passed"]

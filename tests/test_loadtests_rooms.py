"""The rooms load scenario (loadtests/k6/rooms.js), small: k6 against a real 2-worker service.

A few hundred members over both workers, a publisher at 10/s for 3 s; the run passes its own
thresholds (no failed connect, no unexpected close, no refused publish) and the summary shows no
loss: every member got every accepted message. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, ServiceProcess, require_tool

MEMBERS = 200


def test_rooms_scenario_delivers_every_message_to_every_member(
    start_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    k6 = require_tool("k6")
    svc = start_service("--reuse-port", "--room-publish-rate", "0")
    summary = tmp_path / "summary.json"
    env = {**os.environ, "BASE_URL": f"http://127.0.0.1:{svc.port}", "N": str(MEMBERS), "OPEN_RATE": "400",
           "R": "10", "D": "3", "WARMUP_S": "1", "DRAIN_S": "2", "K6_NO_USAGE_REPORT": "true"}
    proc = subprocess.run([k6, "run", "--no-color", "--quiet", "--summary-export", str(summary),
                           str(ROOT / "loadtests" / "k6" / "rooms.js")],
                          env=env, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads(summary.read_text())["metrics"]
    assert metrics["room_members_opened"]["count"] == MEMBERS
    accepted = metrics["room_publishes_accepted"]["count"]
    assert accepted >= 10
    assert metrics["room_messages_received"]["count"] == accepted * MEMBERS  # loss 0
    assert metrics["room_delivery"]["count"] == accepted * MEMBERS
    joined = {e["worker"] for e in svc.events if e.get("event") == "backplane connected"}
    assert joined == {0, 1}

"""The worker's garbage-collector policy (service/process/gcpolicy.py), in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

from service.process import gcpolicy


def test_a_worker_freezes_its_start_and_collects_rarely() -> None:
    code = (
        "import gc, json; from service.process import gcpolicy; gcpolicy.tune_for_many_connections(); "
        "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    thresholds, frozen = json.loads(out)
    assert tuple(thresholds) == gcpolicy.THRESHOLDS
    assert frozen > 1000  # the modules and objects built before serving are out of every collection

"""The tick every Python peer broadcasts, on one schedule, so the contestants differ only in fan-out.

The same JSON as the service's tick bus (`{"type": "tick", "seq", "ts", "worker"}`, `ts` taken
when the fan-out starts), due every `interval` seconds from the start: a slow fan-out delays
the next tick's start but never shifts the schedule. The peers import it as a sibling module
(each runs with this folder on its path: as a script, or under gunicorn's `--chdir`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator


async def tick_messages(interval: float) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    seq, due = 0, loop.time()
    while True:
        due += interval
        await asyncio.sleep(max(0.0, due - loop.time()))
        seq += 1
        yield json.dumps({"type": "tick", "seq": seq, "ts": time.time(), "worker": 0})

"""Child processes in sessions of their own, and how to stop them.

A service forks workers and Nginx forks its own; started as the leader of a new session (and so
of a process group), a child and everything it forks can be signalled as one, and nothing is
left behind when a test or a run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

# Where a child's output goes: a file (appended to), an open file, subprocess.PIPE or DEVNULL.
Output = Path | IO[bytes] | int


def spawn(
    command: Sequence[str], *, output: Output = subprocess.DEVNULL, cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """`command` as the leader of a new session, stderr with stdout (`env` replaces the environment)."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(output.open("ab")) if isinstance(output, Path) else output
        return subprocess.Popen(
            list(command), cwd=cwd, env=None if env is None else dict(env), stdin=stdin, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, user=user,
        )


def kill_group(pgid: int) -> None:
    """SIGKILL to every process of the group, if any is left (the leader may be gone already)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], first: int = signal.SIGTERM, grace: float = 15.0,
    *, whole_group: bool = False,
) -> int:
    """`first` to the leader (or to its whole group), up to `grace` seconds for it to exit, then
    SIGKILL to the group it leads (workers it left behind, or all of it if it lingered); reaped.

    The leader alone by default: a supervisor drains its own workers on SIGTERM, and a signal
    to each of them at once would be a different shutdown than the one deployed.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if whole_group:
                os.killpg(proc.pid, first)
            else:
                proc.send_signal(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill_group(proc.pid)
    return proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Request ids: a client's sane X-Request-ID, or 32 fresh hex digits.

A fresh id is a random 64-bit prefix drawn once per process (again in each forked child) and a
64-bit counter: unique across workers and restarts, and without a getrandom(2) per request,
which on the hot path cost more than the rest of the id handling together.
"""

from __future__ import annotations

import itertools
import os
import re

HEADER = "X-Request-ID"
_SANE = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
_prefix = ""
_counter = itertools.count()


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count()


_reseed()
os.register_at_fork(after_in_child=_reseed)


def choose(given: str) -> str:
    """`given` when it is 1 to 128 safe characters (what Nginx applies too), else a new id.

    Most requests without Nginx in front carry none: an empty id is replaced without a regex.
    """
    if given and _SANE.fullmatch(given):
        return given
    return f"{_prefix}{next(_counter):016x}"


def from_headers(values: list[str]) -> str:
    """The id for a request whose X-Request-ID header lines are `values` (`HTTPHeaders.get_list`).

    Several lines are joined with commas, as `HTTPHeaders` would, which no sane id contains.
    """
    if not values:
        return choose("")
    return choose(values[0] if len(values) == 1 else ",".join(values))

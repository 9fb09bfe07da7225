"""Debian's redis-server on loopback for the rooms' backplane, as `make stack` and the tests run it."""

from __future__ import annotations

from pathlib import Path

from deploy.redisconf import REDIS_FLAGS


def redis_command(port: int, directory: Path, binary: str = "redis-server") -> list[str]:
    """redis-server on 127.0.0.1:port, in the foreground, nothing written to disk."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", *REDIS_FLAGS, "--dir", str(directory)]

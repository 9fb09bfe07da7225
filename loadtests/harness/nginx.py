"""Nginx on this machine from the project's template: what `make stack`, the tests and the
benchmarks run, so that what they measure is what is shipped."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nginx import render as nginx_render


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, made once and reused."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    if not (cert.exists() and key.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
            check=True, capture_output=True,
        )
    return cert, key


def render_nginx(path: Path, run_dir: Path, **settings: str) -> Path:
    """nginx.conf for this machine, from nginx/nginx.conf.template."""
    run_dir.mkdir(parents=True, exist_ok=True)
    values = nginx_render.values({"RUN_DIR": str(run_dir), **settings}, {})
    path.write_text(nginx_render.render(nginx_render.TEMPLATE.read_text(), values))
    return path


def nginx_command(conf: Path, error_log: Path | str = "/dev/stderr") -> list[str]:
    """Nginx in the foreground on `conf`, its prefix beside it (no file of /etc/nginx is used)."""
    return ["nginx", "-p", str(conf.parent), "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"]

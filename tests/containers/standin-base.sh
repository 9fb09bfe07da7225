#!/usr/bin/env bash
# Make the stand-in base image the container tests build on: no registry is reachable from the
# build machines, so `python:3.11-slim-bookworm` and `debian:bookworm-slim` cannot be pulled.
# A minimal Debian bookworm made with debootstrap from the mirror apt already uses, with
# python3 and the host's CA bundle (so pip inside `podman build` trusts the same roots).
# Cached: an image that exists already is kept (pass --force to remake it).
set -euo pipefail
IMAGE="${1:-localhost/standin-bookworm:1}"
FORCE="${2:-}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}"
if [ "$FORCE" != "--force" ] && podman image exists "$IMAGE"; then
    exit 0
fi
# The Debian mirror apt already uses (deb822 .sources or a one-line .list), security excluded.
mirror=$( (cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list \
    2>/dev/null || true) | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
    | grep -v security | head -n1 | awk '{print $2}' || true)
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs=$(mktemp -d /var/tmp/standin-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "making $IMAGE from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# python:3.11-slim puts python3 on PATH as `python` too; the Dockerfiles use only python3.
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "made $IMAGE"

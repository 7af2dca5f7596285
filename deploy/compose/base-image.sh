#!/usr/bin/env bash
# A Python 3.11 base image made from the Debian mirror, for machines that cannot pull from Docker Hub.
# Built once; an existing image of that name is kept (delete it to rebuild).
#   deploy/compose/base-image.sh [NAME]      (default kvwire-base:bookworm; needs root and debootstrap)
set -euo pipefail
name=${1:-kvwire-base:bookworm}
mirror=${KVWIRE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name: present, kept"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base image $name: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /tmp/kvwire-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $name: debootstrap bookworm from $mirror (a few minutes, once)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$name" >/dev/null
echo "base image $name: built ($(docker image inspect -f '{{.Size}}' "$name" | numfmt --to=iec))"

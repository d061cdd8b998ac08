#!/usr/bin/env bash
# The two base images docker/*.Dockerfile and docker-compose.yml use, python:3.11-slim and
# redis:7-alpine, for a machine whose Docker cannot pull them (no registry access): for each tag that
# is neither present nor pullable it builds a stand-in from Debian bookworm packages with debootstrap
# and imports it under that tag. A machine that can pull the real images never gets a stand-in.
#
#   scripts/docker_base_images.sh      # needs root, docker, debootstrap (apt-get install debootstrap)
#
# Prints the tags of the stand-ins it built, one per line, on stdout (its progress goes to stderr),
# so a caller can remove them afterwards (scripts/test_compose.sh does).
#
# The stand-ins behave like the real images where our files rely on them:
# - python:3.11-slim: Debian's python3 (3.11) in a virtual environment at /opt/python that is first on
#   PATH, so `python`, `python3` and `pip` work as in the official image and pip installs without
#   Debian's "externally managed" guard; Python's headers are there (python3-dev: the official image
#   has them under /usr/local/include), for Triton's launcher builds; the host's CA bundle is copied
#   in (a host behind a TLS-inspecting proxy trusts its CA, and so do the images);
# - redis:7-alpine: Debian's redis-server 7 and redis-cli (compose's healthcheck), started in /data.
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_TAG=python:3.11-slim
REDIS_TAG=redis:7-alpine

say() { echo "[docker_base_images] $*" >&2; }

need_stand_in() {
    local tag=$1
    docker image inspect "$tag" >/dev/null 2>&1 && return 1
    say "pulling $tag"
    timeout 120 docker pull -q "$tag" >/dev/null 2>&1 && return 1
    say "$tag cannot be pulled here: building a stand-in from Debian $SUITE packages"
    return 0
}

# debootstrap a minimal Debian with the given extra packages into a fresh folder, $ROOTFS
bootstrap() {
    local packages=$1 dir
    command -v debootstrap >/dev/null || { say "debootstrap is missing: apt-get install debootstrap"; exit 1; }
    dir=$(mktemp -d /tmp/sdserve-rootfs.XXXXXX)
    ROOTFS_DIRS+=("$dir")
    ROOTFS=$dir
    say "debootstrap $SUITE with $packages (a minute or two)"
    debootstrap --variant=minbase --include="$packages" "$SUITE" "$dir" "$MIRROR" >&2
    # the host's CA bundle: whatever the host trusts for PyPI, the images trust too
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
}

# like the official slim images: no package lists or downloaded packages left in the image
clean_apt() {
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin
}

python_stand_in() {
    bootstrap python3,python3-venv,python3-dev,ca-certificates
    local dir=$ROOTFS
    chroot "$dir" /usr/bin/python3 -m venv /opt/python
    clean_apt "$dir"
    tar -C "$dir" -c . | docker import \
        --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$PYTHON_TAG" >&2
    docker run --rm "$PYTHON_TAG" sh -c 'python --version && pip --version' >&2
}

redis_stand_in() {
    bootstrap redis-server,redis-tools,ca-certificates
    local dir=$ROOTFS
    mkdir -p "$dir/data"
    clean_apt "$dir"
    tar -C "$dir" -c . | docker import \
        --change 'WORKDIR /data' \
        --change 'EXPOSE 6379' \
        --change 'CMD ["redis-server"]' \
        - "$REDIS_TAG" >&2
    docker run --rm "$REDIS_TAG" redis-server --version >&2
}

ROOTFS_DIRS=()
ROOTFS=
cleanup() { for dir in "${ROOTFS_DIRS[@]}"; do rm -rf "$dir"; done; }
trap cleanup EXIT

if need_stand_in "$PYTHON_TAG"; then
    python_stand_in
    echo "$PYTHON_TAG"
fi
if need_stand_in "$REDIS_TAG"; then
    redis_stand_in
    echo "$REDIS_TAG"
fi

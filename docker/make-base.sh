#!/usr/bin/env bash
# Make a local stand-in for the Dockerfile's default base image (debian:bookworm-slim) where
# no container registry is reachable: a Debian bookworm minbase root made with debootstrap
# from Debian's own mirror, trimmed the way the official slim image is, then `docker import`ed.
#
#   docker/make-base.sh [TAG]        # default TAG: tcsmae-base:bookworm
#   docker build --network host --build-arg BASE_IMAGE=tcsmae-base:bookworm -t tcsmae .
#
# Needs root, debootstrap (apt-get install debootstrap) and a running Docker engine.
# MIRROR=http://... picks another Debian mirror (default deb.debian.org).
set -euo pipefail

TAG=${1:-tcsmae-base:bookworm}
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "make-base.sh: needs root (debootstrap)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "make-base.sh: install debootstrap first" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "make-base.sh: no Docker engine answers (start dockerd)" >&2; exit 2; }

ROOT=$(mktemp -d /tmp/tcsmae-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT

debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"

# The official image's apt sources (deb822), with updates and security.
rm -f "$ROOT/etc/apt/sources.list"
cat > "$ROOT/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${MIRROR}
Suites: ${SUITE} ${SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: ${SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES

# Slim: later apt installs leave out manuals, docs and translations; no caches kept.
cat > "$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
SLIM
echo 'APT::Install-Recommends "false"; APT::Install-Suggests "false";' > "$ROOT/etc/apt/apt.conf.d/docker-no-recommends"
echo 'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' > "$ROOT/etc/apt/apt.conf.d/docker-no-cache"
find "$ROOT/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/* \
       "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
       "$ROOT"/var/log/*.log "$ROOT"/tmp/*

tar --numeric-owner -C "$ROOT" -c . | docker import --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$TAG"
docker image ls "$TAG"

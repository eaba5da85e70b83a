#!/bin/bash
# Fetch a current Docker engine (test infrastructure, not part of the plugin) into a cache directory:
# docker.io (dockerd, docker-proxy), containerd 2 and Compose v2 from a newer Debian suite, without a
# registry and without touching the system's apt setup (a private sources list, lists and cache dir;
# `apt-get download` + `dpkg -x`). bookworm's runc is kept (sid's needs a newer glibc).
#
#   tests/engines/fetch-docker.sh            prints the cache directory when it is ready
#
# Layout of $VPCNET_CI_DOCKER_DIR (default /var/cache/vpcnet-ci/docker-$SUITE):
#   root/usr/sbin/dockerd, root/usr/bin/containerd ...   the unpacked packages (put first on PATH)
#   docker-config/cli-plugins/docker-compose             a DOCKER_CONFIG with Compose v2 as CLI plugin
#   VERSIONS                                             the package versions, written last
# Idempotent: with VERSIONS present nothing is downloaded (delete the directory to refresh).
# Environment: VPCNET_CI_DOCKER_SUITE (sid), VPCNET_CI_DOCKER_MIRROR (default: the archive this host's apt
# uses, from plugin/host-mirror.sh),
# VPCNET_CI_DOCKER_DIR.
set -euo pipefail

SUITE=${VPCNET_CI_DOCKER_SUITE:-sid}
DIR=${VPCNET_CI_DOCKER_DIR:-/var/cache/vpcnet-ci/docker-$SUITE}
PACKAGES=(docker.io containerd docker-compose)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

die() { echo "fetch-docker.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (apt-get download into $DIR)"
if [ -s "$DIR/VERSIONS" ] && [ -x "$DIR/root/usr/sbin/dockerd" ]; then
    echo "$DIR"
    exit 0
fi
[ -r "$KEYRING" ] || die "$KEYRING missing (apt-get install debian-archive-keyring)"
command -v dpkg >/dev/null || die "dpkg not found"
MIRROR=${VPCNET_CI_DOCKER_MIRROR:-$("$(dirname "$0")/../../plugin/host-mirror.sh")} \
    || die "no Debian mirror: set VPCNET_CI_DOCKER_MIRROR"

mkdir -p "$(dirname "$DIR")"
work=$(mktemp -d "$DIR.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$work/sources.list"
APT=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::status=/dev/null
     -o APT::Sandbox::User=root -o Acquire::Retries=3)
apt-get "${APT[@]}" -qq update >&2
(cd "$work/debs" && apt-get "${APT[@]}" -qq download "${PACKAGES[@]}" >&2)
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$work/root"
done
mkdir -p "$work/docker-config/cli-plugins"
cp "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$work/docker-config/cli-plugins/"
for deb in "$work"/debs/*.deb; do dpkg-deb --showformat='${Package} ${Version}\n' -W "$deb"; done >"$work/versions"
"$work/root/usr/sbin/dockerd" --version >/dev/null || die "the unpacked dockerd does not run on this machine"

rm -rf "$DIR"
mkdir -p "$DIR"
mv "$work/root" "$work/docker-config" "$DIR/"
mv "$work/versions" "$DIR/VERSIONS"          # last: marks the directory complete
echo "$DIR"

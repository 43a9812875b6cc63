#!/usr/bin/env bash
# Installs what the Kubernetes controller tests need, idempotently, and prints the kube-apiserver
# binary's path as the last line of stdout (progress goes to stderr):
#   - etcd 3.4 from Debian's `etcd-server` package (/usr/bin/etcd);
#   - kube-apiserver v1.20.2, built from Debian's *source* package `kubernetes` (no prebuilt
#     binaries can be fetched here) with Debian's Go 1.19, and cached outside the repository by
#     version: $MESHACCEL_CACHE/kube-apiserver-v1.20.2/kube-apiserver (default cache
#     /var/cache/meshaccel). The first build takes about 5 minutes on 2 cores; later runs only
#     check the cached binary's version.
#
# Usage: scripts/install-kube.sh           # prints /var/cache/meshaccel/kube-apiserver-v1.20.2/kube-apiserver
set -euo pipefail
KUBE_VERSION=v1.20.2
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
DIR="$CACHE/kube-apiserver-$KUBE_VERSION"
BIN="$DIR/kube-apiserver"
say() { echo "[install-kube] $*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (apt-get)"; exit 1; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# etcd 3.4 (the server only; the tests start it themselves, never the Debian service).
if ! command -v etcd >/dev/null 2>&1; then
  say "installing Debian package etcd-server"
  apt_install etcd-server
  # The package enables a system etcd on 2379/2380 where systemd runs; the tests start their own
  # on run-unique ports, so switch off the one this install just enabled.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >&2 2>/dev/null || true
  fi
fi

# "Kubernetes v1.20.2" -> v1.20.2
version_of() { "$1" --version 2>/dev/null | sed -n 's/^Kubernetes \(v[0-9.]*\).*/\1/p' | head -n1; }

if [ -x "$BIN" ] && [ "$(version_of "$BIN")" = "$KUBE_VERSION" ]; then
  say "kube-apiserver $KUBE_VERSION already at $BIN"
  echo "$BIN"
  exit 0
fi

GO=/usr/lib/go-1.19/bin/go
need=()
[ -x "$GO" ] || need+=(golang-1.19-go)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
command -v make >/dev/null 2>&1 || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  apt_install "${need[@]}"
fi

# deb-src for the Debian release in use (the machines ship only binary `deb` entries).
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
SRC_LIST=/etc/apt/sources.list.d/meshaccel-deb-src.sources
if [ ! -f "$SRC_LIST" ]; then
  say "adding deb-src for Debian $CODENAME ($SRC_LIST)"
  cat > "$SRC_LIST" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $CODENAME
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_updated=
fi
if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi

mkdir -p "$CACHE"
chmod 755 "$CACHE"
WORK=$(mktemp -d "$CACHE/.kube-build.XXXXXX")
chmod 755 "$WORK"   # apt-get source downloads as _apt
trap 'rm -rf "$WORK"' EXIT
say "fetching Debian source package kubernetes into $WORK"
(cd "$WORK" && apt-get source -qq kubernetes >&2)
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[ -n "$SRC" ] || { say "apt-get source kubernetes unpacked nothing"; exit 1; }

# The source package's upstream version must be the one we pin (Debian bookworm ships
# 1.20.5+really1.20.2: the upstream 1.20.2 tree).
if [ -f "$SRC/CHANGELOG/CHANGELOG-1.20.md" ] || [ -d "$SRC/cmd/kube-apiserver" ]; then :; else
  say "$SRC does not look like a Kubernetes source tree"; exit 1
fi

say "building kube-apiserver $KUBE_VERSION with $($GO version | cut -d' ' -f3) (about 5 minutes on 2 cores)"
(
  cd "$SRC"
  export PATH="$(dirname "$GO"):$PATH"
  export GOFLAGS=-mod=vendor GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath" GO111MODULE=on
  export KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
  export KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
  export KUBE_BUILD_PLATFORMS=linux/$($GO env GOARCH) CGO_ENABLED=0
  make WHAT=cmd/kube-apiserver >&2
)
out=$(find "$SRC/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
[ -n "$out" ] || { say "build finished but no kube-apiserver binary under $SRC/_output"; exit 1; }
got=$(version_of "$out")
[ "$got" = "$KUBE_VERSION" ] || { say "built binary reports '$got', expected $KUBE_VERSION"; exit 1; }
mkdir -p "$DIR"
chmod 755 "$DIR"
tmp=$(mktemp "$DIR/.kube-apiserver.XXXXXX")
cp "$out" "$tmp"
chmod 755 "$tmp"
mv -f "$tmp" "$BIN"
say "kube-apiserver $got installed at $BIN"
echo "$BIN"

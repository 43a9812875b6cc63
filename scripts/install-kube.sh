#!/usr/bin/env bash
# Installs what the Kubernetes tests need, idempotently, and prints the kube-apiserver binary's path
# as the last line of stdout (progress goes to stderr); the other Kubernetes binaries sit next to it:
#   - etcd 3.4 from Debian's `etcd-server` package (/usr/bin/etcd);
#   - kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl v1.20.2, built
#     from Debian's *source* package `kubernetes` (no prebuilt binaries can be fetched here) with
#     Debian's Go 1.19, and the pod sandbox's `pause` from the same tree (build/pause, static C);
#     all cached outside the repository by version: $MESHACCEL_CACHE/kubernetes-v1.20.2/ (default
#     cache /var/cache/meshaccel). The first build takes about 10 minutes on 2 cores; later runs
#     only check the cached binaries' versions.
#
# Usage: scripts/install-kube.sh           # prints /var/cache/meshaccel/kubernetes-v1.20.2/kube-apiserver
set -euo pipefail
KUBE_VERSION=v1.20.2
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
DIR="$CACHE/kubernetes-$KUBE_VERSION"
BIN="$DIR/kube-apiserver"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
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

# kubectl prints "Client Version: v1.20.2"; the others "Kubernetes v1.20.2".
version_of_component() {
  case "$1" in
    */kubectl) "$1" version --client --short 2>/dev/null | sed -n 's/^Client Version: \(v[0-9.]*\).*/\1/p' ;;
    *) version_of "$1" ;;
  esac
}
cached() {
  local c
  for c in "${COMPONENTS[@]}"; do
    [ -x "$DIR/$c" ] && [ "$(version_of_component "$DIR/$c")" = "$KUBE_VERSION" ] || return 1
  done
  [ -x "$DIR/pause" ]
}
if cached; then
  say "Kubernetes $KUBE_VERSION (${COMPONENTS[*]}, pause) already in $DIR"
  echo "$BIN"
  exit 0
fi

GO=/usr/lib/go-1.19/bin/go
need=()
[ -x "$GO" ] || need+=(golang-1.19-go)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(find /usr/lib -name libc.a 2>/dev/null | head -n1)" ] || need+=(libc6-dev)
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

say "building ${COMPONENTS[*]} $KUBE_VERSION with $($GO version | cut -d' ' -f3) (about 10 minutes on 2 cores)"
what=$(printf 'cmd/%s ' "${COMPONENTS[@]}")
(
  cd "$SRC"
  export PATH="$(dirname "$GO"):$PATH"
  export GOFLAGS=-mod=vendor GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath" GO111MODULE=on
  export KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
  export KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
  export KUBE_BUILD_PLATFORMS=linux/$($GO env GOARCH) CGO_ENABLED=0
  make WHAT="${what% }" >&2
)
mkdir -p "$DIR"
chmod 755 "$DIR"
install_bin() { # built-path name
  local tmp
  tmp=$(mktemp "$DIR/.$2.XXXXXX")
  cp "$1" "$tmp"
  chmod 755 "$tmp"
  mv -f "$tmp" "$DIR/$2"
}
for c in "${COMPONENTS[@]}"; do
  out=$(find "$SRC/_output" -type f -name "$c" -perm -u+x | head -n1)
  [ -n "$out" ] || { say "build finished but no $c binary under $SRC/_output"; exit 1; }
  got=$(version_of_component "$out")
  [ "$got" = "$KUBE_VERSION" ] || { say "built $c reports '$got', expected $KUBE_VERSION"; exit 1; }
  install_bin "$out" "$c"
done
# The sandbox container's process (what registry.k8s.io/pause runs), from the same tree.
pause_src=$(find "$SRC/build/pause" -name pause.c | head -n1)
[ -n "$pause_src" ] || { say "no build/pause/**/pause.c in $SRC"; exit 1; }
gcc -Os -Wall -Werror -static -DVERSION="$KUBE_VERSION" -o "$WORK/pause" "$pause_src" >&2
install_bin "$WORK/pause" pause
say "Kubernetes $KUBE_VERSION (${COMPONENTS[*]}, pause) installed in $DIR"
echo "$BIN"

#!/usr/bin/env bash
# Builds the Go and Java conformance apps into OUTDIR, idempotently; progress on stderr, nothing on
# stdout; fails loudly (non-zero, message on stderr).
#
#   OUTDIR/conform-go        go build of e2e/conformance/go (standard library only, CGO off)
#   OUTDIR/java/Conform.class  javac --release 17 of e2e/conformance/java/Conform.java
#
# Run them as `OUTDIR/conform-go server go-http --port P --conns N` and
# `java -cp OUTDIR/java Conform client java-threads --target IP:PORT --conns N`.
# Everything in OUTDIR is made readable (and the binary executable) by any user, so the apps can
# run as UID 1000; OUTDIR's parent folders must be searchable by that user too (warned about).
#
# Needs go (golang-go) and javac (openjdk-17-jdk-headless): scripts/install-apps.sh installs them.
# Go runs offline: GOPROXY=off, GOFLAGS=-mod=mod, GOTOOLCHAIN=local; its build cache is
# /var/cache/meshaccel/go-build ($MESHACCEL_CACHE/go-build), or OUTDIR/.go-build when that is not
# writable.
#
# Usage: e2e/conformance/build-apps.sh OUTDIR
set -euo pipefail
say() { echo "[build-apps] $*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1" || die "cannot create $1"
OUT=$(cd "$1" && pwd)

command -v go >/dev/null 2>&1 || die "go not found (run scripts/install-apps.sh)"
command -v javac >/dev/null 2>&1 || die "javac not found (run scripts/install-apps.sh)"

# Go's caches: the project's cache folder when writable, OUTDIR otherwise.
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
if mkdir -p "$CACHE/go-build" 2>/dev/null && [ -w "$CACHE/go-build" ]; then
  GOBASE="$CACHE"
else
  GOBASE="$OUT/.go-build"
  mkdir -p "$GOBASE/go-build"
fi
export GOCACHE="$GOBASE/go-build"
export GOPATH="$GOBASE/gopath"
export GOPROXY=off GOFLAGS=-mod=mod GO111MODULE=on GOTOOLCHAIN=local GOSUMDB=off GOWORK=off
export CGO_ENABLED=0

say "go build ($(go version | awk '{print $3}')) -> $OUT/conform-go"
(cd "$HERE/go" && go build -trimpath -buildvcs=false -o "$OUT/conform-go.tmp" .) || die "go build failed"
mv -f "$OUT/conform-go.tmp" "$OUT/conform-go"

JAVA_SRC="$HERE/java/Conform.java"
mkdir -p "$OUT/java"
if [ "$OUT/java/Conform.class" -nt "$JAVA_SRC" ]; then
  say "javac: $OUT/java/Conform.class up to date"
else
  say "javac --release 17 ($(javac -version 2>&1)) -> $OUT/java"
  rm -rf "$OUT/java.tmp"
  mkdir -p "$OUT/java.tmp"
  javac --release 17 -Xlint:all -Werror -d "$OUT/java.tmp" "$JAVA_SRC" >&2 || die "javac failed"
  rm -rf "$OUT/java"
  mv "$OUT/java.tmp" "$OUT/java"
fi

chmod a+rx "$OUT" "$OUT/conform-go" "$OUT/java"
chmod -R a+rX "$OUT/java"
[ -x "$OUT/conform-go" ] && [ -f "$OUT/java/Conform.class" ] || die "outputs missing in $OUT"

# Every folder above OUTDIR must be searchable by the apps' user for them to run.
d="$OUT"
while [ "$d" != "/" ]; do
  d=$(dirname "$d")
  perms=$(stat -c %A "$d")
  [ "${perms:9:1}" = "x" ] || [ "${perms:9:1}" = "t" ] ||
    say "warning: $d is not searchable by other users (mode $perms): UID 1000 cannot reach $OUT"
done
say "ok: $OUT/conform-go, java -cp $OUT/java Conform"

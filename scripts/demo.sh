#!/usr/bin/env bash
# The demo: builds everything (release), starts a two-pod local mesh with Istio's capture rules
# and real Envoy sidecars (mTLS), runs the same HTTP load with acceleration off and on, prints the
# difference, and cleans up (also on Ctrl-C). Installs what is missing first. Needs root.
# Options go to the demo (e.g. --requests 50000 --size 4096); see `--help`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
eval "$(scripts/env.sh)"
scripts/install-envoy.sh >/dev/null
export MESHACCEL_FIXTURES=${MESHACCEL_FIXTURES:-$(cd "$ROOT/.." && pwd)/shared/fixtures}
echo "[demo] building (release)" >&2
cargo build --release --locked -p meshaccel -p meshaccel-e2e --bins
exec target/release/meshaccel-demo "$@"

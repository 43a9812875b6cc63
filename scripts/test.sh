#!/usr/bin/env bash
# Runs every meshaccel test on this machine: installs what is missing (scripts/env.sh), builds the
# workspace (eBPF included), then runs the unit tests and the root tests with real sockets, netns,
# cgroups, Istio's real iptables rules and the real kernel. Safe to rerun. Needs root.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
eval "$(scripts/env.sh)"
scripts/install-envoy.sh >/dev/null
scripts/install-apps.sh
scripts/install-cluster.sh
export MESHACCEL_KUBE_APISERVER=${MESHACCEL_KUBE_APISERVER:-$(scripts/install-kube.sh)}
export MESHACCEL_HELM=${MESHACCEL_HELM:-$(scripts/install-helm.sh)}
export MESHACCEL_FIXTURES=${MESHACCEL_FIXTURES:-$(cd "$ROOT/.." && pwd)/shared/fixtures}
[ -d "$MESHACCEL_FIXTURES" ] || { echo "[test] fixtures not found at $MESHACCEL_FIXTURES (set MESHACCEL_FIXTURES)" >&2; exit 1; }
echo "[test] building the workspace (eBPF programs included)" >&2
cargo build --workspace --exclude meshaccel-ebpf --bins --tests --locked
echo "[test] running the tests (root tests one at a time: they share the kernel)" >&2
cargo test --workspace --exclude meshaccel-ebpf --locked "$@" -- --test-threads=1

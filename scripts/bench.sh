#!/usr/bin/env bash
# The benchmarks: baseline and accelerated interleaved in one run, ratios with their spread
# (benches/, see its crate docs). Installs what is missing first (scripts/env.sh, Envoy), builds,
# runs, and cleans up after itself (also on Ctrl-C). Needs root.
#
#   sudo scripts/bench.sh            full mode: hop, mesh (unpinned, 1 and 16 connections), wrk
#                                    (wrk against nginx through the sidecars, 1 and 16
#                                    connections), sweep and cross-node (15–20 minutes on
#                                    2 vCPUs); results in benches/results/ (JSON, PNG,
#                                    performance.md)
#   sudo scripts/bench.sh scale      the scale curve (not in the default set): 100, 1k, 10k, 100k
#                                    held accelerated connections, ping-pong and connect-to-first-
#                                    byte latency and memory at each size (results/scale.*);
#                                    `--short scale`: 100 and 1k only
#   sudo scripts/bench.sh cluster    meshaccel on a real single-node Kubernetes (not in the
#                                    default set): label -> entries p50/p99 over 20 flips, pod
#                                    Ready -> entries, agent RSS and idle CPU (results/cluster.json)
#   sudo scripts/bench.sh --short    CI's short mode: short hop and mesh runs; exits 1 on a clear
#                                    inversion measured as a ratio in the same run (hop:
#                                    accelerated p50 not lower than baseline; mesh: accelerated
#                                    p50 worse than baseline beyond the run's noise), when
#                                    acceleration did not engage (> 0.5 TCP segments per request
#                                    accelerated), or below a floor every working build clears
#                                    (hop p50 ratio > 0.75, mesh requests/s ratio < 1.1)
#
# Options: --debug (use the debug build, e.g. the one scripts/test.sh just made; default: release),
# --out DIR (default benches/results; in --short mode a temporary directory),
# --wait-quiet SECONDS (first wait up to that long for the machine to be idle: under 6% of its
# CPU time busy over 5 s; other work on a 2-vCPU machine is noise), and bench names to run only
# some of them (hop, mesh, sweep, cross-node: the sweep's cells with the server on another node;
# scale and cluster: only when named). Every bench's own options are also read from MESHACCEL_*
# variables (see `target/release/<bench> --help`). Honours CARGO_TARGET_DIR.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

short=0 profile=release out="" wait_quiet=0 benches=()
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --debug) profile=debug ;;
    --out) out=$2; shift ;;
    --wait-quiet) wait_quiet=$2; shift ;;
    hop|mesh|wrk|sweep|cross-node|scale|cluster) benches+=("$1") ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "[bench] unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ ${#benches[@]} -eq 0 ]; then
  if [ $short = 1 ]; then benches=(hop mesh); else benches=(hop mesh wrk sweep cross-node); fi
fi

eval "$(scripts/env.sh)"
scripts/install-envoy.sh >/dev/null
# wrk and nginx from Debian (only these two, not the whole conformance suite's list).
if [[ " ${benches[*]} " == *" wrk "* ]]; then scripts/install-apps.sh nginx wrk; fi
if [[ " ${benches[*]} " == *" cluster "* ]]; then
  # The single-node cluster: Kubernetes binaries, containerd/runc/CNI, helm.
  scripts/install-cluster.sh
  export MESHACCEL_KUBE_APISERVER=${MESHACCEL_KUBE_APISERVER:-$(scripts/install-kube.sh)}
  export MESHACCEL_HELM=${MESHACCEL_HELM:-$(scripts/install-helm.sh)}
fi
if [ $profile = release ]; then
  echo "[bench] building (release)" >&2
  cargo build --release --locked -p meshaccel -p meshaccel-e2e -p meshaccel-benches --bins
  bin=${CARGO_TARGET_DIR:-target}/release
else
  echo "[bench] building (debug)" >&2
  # The same command as scripts/test.sh, so that right after it nothing is rebuilt.
  cargo build --workspace --exclude meshaccel-ebpf --bins --tests --locked
  bin=${CARGO_TARGET_DIR:-target}/debug
fi

tmp=""
if [ -z "$out" ]; then
  if [ $short = 1 ]; then
    tmp=$(mktemp -d /tmp/meshaccel-bench.XXXXXX)
    out=$tmp
  else
    out=benches/results
  fi
fi
cleanup() { if [ -n "$tmp" ]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT

# Share of the machine's CPU time in use over the next 5 seconds (/proc/stat), in percent.
busy_pct() {
  local a b c d e f g h t1 i1 t2 i2
  read -r _ a b c d e f g h _ < /proc/stat; t1=$((a+b+c+d+e+f+g+h)); i1=$((d+e))
  sleep 5
  read -r _ a b c d e f g h _ < /proc/stat; t2=$((a+b+c+d+e+f+g+h)); i2=$((d+e))
  echo $(( 100 * ((t2 - t1) - (i2 - i1)) / (t2 - t1 + 1) ))
}
if [ "$wait_quiet" -gt 0 ]; then
  end=$((SECONDS + wait_quiet))
  while [ $SECONDS -lt $end ]; do
    b=$(busy_pct)
    [ "$b" -lt 6 ] && break
    echo "[bench] waiting for a quiet machine ($b% busy)" >&2
  done
fi
b=$(busy_pct)
if [ "$b" -ge 10 ]; then
  echo "[bench] note: the machine is $b% busy with other work: that adds noise to the numbers" >&2
fi

export MESHACCEL_BENCH_OUT=$out
flags=()
[ $short = 1 ] && flags=(--short --check)
passed=0 failed=0 status=0
for b in "${benches[@]}"; do
  echo "[bench] $b" >&2
  rc=0
  case $b in
    # The sweep's cells with the server pod on another node (not this agent's workload).
    cross-node) "$bin/sweep" --name cross-node --paths remote || rc=$? ;;
    *) "$bin/$b" "${flags[@]}" || rc=$? ;;
  esac
  if [ $rc = 0 ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    [ $rc = 1 ] && echo "[bench] $b: inversion, no acceleration or gain below the floor (see INVERSION/GATE above)" >&2
    [ $rc -gt 1 ] && echo "[bench] $b: failed to run (exit $rc)" >&2
    status=1
  fi
done

if [ $short = 0 ] && [ $status = 0 ]; then
  cmd="sudo scripts/bench.sh"
  [ ${#benches[@]} -lt 5 ] && cmd="$cmd ${benches[*]}"
  MESHACCEL_BENCH_COMMAND=$cmd "$bin/report" --dir "$out"
fi
if [ $short = 1 ]; then
  echo "bench: $passed passed, $failed failed"
fi
exit $status

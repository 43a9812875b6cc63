#!/usr/bin/env bash
# Installs what meshaccel needs to build and test, idempotently, and prints the environment to use.
# Usage: eval "$(scripts/env.sh)"   (progress goes to stderr; only `export` lines go to stdout)
# Heavy builds are cached outside the repo under $MESHACCEL_CACHE (default /var/cache/meshaccel),
# keyed by version.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MESHACCEL_CACHE:-/var/cache/meshaccel}
TOOLCHAIN=$(tr -d '[:space:]' < "$ROOT/bpf-progs/TOOLCHAIN")
BPF_LINKER_VERSION=0.13.0
say() { echo "[env] $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "[env] meshaccel's setup and tests need root (BPF, netns, cgroups)" >&2; exit 1; }
mkdir -p "$CACHE"

# Debian packages: network tools for the test pods, bpftool to inspect the kernel.
need=()
for pair in iptables:iptables ip:iproute2 nsenter:util-linux bpftool:bpftool tcpdump:tcpdump \
            setpriv:util-linux curl:curl openssl:openssl; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# The pinned nightly with rust-src, for the eBPF crate.
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  say "installing Rust $TOOLCHAIN"
  rustup toolchain install "$TOOLCHAIN" --profile minimal -c rust-src >&2
fi
SYSROOT=$(rustup run "$TOOLCHAIN" rustc --print sysroot)
if [ ! -d "$SYSROOT/lib/rustlib/src/rust/library" ]; then
  say "adding rust-src to $TOOLCHAIN"
  rustup component add rust-src --toolchain "$TOOLCHAIN" >&2
fi

# bpf-linker built against that toolchain's own libLLVM (Debian's LLVM is too old).
LLVM_SO=$(ls "$SYSROOT"/lib/libLLVM.so.*-rust-* 2>/dev/null | head -n1)
[ -n "$LLVM_SO" ] || { echo "[env] no libLLVM in $SYSROOT/lib" >&2; exit 1; }
LLVM_MAJOR=$(basename "$LLVM_SO" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
RUSTC_HASH=$(rustup run "$TOOLCHAIN" rustc -vV | sed -n 's/^commit-hash: \(.\{9\}\).*/\1/p')
LINKER_DIR="$CACHE/bpf-linker-$BPF_LINKER_VERSION-$TOOLCHAIN-$RUSTC_HASH"
if [ ! -x "$LINKER_DIR/bin/bpf-linker" ]; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR of $TOOLCHAIN (about a minute)"
  mkdir -p "$LINKER_DIR/llvm/lib"
  ln -sf "$LLVM_SO" "$LINKER_DIR/llvm/lib/libLLVM.so"
  LLVM_PREFIX="$LINKER_DIR/llvm" RUSTUP_TOOLCHAIN="$TOOLCHAIN" \
    cargo install bpf-linker --version "$BPF_LINKER_VERSION" --locked --no-default-features \
      --features "llvm-$LLVM_MAJOR" --root "$LINKER_DIR" >&2
fi

echo "export PATH=\"$LINKER_DIR/bin:\$PATH\""
echo "export LD_LIBRARY_PATH=\"$SYSROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
say "ready: $TOOLCHAIN, bpf-linker $BPF_LINKER_VERSION"

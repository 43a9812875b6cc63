#!/usr/bin/env bash
# Installs the Debian packages the single-node cluster tests need, idempotently: containerd (its
# `ctr` client included), runc, the CNI plugins and debootstrap (for the base root filesystem of
# the test images, see e2e/src/image.rs). Prints nothing on stdout; progress goes to stderr.
#
# The tests start their own containerd with a private config, root, state and socket; nothing
# here starts or enables the system service (there is no init system in the test machines, and
# policy-rc.d keeps package scripts from starting services where one exists).
#
# Usage: scripts/install-cluster.sh
set -euo pipefail
say() { echo "[install-cluster] $*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (apt-get)"; exit 1; }

need=()
for pkg in containerd runc containernetworking-plugins debootstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  say "containerd, runc, containernetworking-plugins and debootstrap already installed"
  exit 0
fi
say "installing Debian packages: ${need[*]}"
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
say "installed: $(containerd --version 2>/dev/null | head -n1), $(runc --version 2>/dev/null | head -n1)"

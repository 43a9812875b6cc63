#!/usr/bin/env bash
# Installs, idempotently, what the application conformance suite (e2e/conformance/) needs to build
# and run its apps, from Debian's packages:
#   golang-go               go (bookworm: 1.19) for e2e/conformance/go (standard library only)
#   openjdk-17-jdk-headless javac/java 17 for e2e/conformance/java
#   haproxy                 haproxy 2.6, run with e2e/conformance/haproxy/haproxy.cfg.tmpl
#   nginx                   nginx 1.22, run with e2e/conformance/nginx/nginx.conf.tmpl
#   gcc                     the C apps (e2e/conformance/c/)
#   python3                 Debian's /usr/bin/python3 for the Python apps (not pyenv's)
#   wrk                     wrk 4.1, the off-the-shelf HTTP load of the wrk benchmark (benches/)
# Only missing packages are installed (`apt-get update -qq` runs only then). Progress goes to
# stderr, nothing to stdout; exits non-zero with a message when something cannot be installed.
#
# Usage: scripts/install-apps.sh [PACKAGE…]   (default: all of them; named: only those, e.g.
#        `scripts/install-apps.sh nginx wrk` for the wrk benchmark, without the JDK and Go)
set -euo pipefail
say() { echo "[install-apps] $*" >&2; }
die() { say "error: $*"; exit 1; }

PACKAGES=(golang-go openjdk-17-jdk-headless haproxy nginx gcc python3 wrk)
# What each package must provide once installed.
declare -A PROVIDES=(
  [golang-go]=/usr/bin/go
  [openjdk-17-jdk-headless]=/usr/lib/jvm/java-17-openjdk-amd64/bin/javac
  [haproxy]=/usr/sbin/haproxy
  [nginx]=/usr/sbin/nginx
  [gcc]=/usr/bin/gcc
  [python3]=/usr/bin/python3
  [wrk]=/usr/bin/wrk
)
# The JDK's folder is named after the architecture.
if command -v dpkg >/dev/null 2>&1; then
  PROVIDES[openjdk-17-jdk-headless]=/usr/lib/jvm/java-17-openjdk-$(dpkg --print-architecture)/bin/javac
fi

if [ $# -gt 0 ]; then
  for p in "$@"; do
    [ -n "${PROVIDES[$p]:-}" ] || die "unknown package $p (known: ${PACKAGES[*]})"
  done
  PACKAGES=("$@")
fi

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
  die "this is not a Debian-like system (no dpkg-query/apt-get): install ${PACKAGES[*]} by hand"

missing=()
for p in "${PACKAGES[@]}"; do
  if installed "$p" && [ -x "${PROVIDES[$p]}" ]; then
    say "$p: installed"
  else
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The packages must not start their services (nginx would listen on the host's port 80):
  # Debian's policy-rc.d hook refuses every start during this install, and goes afterwards.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    die "apt-get install ${missing[*]} failed"
  for p in "${missing[@]}"; do
    installed "$p" || die "$p is still not installed"
    [ -x "${PROVIDES[$p]}" ] || die "$p is installed but ${PROVIDES[$p]} is missing"
  done
fi

# Only some packages named: their checks above are all.
[ $# -gt 0 ] && { say "ok: $*"; exit 0; }

# The tools the suite calls by name must be these on PATH.
for t in go javac java haproxy nginx gcc wrk; do
  command -v "$t" >/dev/null 2>&1 || die "$t not on PATH after installing"
done
javac -version 2>&1 | grep -q '^javac 17' ||
  say "warning: javac on PATH is $(javac -version 2>&1), not 17 (update-alternatives --config javac)"
say "ok: $(go version | awk '{print $3}'), $(javac -version 2>&1), $(haproxy -v | head -n1 | awk '{print $1, $3}'), $(nginx -v 2>&1 | sed 's/.*: //'), gcc $(gcc -dumpversion), $(/usr/bin/python3 --version)"

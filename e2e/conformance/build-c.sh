#!/usr/bin/env bash
# Builds the C conformance app into OUTDIR/conform-c, idempotently; progress on stderr, nothing on
# stdout; fails loudly (non-zero, message on stderr).
#
#   OUTDIR/conform-c   gcc -std=gnu11 -O2 -Wall -Wextra -pthread of e2e/conformance/c/conform.c
#
# Run it as `OUTDIR/conform-c server MODE --port P --conns N` and
# `OUTDIR/conform-c client MODE --target IP:PORT --conns N` (modes: README.md). The binary is made
# readable and executable by any user, so it can run as UID 1000; OUTDIR's parent folders must be
# searchable by that user too (warned about). The Python app needs no build:
# `/usr/bin/python3 e2e/conformance/python/conform.py ...` (stdlib only).
#
# Needs gcc (Debian package gcc) and glibc >= 2.32 (strerrorname_np). CC overrides the compiler.
#
# Usage: e2e/conformance/build-c.sh OUTDIR
set -euo pipefail
say() { echo "[build-c] $*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC="$HERE/c/conform.c"
[ -f "$SRC" ] || die "missing $SRC"
mkdir -p "$1" || die "cannot create $1"
OUT=$(cd "$1" && pwd)
CC=${CC:-gcc}
command -v "$CC" >/dev/null 2>&1 || die "$CC not found (apt-get install gcc)"

BIN="$OUT/conform-c"
if [ -x "$BIN" ] && [ "$BIN" -nt "$SRC" ] && [ "$BIN" -nt "${BASH_SOURCE[0]}" ]; then
  say "$BIN up to date"
else
  TMP="$BIN.tmp.$$"
  trap 'rm -f "$TMP"' EXIT
  say "$CC ($("$CC" -dumpfullversion 2>/dev/null || "$CC" -dumpversion)) -> $BIN"
  "$CC" -std=gnu11 -O2 -Wall -Wextra -pthread -o "$TMP" "$SRC" >&2 || die "compiling $SRC failed"
  chmod 0755 "$TMP"
  mv -f "$TMP" "$BIN"
  trap - EXIT
fi

# Sanity: the binary runs and knows its modes (no arguments: usage on stderr, exit status 2).
set +e
"$BIN" >/dev/null 2>&1
rc=$?
set -e
[ "$rc" -eq 2 ] || die "$BIN does not run (exit status $rc without arguments, expected 2)"

# UID 1000 must be able to reach the binary.
d="$OUT"
while [ "$d" != "/" ]; do
  perm=$(stat -c %A "$d")
  [ "${perm:9:1}" = "x" ] || [ "${perm:9:1}" = "t" ] ||
    say "warning: $d is not searchable by other users; UID 1000 cannot run $BIN"
  d=$(dirname "$d")
done
say "done: $BIN"

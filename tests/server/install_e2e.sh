#!/usr/bin/env bash
# `cmake --install` into a temporary prefix (what `make install` runs): the server and the CLI
# land in bin/ and run from there, the default profiles in share/fibquant/profiles/ equal
# server/default-profiles/ and preload, the man pages are roff made from --help.
# Usage: install_e2e.sh <fibquant-server binary> <source dir>        (CTest passes both)
set -euo pipefail
server="${1:?usage: install_e2e.sh <fibquant-server> <source-dir>}"
src="${2:?usage: install_e2e.sh <fibquant-server> <source-dir>}"
build="$(cd "$(dirname "$server")/.." && pwd)"
prefix="$(mktemp -d "${TMPDIR:-/tmp}/fq-install.XXXXXX")"
trap 'rm -rf "$prefix"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >"$prefix.log" 2>&1 || { cat "$prefix.log" >&2; rm -f "$prefix.log"; fail "cmake --install"; }
rm -f "$prefix.log"
for f in bin/fibquant-server bin/fibquant share/man/man1/fibquant-server.1 share/man/man1/fibquant.1 \
  share/doc/fibquant/OPERATIONS.md; do
  [[ -e "$prefix/$f" ]] || fail "$f not installed"
done
# Output captured first: `--help | grep -q` let grep exit at the first match and the binary, still
# writing (slowly under ASan), died of SIGPIPE, which pipefail reported as a failure.
help_cli=$("$prefix/bin/fibquant" --help) || fail "installed fibquant --help exits non-zero"
grep -q "profile register" <<<"$help_cli" || fail "installed fibquant --help"
help_server=$("$prefix/bin/fibquant-server" --help) || fail "installed fibquant-server --help exits non-zero"
grep -q -- "--data-dir" <<<"$help_server" || fail "installed fibquant-server --help"
for f in "$src"/server/default-profiles/*.json; do
  cmp -s "$f" "$prefix/share/fibquant/profiles/$(basename "$f")" || fail "profile $(basename "$f") differs"
done
for m in fibquant fibquant-server; do
  page="$prefix/share/man/man1/$m.1"
  [[ "$(head -n 1 "$page")" == ".TH $m 1 "* ]] || fail "$m.1 has no .TH header"
  grep -q -- "--server\|--listen" "$page" || fail "$m.1 lacks the --help text"
  if command -v man >/dev/null 2>&1; then
    rendered=$(MANWIDTH=100 man -l "$page" 2>/dev/null) || true
    grep -q "$m" <<<"$rendered" || fail "man -l $m.1 does not render"
  fi
done
# The installed server starts with the installed profiles as its preload dir.
data="$prefix/data"
"$prefix/bin/fibquant-server" --listen=127.0.0.1:0 --metrics-listen= --data-dir="$data" \
  --preload-dir="$prefix/share/fibquant/profiles" --drain-seconds=2 >"$prefix/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
  grep -q "serving fibquant.v1.KvCompressionService" "$prefix/server.log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$prefix/server.log" >&2; fail "installed server exited"; }
  sleep 0.1
done
grep -q "preloaded 2 profile specs from $prefix/share/fibquant/profiles (2 newly registered" \
  "$prefix/server.log" || { kill -KILL "$pid"; cat "$prefix/server.log" >&2; fail "preload of the installed profiles"; }
kill -TERM "$pid"
wait "$pid" || fail "installed server did not exit 0 on SIGTERM"
echo "install_e2e: ok"

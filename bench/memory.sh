#!/usr/bin/env bash
# Resident memory through bursts of client connections: meshd with its default allocator (jemalloc with
# background purging) against the same code on the system allocator (glibc), in one run.
#
#   bash bench/memory.sh                      # 5,000 connections × 3 bursts; rewrites a section of docs/benchmarks.md
#   CONNECTIONS=2000 BURSTS=2 bash bench/memory.sh
#
# Each burst opens CONNECTIONS client connections at once, each with a request in flight to a backend that
# answers after 300 ms, reads every response, then closes them all; VmRSS is sampled at the peak and 1, 5 and
# 10 s after. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-5000}
BURSTS=${BURSTS:-3}
command -v python3 >/dev/null || {
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
}
# The client and the backend both hold CONNECTIONS sockets.
ulimit -n "$(ulimit -Hn)"

cargo build --release --bin meshd >/dev/null
CARGO_TARGET_DIR=target/bench-system cargo build --release --bin meshd --no-default-features >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/memory.py "$CONNECTIONS" "$BURSTS" \
  jemalloc=target/release/meshd glibc=target/bench-system/release/meshd >"$work/table.md"
cat "$work/table.md"

{
  echo "<!-- memory-bench:start (written by bench/memory.sh) -->"
  echo "## Memory after bursts of connections"
  echo
  echo "\`bash bench/memory.sh\` on $(date +%F), $(nproc) cores: $BURSTS bursts of $CONNECTIONS client connections at once,"
  echo "each with a request in flight (backend answers after 300 ms), then all closed. \`jemalloc\` is the default"
  echo "build; \`glibc\` is the same code built with \`--no-default-features\`. Resident memory (VmRSS):"
  echo
  cat "$work/table.md"
  echo "<!-- memory-bench:end -->"
} >"$work/section.md"

doc=docs/benchmarks.md
if grep -q '<!-- memory-bench:start' "$doc"; then
  awk -v section="$work/section.md" '
    /<!-- memory-bench:start/ { while ((getline line < section) > 0) print line; skip = 1; next }
    /<!-- memory-bench:end -->/ { skip = 0; next }
    !skip { print }
  ' "$doc" >"$work/doc.md"
  cp "$work/doc.md" "$doc"
else
  { echo; cat "$work/section.md"; } >>"$doc"
fi
echo "wrote $doc"

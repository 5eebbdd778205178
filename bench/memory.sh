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
. bench/lib.sh
bench_need python3:python3
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

bench_section memory-bench "$work/section.md"
echo "wrote docs/benchmarks.md"

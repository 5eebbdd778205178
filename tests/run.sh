#!/usr/bin/env bash
# The test command: installs what the tests need (idempotently), then runs the whole suite.
#   bash tests/run.sh            # everything
#   bash tests/run.sh -E 'test(drain)'   # extra arguments go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/tools"
mkdir -p "$tools"

# promtool, to check a real /metrics scrape: Debian's prometheus package, unpacked locally (no daemon).
promtool="$tools/prometheus/usr/bin/promtool"
if [ ! -x "$promtool" ]; then
  if ! command -v apt-get >/dev/null; then
    echo "tests/run.sh: promtool is needed and apt-get is not available; set PROMTOOL=/path/to/promtool" >&2
    exit 1
  fi
  (
    cd "$tools"
    apt-get update -qq >/dev/null || true
    apt-get download prometheus >/dev/null
    dpkg -x prometheus_*.deb prometheus
    rm -f prometheus_*.deb
  )
fi
export PROMTOOL="${PROMTOOL:-$promtool}"
"$PROMTOOL" --version >/dev/null

# cargo-nextest runs each test in its own process.
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

cargo nextest run --all-targets --no-fail-fast "$@"

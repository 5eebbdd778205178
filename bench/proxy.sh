#!/usr/bin/env bash
# Proxy overhead: the same backend reached directly, through meshd, through nginx and through HAProxy, in one run.
#
#   bash bench/proxy.sh            # wall-clock (wrk) and CPU cost (callgrind); rewrites a section of docs/benchmarks.md
#   ROUNDS=5 DURATION=10 bash bench/proxy.sh
#   BASELINE=/path/to/older/meshd bash bench/proxy.sh   # also measures that binary, in the same run (the "before")
#
# Wall-clock: wrk, 1 thread, 32 keep-alive connections, DURATION seconds per target, ROUNDS rounds interleaved
# (direct, meshd, nginx, haproxy, direct, …); the median of the rounds is reported. On a shared 2-core machine
# the load generator, the proxy and the backend compete for CPU, so compare the ratios, not the absolute numbers.
# CPU cost: meshd under callgrind serving N and 2N keep-alive requests; (Ir(2N) − Ir(N)) / N is the instruction
# count per request with startup subtracted. The median of CG_ROUNDS rounds is reported: worker-thread scheduling
# moves single runs by a few per cent.
#
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CG_REQUESTS=${CG_REQUESTS:-2000}
CG_ROUNDS=${CG_ROUNDS:-3}
BACKEND_PORT=18080 MESHD_PORT=18140 MESHD_ADMIN=18990 MESHD_INBOUND=18143 NGINX_PORT=18081 HAPROXY_PORT=18082

. bench/lib.sh
bench_need wrk:wrk nginx:nginx-light haproxy:haproxy valgrind:valgrind ab:apache2-utils
bench_start

# The backend: nginx answering a fixed 2-byte body, keep-alive without a request limit.
cat >"$work/backend.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend.err;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "ok"; } }
}
EOF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

# nginx as a reverse proxy with pooled upstream connections.
cat >"$work/proxy.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/proxy.pid;
error_log $work/proxy.err;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream bench { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://bench; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:$BACKEND_PORT
EOF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

# meshd with its default policies (p2c-ewma, breaker, retry budget) in front of the same backend.
RUST_LOG=warn "$MESHD" dev --service bench=127.0.0.1:$BACKEND_PORT --listen 127.0.0.1:$MESHD_PORT \
  --admin 127.0.0.1:$MESHD_ADMIN --inbound 127.0.0.1:$MESHD_INBOUND >"$work/meshd.out" 2>&1 & pids+=($!)

for port in $BACKEND_PORT $NGINX_PORT $HAPROXY_PORT $MESHD_PORT; do
  for _ in $(seq 100); do
    curl -s -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" && break
    sleep 0.05
  done
done

declare -A rps lat50 lat99
targets=(direct meshd nginx haproxy)
port_of() { case $1 in direct) echo $BACKEND_PORT;; meshd) echo $MESHD_PORT;; nginx) echo $NGINX_PORT;; haproxy) echo $HAPROXY_PORT;; esac; }
# wrk prints latency as e.g. 310.00us / 1.20ms / 1.02s: convert to microseconds.
to_us() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); print v } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v*1000 } else { sub(/s$/,"",v); print v*1000000 } }'; }
for round in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    out=$(wrk -t1 -c32 -d"${DURATION}s" --latency -H 'Host: bench' "http://127.0.0.1:$(port_of "$t")/")
    rps[$t]+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "
    lat50[$t]+="$(echo "$out" | awk '$1=="50%" {print $2}' | to_us) "
    lat99[$t]+="$(echo "$out" | awk '$1=="99%" {print $2}' | to_us) "
    echo "round $round $t: $(echo "$out" | awk '/Requests\/sec/ {print $2}') req/s" >&2
  done
done

# CPU cost per request under callgrind.
instructions() {
  local n=$1 bin=${2:-$MESHD} port=18240 admin=18991
  local out="$work/callgrind.$n.$(basename "$(dirname "$bin")")"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" dev \
    --service bench=127.0.0.1:$BACKEND_PORT --listen 127.0.0.1:$port --admin 127.0.0.1:$admin \
    --inbound 127.0.0.1:18244 >/dev/null 2>"$work/valgrind.$n.err" &
  local pid=$!
  for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$admin/ready" && break; sleep 0.1; done
  if [ "$n" -gt 0 ]; then ab -q -k -n "$n" -c 1 -H 'Host: bench' "http://127.0.0.1:$port/" >/dev/null; fi
  kill -TERM "$pid"; wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}
# Per request: (Ir(2N) − Ir(N)) / N. The runtime's two worker threads park and steal differently from run to
# run, which moves the figure by a few per cent: CG_ROUNDS rounds, interleaved with the baseline's, and the
# median is reported with the range.
per_request() {
  local bin=$1 one two
  one=$(instructions "$CG_REQUESTS" "$bin")
  two=$(instructions $((CG_REQUESTS * 2)) "$bin")
  echo $(( (two - one) / CG_REQUESTS ))
}
base=$(instructions 10)
ours=() theirs=()
for _ in $(seq "$CG_ROUNDS"); do
  ours+=("$(per_request "$MESHD")")
  if [ -n "${BASELINE:-}" ]; then theirs+=("$(per_request "$BASELINE")"); fi
done
per_request=$(echo "${ours[*]}" | median)
per_request_range=$(echo "${ours[*]}" | range)
baseline_line=""
if [ -n "${BASELINE:-}" ]; then
  b_per=$(echo "${theirs[*]}" | median)
  b_range=$(echo "${theirs[*]}" | range)
  baseline_line="Baseline in the same run, rounds interleaved (${BASELINE_NAME:-$BASELINE}): **$b_per** instructions per request (range $b_range); this build: $per_request ($(awk -v a="$per_request" -v b="$b_per" 'BEGIN { printf "%+.1f %%", (a - b) * 100 / b }'))."
fi

host_cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
  echo "<!-- proxy-bench:start (written by bench/proxy.sh) -->"
  echo "## Proxy overhead"
  echo
  echo "\`bash bench/proxy.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores ($host_cpu); backend: nginx returning a 2-byte body."
  echo "wrk: 1 thread, 32 keep-alive connections, ${DURATION}s per target, median of $ROUNDS interleaved rounds."
  echo "All processes share the same $(nproc) cores: compare ratios, not absolute numbers."
  echo
  echo "| target | req/s (median) | vs direct | p50 latency | p99 latency |"
  echo "|---|---|---|---|---|"
  d=$(echo "${rps[direct]}" | median)
  for t in "${targets[@]}"; do
    r=$(echo "${rps[$t]}" | median)
    p50=$(echo "${lat50[$t]}" | median)
    p99=$(echo "${lat99[$t]}" | median)
    printf '| %s | %.0f | %.2f | %.0f µs | %.0f µs |\n' "$t" "$r" "$(echo "$r $d" | awk '{print $1/$2}')" "$p50" "$p99"
  done
  echo
  echo "CPU cost of meshd (callgrind, one keep-alive client, default policies): **$per_request instructions per"
  echo "request** (median of $CG_ROUNDS rounds, range $per_request_range) — (Ir after $((CG_REQUESTS * 2)) requests − Ir after $CG_REQUESTS requests) / $CG_REQUESTS, startup subtracted"
  echo "(a run with 10 requests took $base instructions in all)."
  if [ -n "$baseline_line" ]; then echo; echo "$baseline_line"; fi
  echo "<!-- proxy-bench:end -->"
} >"$work/section.md"

bench_section proxy-bench "$work/section.md"
cat "$work/section.md"

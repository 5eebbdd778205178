#!/usr/bin/env bash
# What tracing costs: instructions per request (callgrind) with tracing off, with a collector but every trace
# sampled out (context handling only), and with every request sampled and exported to a Zipkin collector.
#
#   bash bench/tracing.sh                  # rewrites the "Tracing cost" section of docs/benchmarks.md
#   CG_REQUESTS=4000 CG_ROUNDS=5 bash bench/tracing.sh
#   BASELINE=/path/to/meshd-before-tracing bash bench/tracing.sh   # also "tracing off" against a build without it
#
# Method as in bench/run's callgrind phase: meshd under callgrind serving N and 2N keep-alive requests from ab (one client);
# (Ir(2N) − Ir(N)) / N is the count per request with startup subtracted; CG_ROUNDS rounds, the three setups
# interleaved, median and range reported. The backend and the collector are nginx (the collector answers 202
# to every POST and keeps nothing). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

CG_REQUESTS=${CG_REQUESTS:-2000}
CG_ROUNDS=${CG_ROUNDS:-3}
BACKEND_PORT=18380 COLLECTOR_PORT=18411 PORT=18340 ADMIN=18391 INBOUND=18344

. bench/lib.sh
bench_need nginx:nginx-light valgrind:valgrind ab:apache2-utils
bench_start

cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_buffer_size 1m;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:$COLLECTOR_PORT; location / { return 202; } }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$BACKEND_PORT/" && break; sleep 0.1; done

config() { # name, extra TOML
  cat >"$work/$1.toml" <<TOML
[node]
name = "bench"
drain_timeout = "1s"
[outbound]
listen = ["127.0.0.1:$PORT"]
[inbound]
listen = "127.0.0.1:$INBOUND"
insecure_plaintext = true
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
level = "warn"
[discovery.docker]
enabled = false
[[discovery.static]]
service = "bench"
endpoints = ["127.0.0.1:$BACKEND_PORT"]
$2
TOML
}
collector="zipkin = \"http://127.0.0.1:$COLLECTOR_PORT/api/v2/spans\""
config off ""
config unsampled "[tracing]
sample_rate = 0.0
$collector"
config sampled "[tracing]
sample_rate = 1.0
$collector"


instructions() { # setup, requests
  local out="$work/callgrind.$1.$2" bin=$MESHD config=$1
  if [ "$1" = baseline ]; then bin=$BASELINE config=off; fi
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run --config "$work/$config.toml" \
    >/dev/null 2>"$work/valgrind.$1.err" &
  local pid=$!
  for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/ready" && break; sleep 0.1; done
  ab -q -k -n "$2" -c 1 -H 'Host: bench' "http://127.0.0.1:$PORT/" >/dev/null
  # The exporter sends a batch every second: let the last one go out before the drain.
  sleep 2
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}
per_request() {
  local one two
  one=$(instructions "$1" "$CG_REQUESTS")
  two=$(instructions "$1" $((CG_REQUESTS * 2)))
  echo $(((two - one) / CG_REQUESTS))
}

declare -A runs
setups=(off unsampled sampled)
if [ -n "${BASELINE:-}" ]; then setups=(baseline "${setups[@]}"); fi
for _ in $(seq "$CG_ROUNDS"); do
  for s in "${setups[@]}"; do runs[$s]+="$(per_request "$s") "; done
done
off=$(echo "${runs[off]}" | median)
{
  echo "<!-- tracing-bench:start (written by bench/tracing.sh) -->"
  echo "## Tracing cost"
  echo
  echo "\`bash bench/tracing.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores: instructions per request under callgrind"
  echo "(one keep-alive client, ab; (Ir after $((CG_REQUESTS * 2)) requests − Ir after $CG_REQUESTS) / $CG_REQUESTS), median of"
  echo "$CG_ROUNDS interleaved rounds. The collector is nginx answering 202."
  echo
  echo "| setup | instructions per request | range | vs tracing off |"
  echo "|---|---|---|---|"
  for s in "${setups[@]}"; do
    m=$(echo "${runs[$s]}" | median)
    r=$(echo "${runs[$s]}" | range)
    case $s in
      baseline) label="a build from before tracing existed (${BASELINE_NAME:-$BASELINE}), same config as off" ;;
      off) label="tracing off (no collector)" ;;
      unsampled) label="collector set, sample_rate = 0 (context read and written, no span)" ;;
      sampled) label="sample_rate = 1.0, every request exported to Zipkin" ;;
    esac
    printf '| %s | %s | %s | %s |\n' "$label" "$m" "$r" "$(awk -v a="$m" -v b="$off" 'BEGIN { printf "%+.1f %%", (a - b) * 100 / b }')"
  done
  echo "<!-- tracing-bench:end -->"
} >"$work/section.md"

bench_section tracing-bench "$work/section.md"
cat "$work/section.md"

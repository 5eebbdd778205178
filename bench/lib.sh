# Shared by the bench scripts (sourced, not run): packages, the release build, a work directory cleaned up on
# exit with the processes the script started, medians and ranges, and the script's section of
# docs/benchmarks.md.

# bench_need CMD:PACKAGE...: installs the Debian packages whose command is missing.
bench_need() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# bench_start: builds meshd (MESHD), makes $work and kills every pid in $pids and removes $work on exit.
bench_start() {
  cargo build --release --bin meshd >/dev/null
  MESHD=target/release/meshd
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# The median and the range (min–max) of the numbers on stdin, separated by spaces or newlines.
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { printf "%s–%s", a[1], a[NR] }'; }

# bench_section NAME FILE: replaces the lines between `<!-- NAME:start` and `<!-- NAME:end` in
# docs/benchmarks.md with FILE (which holds both markers), or appends FILE when the section is new.
bench_section() {
  local name=$1 file=$2 doc=docs/benchmarks.md
  [ -f "$doc" ] || printf '# Benchmarks\n\nMeasured, never asserted in tests. Each section says how to reproduce it.\n\n' >"$doc"
  if grep -q "<!-- $name:start" "$doc"; then
    awk -v f="$file" -v start="<!-- $name:start" -v end="<!-- $name:end" '
      index($0, start) == 1 { while ((getline line < f) > 0) print line; skip = 1; next }
      index($0, end) == 1 { skip = 0; next }
      !skip { print }' "$doc" >"$doc.tmp"
    mv "$doc.tmp" "$doc"
  else
    { echo; cat "$file"; } >>"$doc"
  fi
}

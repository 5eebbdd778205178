#!/usr/bin/env bash
# Builds the compose demo's images from this repository alone (no registry is reachable or needed):
#   meshd:$MESHD_TAG        FROM scratch + the static meshd
#   meshd-demo:$MESHD_TAG   FROM scratch + the static meshd-demo (front and back replicas)
#   meshd-init:$MESHD_TAG   meshd + a static busybox, for the init service's script
# MESHD_TAG defaults to "local", the tag docker-compose.yml and swarm-stack.yml use.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${MESHD_TAG:-local}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --target x86_64-unknown-linux-gnu --bin meshd --bin meshd-demo
bin="$target_dir/x86_64-unknown-linux-gnu/release"

# A static busybox from Debian's package, unpacked once into target/tools.
busybox="$target_dir/tools/busybox/bin/busybox"
if [ ! -x "$busybox" ]; then
  if ! command -v apt-get >/dev/null; then
    echo "compose/build.sh: the init image needs a static busybox: install Debian's busybox-static or put one at $busybox" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download busybox-static >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 || true; apt-get download busybox-static >/dev/null; }; } && dpkg -x busybox-static_*.deb root)
  mkdir -p "$(dirname "$busybox")"
  cp "$tmp/root/bin/busybox" "$busybox"
  rm -rf "$tmp"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
image() { # name dockerfile files...
  local name=$1 dockerfile=$2
  shift 2
  rm -rf "${ctx:?}"/*
  cp "$@" "$ctx/"
  DOCKER_BUILDKIT=0 docker build -q -t "$name:$tag" -f "compose/$dockerfile" --build-arg "MESHD_IMAGE=meshd:$tag" "$ctx" >/dev/null
  echo "built $name:$tag"
}
image meshd Dockerfile.meshd "$bin/meshd"
image meshd-demo Dockerfile.demo "$bin/meshd-demo"
image meshd-init Dockerfile.init "$busybox" compose/init.sh

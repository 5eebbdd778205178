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

# Docker tests (tests/docker.rs) run against the real engine with their own image: a static
# meshd-demo in a FROM scratch image (no registry is needed). Built once per run under a per-run tag;
# the image and anything left labelled with this run's id are removed on exit.
if ! docker version >/dev/null 2>&1; then
  echo "tests/run.sh: the Docker tests need a reachable Docker engine (docker version failed)" >&2
  exit 1
fi
export MESHD_TEST_RUN="r$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
export MESHD_TEST_IMAGE="meshd-test-backend:$MESHD_TEST_RUN"
export MESHD_COMPOSE_TAG="$MESHD_TEST_RUN"
cleanup_docker() {
  local ids
  ids=$(docker ps -aq --filter "label=meshd-test-run=$MESHD_TEST_RUN" 2>/dev/null || true)
  if [ -n "$ids" ]; then docker rm -f -v $ids >/dev/null 2>&1 || true; fi
  ids=$(docker network ls -q --filter "label=meshd-test-run=$MESHD_TEST_RUN" 2>/dev/null || true)
  if [ -n "$ids" ]; then docker network rm $ids >/dev/null 2>&1 || echo "tests/run.sh: could not remove test networks $ids" >&2; fi
  docker rmi "$MESHD_TEST_IMAGE" >/dev/null 2>&1 || true
  for image in meshd meshd-demo meshd-init; do docker rmi "$image:$MESHD_COMPOSE_TAG" >/dev/null 2>&1 || true; done
}
trap cleanup_docker EXIT
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --target x86_64-unknown-linux-gnu --bin meshd-demo
image_ctx=$(mktemp -d)
cp "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/meshd-demo" "$image_ctx/"
docker build -q -t "$MESHD_TEST_IMAGE" -f tests/docker/Dockerfile "$image_ctx" >/dev/null
rm -rf "$image_ctx"

# The compose demo's images (tests/compose.rs), under this run's tag.
export MESHD_COMPOSE_TAG="$MESHD_TEST_RUN"
MESHD_TAG="$MESHD_COMPOSE_TAG" bash compose/build.sh

# Host packaging (tests/hosts.rs): Ansible and ansible-lint in a virtualenv cached in ~/.cache/meshd, and
# debootstrap for the systemd hosts' root filesystem (tests/hosts/rootfs.sh builds and caches it on first use).
bash tests/hosts/ansible-venv.sh >/dev/null
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq debootstrap >/dev/null
fi

cargo nextest run --all-targets --no-fail-fast "$@"

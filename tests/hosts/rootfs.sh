#!/usr/bin/env bash
# The "VPS node" image of tests/hosts.rs: a Debian 12 (bookworm) root filesystem that boots systemd as PID 1,
# made with debootstrap from Debian's packages and loaded with `docker import` (no registry is needed).
#   bash tests/hosts/rootfs.sh IMAGE    # e.g. meshd-vps:bookworm
# The tarball is cached in ~/.cache/meshd (MESHD_CACHE) under a hash of this script, so a change here builds a
# new one; the import is skipped when IMAGE exists. Needs root (debootstrap) the first time.
set -euo pipefail
image="${1:?usage: tests/hosts/rootfs.sh IMAGE}"
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "rootfs: $image exists"
  exit 0
fi

cache="${MESHD_CACHE:-$HOME/.cache/meshd}"
hash=$(sha256sum "$self" | cut -c1-16)
tarball="$cache/rootfs-bookworm-$hash.tar"
packages=systemd,systemd-sysv,dbus,python3,ca-certificates,iproute2,curl,procps

if [ ! -s "$tarball" ]; then
  mkdir -p "$cache"
  if ! command -v debootstrap >/dev/null; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  # The mirror this machine's apt uses (deb822 sources first, then the one-line format).
  mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  fi
  mirror="${MESHD_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
  work=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  echo "rootfs: debootstrap bookworm from $mirror (a few minutes, once)"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  }

  # A container boots nothing that needs real hardware or a console; these only fail or wait there.
  for unit in getty@tty1.service console-getty.service systemd-udevd.service systemd-udev-trigger.service \
    systemd-modules-load.service systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-fs-fuse-connections.mount systemd-firstboot.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
  # Every container gets its own machine id at boot, not one baked into the image.
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  # The journal stays in memory: the containers are thrown away.
  mkdir -p "$root/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/volatile.conf"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*

  tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$tarball"
  # Older tarballs of this script are stale.
  find "$cache" -maxdepth 1 -name 'rootfs-bookworm-*.tar' ! -name "$(basename "$tarball")" -delete
fi

docker import \
  --change 'ENV container=docker' \
  --change 'CMD ["/sbin/init"]' \
  "$tarball" "$image" >/dev/null
echo "rootfs: imported $image from $tarball"

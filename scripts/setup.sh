#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine lacks to build, run and test iofilterfs.
# Idempotent: packages already present are not touched; apt runs only when one is missing.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config
  libfuse3-dev fuse3 libssl-dev zlib1g-dev libzstd-dev libyaml-cpp-dev libcli11-dev libspdlog-dev catch2
  # test clients and tools
  fio qemu-utils attr util-linux xxd procps groff-base man-db systemd
  # benchmark peer (qemu-storage-daemon) and the tools later filter tests drive
  qemu-system-common nbdkit cryptsetup-bin tmux
  # nbdfuse (in libnbd-bin): the benchmarks put nbdkit's luks and cache filters behind it
  libnbd-bin
  # replicate filter: NBD targets through libnbd
  libnbd-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi


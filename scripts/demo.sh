#!/usr/bin/env bash
# The main job on an embedded default: builds iofilterfs, creates a demo datastore with a sample
# qcow2 image, mounts it, writes and reads the image through the mount as a hypervisor would,
# shows the disk's status and statistics, and unmounts.
#   scripts/demo.sh          run the demo and unmount
#   scripts/demo.sh --keep   leave the datastore mounted and print how to use and stop it
# IOFILTERFS_DEMO_DIR chooses where the demo datastore lives (default /var/tmp/iofilterfs-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
keep=0
[ "${1:-}" = "--keep" ] && keep=1

bash scripts/setup.sh
bash scripts/build.sh build >/dev/null
bin=$repo/build/iofilterfs

demo=${IOFILTERFS_DEMO_DIR:-/var/tmp/iofilterfs-demo}
backing=$demo/datastore
mnt=$demo/mnt
log=$demo/iofilterfs.log
if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -u "$mnt"; fi
mkdir -p "$backing/vm1" "$mnt"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "demo datastore in $backing"
[ -f "$backing/vm1/disk.qcow2" ] || qemu-img create -q -f qcow2 "$backing/vm1/disk.qcow2" 1G
printf 'name=vm1\nmemory=2G\ndisk=vm1/disk.qcow2\n' > "$backing/vm1/vm1.conf"
ls -l "$backing/vm1"

step "mount: iofilterfs $backing $mnt"
"$bin" "$backing" "$mnt" -f >"$log" 2>&1 &
pid=$!
cleanup() {
  if [ "$keep" = 0 ]; then
    mountpoint -q "$mnt" && fusermount3 -u "$mnt"
    wait "$pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
mountpoint -q "$mnt" || { cat "$log"; exit 1; }
findmnt "$mnt"

step "write 64 MiB through the mount with O_DIRECT (qemu-io -t none, as QEMU cache=none)"
qemu-io -t none -f qcow2 -c 'write -P 0xa5 0 32M' -c 'aio_write -P 0x5a 512M 32M' -c aio_flush "$mnt/vm1/disk.qcow2"

step "read it back and verify the patterns"
qemu-io -t none -f qcow2 -c 'read -P 0xa5 0 32M' -c 'read -P 0x5a 512M 32M' "$mnt/vm1/disk.qcow2"
qemu-img check "$mnt/vm1/disk.qcow2"

step "the disk's status and statistics (held open by a reader meanwhile)"
exec 3<"$mnt/vm1/disk.qcow2"
dd if="$mnt/vm1/disk.qcow2" of=/dev/null bs=1M count=16 iflag=direct status=none
getfattr --only-values -n user.iofilter.status "$mnt" | python3 -m json.tool
for name in state policy chain dirty; do
  printf 'user.iofilter.%s = %s\n' "$name" "$(getfattr --only-values -n "user.iofilter.$name" "$mnt/vm1/disk.qcow2")"
done
getfattr --only-values -n user.iofilter.stats "$mnt/vm1/disk.qcow2" | python3 -m json.tool
exec 3<&-

step "daemon log"
cat "$log"

if [ "$keep" = 1 ]; then
  cat <<TXT

The datastore stays mounted at $mnt (daemon PID $pid, log $log).
  qemu-img info $mnt/vm1/disk.qcow2
  getfattr -d -m user.iofilter $mnt
Stop it with:  fusermount3 -u $mnt
TXT
else
  step "unmount"
  fusermount3 -u "$mnt"
  wait "$pid" && echo "unmounted cleanly"
fi

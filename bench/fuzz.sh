#!/usr/bin/env bash
# Fuzzes the format parsers for a fixed budget (not in CI):  bench/fuzz.sh [SECONDS_EACH]
# Builds build-fuzz with clang's libFuzzer (fuzz/), seeds each corpus with small images made by
# qemu-img, and runs qcow2_fuzz and vmdk_fuzz. Crashes land in build-fuzz/crashes/; add each
# one to tests/fuzz_regressions/<format>/ (replayed by the unit tests) once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-60}
command -v clang++ >/dev/null || { echo "fuzz: clang++ is needed (libFuzzer)"; exit 2; }
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DIOFILTERFS_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j2 >/dev/null
seeds=build-fuzz/seeds
rm -rf "$seeds" && mkdir -p "$seeds/qcow2" "$seeds/vmdk" build-fuzz/crashes
for o in compat=0.10 compat=1.1,cluster_size=4k compat=1.1,extended_l2=on compat=1.1,cluster_size=512,refcount_bits=1; do
  f="$seeds/qcow2/${o//[=,]/_}.qcow2"
  qemu-img create -q -f qcow2 -o "$o" "$f" 4M
  qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'write -z 1M 64k' -c 'write -P 0x22 3M 5k' "$f" >/dev/null
done
# A dirty image (lazy refcounts, qemu-io killed): the fuzzer's writes run the repair.
f="$seeds/qcow2/dirty_lazy.qcow2"
qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4k "$f" 4M
qemu-img snapshot -c s "$f"
qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 8k' -c 'sigraise 9' "$f" >/dev/null 2>&1 || true
head -c 256k /dev/urandom > "$seeds/r.raw" && truncate -s 1M "$seeds/r.raw"
qemu-img convert -c -O qcow2 -o cluster_size=4k "$seeds/r.raw" "$seeds/qcow2/compressed.qcow2"
qemu-img snapshot -c s "$seeds/qcow2/compat_1.1_cluster_size_4k.qcow2"
qemu-img create -q -f vmdk "$seeds/vmdk/sparse.vmdk" 2M
qemu-io -f vmdk -c 'write -P 0x33 64k 70k' "$seeds/vmdk/sparse.vmdk" >/dev/null
qemu-img convert -O vmdk -o subformat=streamOptimized "$seeds/r.raw" "$seeds/vmdk/stream.vmdk"
qemu-img create -q -f vmdk -o subformat=monolithicFlat "$seeds/flat.vmdk" 1M
cp "$seeds/flat.vmdk" "$seeds/vmdk/descriptor.vmdk"
for t in qcow2 vmdk; do
  mkdir -p "build-fuzz/corpus/$t"
  echo "fuzz: ${t}_fuzz for ${budget}s"
  (cd build-fuzz/crashes && ../fuzz/${t}_fuzz -max_total_time="$budget" -rss_limit_mb=1024 -max_len=1048576 \
      -timeout=10 -print_final_stats=1 "../corpus/$t" "../seeds/$t" 2>&1 | tail -15)
done
ls -la build-fuzz/crashes

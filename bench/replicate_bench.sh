#!/usr/bin/env bash
# Replicate filter benchmark: ratios of medians of BENCH_REPEAT runs [3] (empty chain and filter
# runs alternate, so a noisy neighbour hits both alike) against the empty chain.
# Everything (backing, replica directory, journal) lives on a private tmpfs, so the figures are
# the filter's own cost, not a disk's:
#   1. 1 MiB sequential writes (libaio, direct, QD8): async replication to a directory target
#      vs the empty chain (target: >= 0.85x).
#   2. 4 KiB writes at QD1 (direct): median completion latency with sync replication to a
#      directory target vs the empty chain (target: <= 2.2x), and the same with retention: 1h
#      (the sync write path also appends each write to the history journal).
#   3. Lag under a sustained 100 MiB/s write stream (async): the replica_bytes of the dirty
#      xattr sampled every 0.5 s (max and mean), and how long the flush verb takes at the end.
#   4. 4 KiB random writes at QD32 (async): under a throttle whose limit is far above the rate
#      (iops: 10000000) vs without one. Under a throttle every write is carried on replicate's
#      own threads (src/offload.h) so that a held one keeps no FUSE worker: this is that
#      hand-off's cost, and the throttle's, when nothing is held (target: >= 0.85x).
#
#   bench/replicate_bench.sh            (~1 min)
#   bench/replicate_bench.sh --quick    (3 s runs)
#
# Environment: BENCH_REPEAT runs per figure [3], BENCH_RUNTIME seconds of the lag stream [10], BENCH_SIZE file size [1G],
# BENCH_SEQ_IO bytes of the sequential runs [4G], BENCH_LAT_IO bytes of the latency runs [128M],
# IOFILTERFS daemon binary [<repo>/build/iofilterfs]. Needs root (mounts a tmpfs).
# This is a benchmark, not a test: it exits 0 whether or not the targets are met.
set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-10}
REPEAT=${BENCH_REPEAT:-3}
SIZE=${BENCH_SIZE:-1G}
SEQ_IO=${BENCH_SEQ_IO:-4G}
LAT_IO=${BENCH_LAT_IO:-128M}
case "${1:-}" in
  --quick) RUNTIME=${BENCH_RUNTIME:-3}; SIZE=${BENCH_SIZE:-256M}; SEQ_IO=${BENCH_SEQ_IO:-1G}; LAT_IO=${BENCH_LAT_IO:-32M} ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "replicate_bench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac
IOFILTERFS=${IOFILTERFS:-$repo/build/iofilterfs}

work=$(mktemp -d /tmp/replicate-bench-XXXXXX)
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ]; then
    # A disk still held open makes the unmount fail: then the daemon is stopped instead of waited
    # for forever (SIGTERM: it drains, closes and unmounts).
    fusermount3 -u "$work/m" 2>/dev/null || kill "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
  fi
  mountpoint -q "$work/m" && fusermount3 -uz "$work/m"
  mountpoint -q "$work/fs" && umount "$work/fs"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$work/fs" "$work/m"
mount -t tmpfs -o size=12G tmpfs "$work/fs" || { echo "replicate_bench: cannot mount a tmpfs (root?)" >&2; exit 1; }
mkdir -p "$work/fs/b" "$work/fs/replica" "$work/fs/state"

cat > "$work/ds.yaml" <<YAML
datastore:
  images: ["*.raw"]
policies:
  empty:
  async:
    replicate: { target: $work/fs/replica, mode: async, journal: $work/fs/state, max-lag: 4GiB }
  sync:
    replicate: { target: $work/fs/replica, mode: sync, journal: $work/fs/state }
  syncret:
    replicate: { target: $work/fs/replica, mode: sync, journal: $work/fs/state, retention: 1h }
  carried:
    replicate: { target: $work/fs/replica, mode: async, journal: $work/fs/state, max-lag: 4GiB }
    throttle: { iops: 10000000 }
rules:
  - { match: "carried*", policy: carried }
  - { match: "empty*", policy: empty }
  - { match: "async*", policy: async }
  - { match: "syncret*", policy: syncret }
  - { match: "sync*", policy: sync }
YAML

"$IOFILTERFS" "$work/fs/b" "$work/m" -f --config "$work/ds.yaml" > "$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do mountpoint -q "$work/m" && break; sleep 0.1; done
mountpoint -q "$work/m" || { echo "replicate_bench: the daemon did not mount" >&2; cat "$work/daemon.log" >&2; exit 1; }

# fio_json NAME FILE ARGS...: runs fio, leaves its JSON in $work/NAME.json
fio_json() {
  local name=$1 file=$2
  shift 2
  # A fixed amount of I/O rather than --time_based: here fio stopped issuing writes partway
  # through time-based runs over a file through FUSE (with or without filters), which made
  # the averages meaningless.
  fio --name="$name" --filename="$file" --size="$SIZE" --ioengine=libaio --direct=1 \
    --output-format=json --output="$work/$name.json" "$@" > /dev/null 2>&1 ||
    { echo "replicate_bench: fio $name failed" >&2; exit 1; }
}
jq_bw() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["jobs"][0]["write"]["bw_bytes"]/1e6)' "$1"; }
jq_iops() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["jobs"][0]["write"]["iops"])' "$1"; }
jq_p50() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["jobs"][0]["write"]["clat_ns"]["percentile"]["50.000000"]/1e3)' "$1"; }
ratio() { python3 -c "import sys; print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))" "$1" "$2"; }
median() { python3 -c "import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
runs() { python3 -c "import sys; print(' '.join('%.0f' % float(x) if float(x) >= 100 else '%.1f' % float(x) for x in sys.argv[1:]))" "$@"; }

# Each image is created and laid out first (the replica gets the initial sync then), and held
# open so the measured runs see a steady state.
prepare() {
  truncate -s "$SIZE" "$work/m/$1"
  exec {hold}<>"$work/m/$1"
  eval "hold_$2=$hold"
  setfattr -n user.iofilter.flush -v 1 "$work/m/$1" 2>/dev/null
}
prepare empty.raw e
prepare async.raw a
prepare sync.raw s
prepare syncret.raw r
prepare carried.raw c

echo "replicate_bench: $(date -u +%F), $(nproc) CPUs, kernel $(uname -r), tmpfs, size $SIZE, seq $SEQ_IO, lat $LAT_IO, stream ${RUNTIME}s"
es=(); as=()
for r in $(seq "$REPEAT"); do
  fio_json seq-empty-$r "$work/m/empty.raw" --rw=write --bs=1M --iodepth=8 --io_size="$SEQ_IO"
  fio_json seq-async-$r "$work/m/async.raw" --rw=write --bs=1M --iodepth=8 --io_size="$SEQ_IO"
  es+=("$(jq_bw "$work/seq-empty-$r.json")"); as+=("$(jq_bw "$work/seq-async-$r.json")")
done
setfattr -n user.iofilter.flush -v 1 "$work/m/async.raw"
cmp -s "$work/fs/b/async.raw" "$work/fs/replica/async.raw" && same=equal || same=DIFFERENT
e=$(median "${es[@]}"); a=$(median "${as[@]}")
printf '1 MiB seq write QD8    empty %8.0f MB/s   async->dir %8.0f MB/s   ratio %s (target >= 0.85)   replica %s\n' \
  "$e" "$a" "$(ratio "$a" "$e")" "$same"
printf '                       runs: empty %s   async %s\n' "$(runs "${es[@]}")" "$(runs "${as[@]}")"
# How often a write had to copy old bytes first (journal by reference: the shipper was behind).
getfattr --only-values -n user.iofilter.stats "$work/m/async.raw" 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin); r = j["filters"]["replicate"]
if r.get("journal_by_reference"):
    print("                       by reference: %d of %d writes copied old bytes first (%.0f MiB), %.0f MiB journaled in all"
          % (r["preserves"], j["writes"], r["preserved_bytes"] / 2**20, (r["preserved_bytes"] + r["journaled_bytes"]) / 2**20))
' 2>/dev/null

es=(); ss=(); rs=()
for r in $(seq "$REPEAT"); do
  fio_json lat-empty-$r "$work/m/empty.raw" --rw=randwrite --bs=4k --iodepth=1 --io_size="$LAT_IO"
  fio_json lat-sync-$r "$work/m/sync.raw" --rw=randwrite --bs=4k --iodepth=1 --io_size="$LAT_IO"
  fio_json lat-syncret-$r "$work/m/syncret.raw" --rw=randwrite --bs=4k --iodepth=1 --io_size="$LAT_IO"
  es+=("$(jq_p50 "$work/lat-empty-$r.json")"); ss+=("$(jq_p50 "$work/lat-sync-$r.json")")
  rs+=("$(jq_p50 "$work/lat-syncret-$r.json")")
done
cmp -s "$work/fs/b/sync.raw" "$work/fs/replica/sync.raw" && same=equal || same=DIFFERENT
e=$(median "${es[@]}"); s=$(median "${ss[@]}")
printf '4 KiB write QD1 p50    empty %8.1f us     sync->dir  %8.1f us     ratio %s (target <= 2.2)    replica %s\n' \
  "$e" "$s" "$(ratio "$s" "$e")" "$same"
printf '                       runs: empty %s   sync %s\n' "$(runs "${es[@]}")" "$(runs "${ss[@]}")"
cmp -s "$work/fs/b/syncret.raw" "$work/fs/replica/syncret.raw" && same=equal || same=DIFFERENT
r=$(median "${rs[@]}")
printf '4 KiB write QD1 p50    empty %8.1f us     sync+ret   %8.1f us     ratio %s (target <= 2.2)    replica %s\n' \
  "$e" "$r" "$(ratio "$r" "$e")" "$same"
printf '                       runs: sync with retention %s\n' "$(runs "${rs[@]}")"

# Lag under a sustained 100 MiB/s stream.
samples="$work/lag.txt"
: > "$samples"
( fio --name=stream --filename="$work/m/async.raw" --size="$SIZE" --ioengine=libaio --direct=1 --rw=write --bs=1M \
    --iodepth=4 --rate=100m --time_based --runtime="$RUNTIME" > /dev/null 2>&1 ) &
fio_pid=$!
while kill -0 "$fio_pid" 2>/dev/null; do
  getfattr --only-values -n user.iofilter.dirty "$work/m/async.raw" 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["replica_bytes"])' >> "$samples"
  sleep 0.5
done
wait "$fio_pid"
t0=$(date +%s.%N)
setfattr -n user.iofilter.flush -v 1 "$work/m/async.raw"
t1=$(date +%s.%N)
cmp -s "$work/fs/b/async.raw" "$work/fs/replica/async.raw" && same=equal || same=DIFFERENT
python3 - "$samples" "$t0" "$t1" "$same" <<'PY'
import sys
v = [int(x) for x in open(sys.argv[1]) if x.strip()]
mx = max(v) if v else 0
mean = sum(v) / len(v) if v else 0
print("async lag at 100 MiB/s  samples %d   max %.1f MiB   mean %.1f MiB   flush after the stream %.3f s   replica %s"
      % (len(v), mx / 2**20, mean / 2**20, float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]))
PY
# Writes carried on replicate's threads under a throttle that holds none of them.
as=(); cs=()
for r in $(seq "$REPEAT"); do
  fio_json rnd-async-$r "$work/m/async.raw" --rw=randwrite --bs=4k --iodepth=32 --io_size="$LAT_IO"
  fio_json rnd-carried-$r "$work/m/carried.raw" --rw=randwrite --bs=4k --iodepth=32 --io_size="$LAT_IO"
  as+=("$(jq_iops "$work/rnd-async-$r.json")"); cs+=("$(jq_iops "$work/rnd-carried-$r.json")")
done
offloaded=$(getfattr --only-values -n user.iofilter.stats "$work/m/carried.raw" 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["filters"]["replicate"]["requests_offloaded"])' 2>/dev/null)
a=$(median "${as[@]}"); c=$(median "${cs[@]}")
printf '4 KiB rand write QD32   async %8.0f IOPS   +throttle  %8.0f IOPS   ratio %s (target >= 0.85)   carried %s
' \
  "$a" "$c" "$(ratio "$c" "$a")" "${offloaded:-?}"
printf '                       runs: async %s   async under a throttle %s
' "$(runs "${as[@]}")" "$(runs "${cs[@]}")"

exec {hold_e}>&- {hold_a}>&- {hold_s}>&- {hold_r}>&- {hold_c}>&-  # every disk closed, or the unmount is refused

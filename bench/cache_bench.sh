#!/usr/bin/env bash
# Cache filter benchmark (issue 7): one run, figures and ratios, not a test.
#
#   1. Warm random reads: a working set that fits in the cache, on a slow backing store (a
#      throttle filter below the cache limits it to BENCH_SLOW_IOPS), against the empty chain on
#      the same, unthrottled backing file. Target: cached-on-slow >= 0.9x empty-on-fast.
#   2. Write-back burst: 4 KiB random writes at QD32 into a write-back cache file on the slow
#      backing, against the slow backing's own IOPS (same throttle, no cache). Target: >= 5x
#      until the high watermark (the cache is sized so the run stays below it).
#   3. nbdkit's cache filter on the same slow backing (nbdkit file plugin, delay filter for
#      the slowness at the same per-request cost, cache filter, exported through nbdfuse),
#      warm random reads, for comparison.
#
#   bench/cache_bench.sh [--quick] [--runs N] [--reads-only]
#
# --runs N repeats the warm-read comparison (1.) N times, the empty and the cached run taking
# turns so that a change in the machine's load hits both alike, and prints every pair and the
# medians (a shared machine's figures move by 10% from one run to the next; quote medians).
# --reads-only stops after 1.
# With perf(1), part 1 also counts the daemon's futex calls per 1000 requests (a lock a thread
# had to wait for, or wake another from, costs one each): a figure the machine's load moves far
# less than IOPS, so it shows lock contention on the hit path when the ratio cannot.
#
# Environment: BENCH_RUNTIME [10] seconds per fio run, BENCH_SLOW_IOPS [500], BENCH_WSET [64M]
# working set, BENCH_DIR [/dev/shm] where the backing files and the cache files live (fast, so
# that "fast backing" means fast and the throttle alone makes the slow one slow),
# IOFILTERFS [<repo>/build/iofilterfs].
# Exits 0 whatever the figures; non-zero only when something failed to run. Everything it
# mounts or starts is undone on exit.
set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
runtime=${BENCH_RUNTIME:-10}
runs=1
reads_only=0
slow_iops=${BENCH_SLOW_IOPS:-500}
wset=${BENCH_WSET:-64M}
while [ $# -gt 0 ]; do
  a=$1
  shift
  case $a in
    --quick) runtime=3 ;;
    --reads-only) reads_only=1 ;;
    --runs) runs=${1:-}; shift; [[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "cache_bench: --runs takes a count" >&2; exit 2; } ;;
    --runs=*) runs=${a#--runs=}; [[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "cache_bench: --runs takes a count" >&2; exit 2; } ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "cache_bench: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done
bin=${IOFILTERFS:-$repo/build/iofilterfs}
[ -x "$bin" ] || { echo "cache_bench: no daemon at $bin (bash scripts/build.sh build)" >&2; exit 1; }

work=$(mktemp -d "${BENCH_DIR:-/dev/shm}/cache_bench.XXXXXX")
pids=()
cleanup() {
  for m in "$work/m" "$work/nbd"; do mountpoint -q "$m" 2>/dev/null && fusermount3 -u "$m" 2>/dev/null; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for m in "$work/m" "$work/nbd"; do mountpoint -q "$m" 2>/dev/null && fusermount3 -uz "$m" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$work/b" "$work/m" "$work/ssd" "$work/nbd"
for f in fast cached slow wb; do truncate -s 512M "$work/b/$f.raw"; done
# Real data in the working set (reads of holes would flatter every cache).
head -c "$wset" /dev/urandom > "$work/seed"
for f in fast cached; do dd if="$work/seed" of="$work/b/$f.raw" conv=notrunc status=none; done

cat > "$work/ds.yaml" <<YAML
datastore:
  images: ["*.raw"]
policies:
  empty:
  cached:
    cache: { memory: 256MiB, block: 64KiB, sequential-cutoff: 0 }
    throttle: { iops: $slow_iops }
  slow:
    throttle: { iops: $slow_iops }
  wb:
    cache: { mode: write-back, device: $work/ssd, size: 512MiB, block: 64KiB, sequential-cutoff: 0 }
    throttle: { iops: $slow_iops }
rules:
  - { match: "fast.raw", policy: empty }
  - { match: "cached.raw", policy: cached }
  - { match: "slow.raw", policy: slow }
  - { match: "wb.raw", policy: wb }
YAML
"$bin" "$work/b" "$work/m" -f --config "$work/ds.yaml" > "$work/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do mountpoint -q "$work/m" && break; sleep 0.1; done
mountpoint -q "$work/m" || { cat "$work/daemon.log"; exit 1; }

# fio: prints total IOPS of one job.
fio_iops() {  # file rw size depth
  fio --name=b --filename="$1" --rw="$2" --size="$3" --bs=4k --ioengine=libaio --direct=1 --iodepth="$4" \
      --time_based --runtime="$runtime" --randrepeat=0 --norandommap --output-format=json --output="$work/fio.json" \
      >/dev/null 2>&1 || { echo "cache_bench: fio failed on $1" >&2; cat "$work/fio.json" >&2; exit 1; }
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))' "$work/fio.json"
}
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
median() { python3 -c "import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:])))" "$@"; }
medianf() { python3 -c "import statistics,sys; print('%.2f' % statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
daemon=${pids[0]}
perf_ok=0
perf stat -e syscalls:sys_enter_futex -x, -p "$daemon" -- sleep 0.1 >/dev/null 2>&1 && perf_ok=1
# Like fio_iops, and sets FUTEX to the daemon's futex calls per 1000 requests of the run ("-"
# without perf).
fio_watched() {
  FUTEX=-
  local pp=""
  if [ "$perf_ok" = 1 ]; then
    perf stat -e syscalls:sys_enter_futex -x, -o "$work/perf.txt" -p "$daemon" -- sleep "$runtime" >/dev/null 2>&1 &
    pp=$!
  fi
  IOPS=$(fio_iops "$@") || exit 1
  if [ -n "$pp" ]; then
    wait "$pp"
    FUTEX=$(awk -F, -v n="$IOPS" -v t="$runtime" '/sys_enter_futex/ $1 ~ /^[0-9]+$/ { c += $1 } END { printf "%.1f", (n > 0 ? c * 1000 / (n * t) : 0) }' \
              "$work/perf.txt")
    [ -n "$FUTEX" ] || FUTEX=-
  fi
}

echo "cache_bench: ${runtime}s runs, slow backing = throttle iops $slow_iops, working set $wset, 4 KiB requests"
# 1. Warm the cache with the working set (one sequential pass, 1 MiB requests), then random reads.
exec 9<"$work/m/cached.raw"   # keeps the disk (and its cache) open between the fio runs
dd if="$work/m/cached.raw" of=/dev/null bs=1M count=$(( $(numfmt --from=iec "$wset") / 1048576 )) iflag=direct status=none
fasts=() cacheds=() ratios=() ffx=() cfx=()
for r in $(seq "$runs"); do
  fio_watched "$work/m/fast.raw" randread "$wset" 32
  f=$IOPS ffx+=("$FUTEX")
  fio_watched "$work/m/cached.raw" randread "$wset" 32
  c=$IOPS cfx+=("$FUTEX")
  fasts+=("$f") cacheds+=("$c") ratios+=("$(ratio "$c" "$f")")
  [ "$runs" -gt 1 ] && echo "   run $r: empty $f IOPS, cached $c IOPS, ratio ${ratios[-1]}; futex calls per 1000 requests: empty ${ffx[-1]}, cached ${cfx[-1]}"
done
fast=$(median "${fasts[@]}")
cached=$(median "${cacheds[@]}")
stats=$(getfattr -n user.iofilter.stats --only-values "$work/m/cached.raw" 2>/dev/null)
hit=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["filters"]["cache"]["hit_ratio"])' "$stats" 2>/dev/null)
[ "$runs" -gt 1 ] && med=" (medians of $runs)" || med=""
echo "1. warm random read QD32$med: empty chain on fast backing $fast IOPS; cache on slow backing $cached IOPS (hit ratio $hit)"
echo "   ratio cached/empty $(medianf "${ratios[@]}")$med (target >= 0.9)"
[ "$perf_ok" = 1 ] && [[ ! " ${ffx[*]} ${cfx[*]} " =~ " - " ]] && echo "   daemon futex calls per 1000 requests$med: empty chain $(medianf "${ffx[@]}"), cache $(medianf "${cfx[@]}")"
exec 9<&-
[ "$reads_only" = 1 ] && exit 0

# 2. Write-back burst against the slow backing's own IOPS.
slow=$(fio_iops "$work/m/slow.raw" randwrite 192M 32)
exec 9<"$work/m/wb.raw"
wb=$(fio_iops "$work/m/wb.raw" randwrite 192M 32)
stats=$(getfattr -n user.iofilter.stats --only-values "$work/m/wb.raw" 2>/dev/null)
dirty=$(python3 -c 'import json,sys; c=json.loads(sys.argv[1])["filters"]["cache"]; print(c["dirty_bytes"]//1048576, "MiB dirty,", c["bypasses"], "bypasses")' "$stats" 2>/dev/null)
exec 9<&-
echo "2. 4 KiB random write QD32: slow backing $slow IOPS; write-back cache on it $wb IOPS ($dirty at the end)"
echo "   ratio write-back/slow $(ratio "$wb" "$slow") (target >= 5)"

# 3. nbdkit's cache filter on a backing slowed to the same rate (delay per request = 1/iops
#    at QD1; nbdkit serves requests in parallel, so this is generous to nbdkit under QD32).
if command -v nbdkit >/dev/null && command -v nbdfuse >/dev/null; then
  delay=$(python3 -c "print('%dms' % max(1, round(1000/$slow_iops)))")
  nbdkit -U "$work/nbd.sock" --filter=cache --filter=delay file "$work/b/fast.raw" rdelay="$delay" wdelay="$delay" \
         cache=writethrough cache-on-read=true --exit-with-parent -f >"$work/nbdkit.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
  nbdfuse "$work/nbd" --unix "$work/nbd.sock" >"$work/nbdfuse.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do [ -e "$work/nbd/nbd" ] && break; sleep 0.1; done
  if [ -e "$work/nbd/nbd" ]; then
    dd if="$work/nbd/nbd" of=/dev/null bs=1M count=$(( $(numfmt --from=iec "$wset") / 1048576 )) status=none
    nbd=$(fio_iops "$work/nbd/nbd" randread "$wset" 32)
    echo "3. nbdkit cache filter (delay $delay per request) behind nbdfuse, warm random read QD32: $nbd IOPS"
    echo "   iofilterfs cache / nbdkit cache $(ratio "$cached" "$nbd")"
  else
    echo "3. nbdkit/nbdfuse did not come up: $(tail -2 "$work/nbdfuse.log" "$work/nbdkit.log" | tr '\n' ' ')"
  fi
else
  echo "3. nbdkit or nbdfuse missing: skipped"
fi

#!/usr/bin/env bash
# Encryption benchmark: the same workloads, on a private tmpfs, through
#   empty    iofilterfs, empty chain, over a plaintext image          (the baseline)
#   encrypt  iofilterfs, encrypt filter, over a LUKS1 container (aes-xts-plain64, 512-bit key)
#   qsd      qemu-storage-daemon: a luks node over the same container, exported through FUSE
#   nbdkit   nbdkit's luks filter over the same container, behind nbdfuse
# with fio (libaio, direct=1): 1M sequential read and write at QD8, 4k random read and write at
# QD32. Each point is the median of BENCH_REPEAT runs; targets take turns inside each repeat.
# Printed: encrypt/empty (target >= 0.80 for 1M sequential) and encrypt/best peer (targets:
# >= 3x on 1M sequential, >= 1.5x on 4k random).
#
#   bench/encrypt_bench.sh            full run (~8 min with the defaults)
#   bench/encrypt_bench.sh --quick    smoke test (3 s runs, 1 repeat, 256M)
#
# Environment: BENCH_RUNTIME [10] seconds per run, BENCH_REPEAT [3], BENCH_SIZE [1G] (MiB
# multiple), BENCH_TARGETS [empty encrypt qsd nbdkit], IOFILTERFS / IOFILTERCTL [build/...].
# A benchmark, not a test: exit 0 whatever the ratios, non-zero only when something failed to
# run. Everything it mounts or starts is undone on exit or Ctrl-C. Needs root (tmpfs).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
quick=0
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "encrypt_bench: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done
if [ $quick = 1 ]; then
  RUNTIME=${BENCH_RUNTIME:-3}; REPEAT=${BENCH_REPEAT:-1}; SIZE_MB=${BENCH_SIZE:-256M}
else
  RUNTIME=${BENCH_RUNTIME:-10}; REPEAT=${BENCH_REPEAT:-3}; SIZE_MB=${BENCH_SIZE:-1G}
fi
case $SIZE_MB in *G) SIZE_MB=$(( ${SIZE_MB%G} * 1024 )) ;; *M) SIZE_MB=${SIZE_MB%M} ;; esac
case $SIZE_MB in ''|*[!0-9]*) echo "encrypt_bench: BENCH_SIZE must be like 256M or 1G" >&2; exit 2 ;; esac
TARGETS=${BENCH_TARGETS:-empty encrypt qsd nbdkit}
IOFILTERFS=${IOFILTERFS:-$repo/build/iofilterfs}
IOFILTERCTL=${IOFILTERCTL:-$repo/build/iofilterctl}
WORKLOADS=(
  "seq-read   read      1M 8  bw"
  "seq-write  write     1M 8  bw"
  "rand-read  randread  4k 32 iops"
  "rand-write randwrite 4k 32 iops"
)

say() { printf '%s\n' "$*" >&2; }
die() { say "encrypt_bench: error: $*"; exit 1; }
want() { [[ " $TARGETS " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || die "needs root (a private tmpfs)"
for t in fio python3 fusermount3; do command -v $t >/dev/null || die "$t is not installed (bash scripts/setup.sh)"; done
[ -x "$IOFILTERFS" ] && [ -x "$IOFILTERCTL" ] || die "build first: bash scripts/build.sh build"
want qsd && ! command -v qemu-storage-daemon >/dev/null && die "qemu-storage-daemon is not installed"
want nbdkit && ! { command -v nbdkit && command -v nbdfuse; } >/dev/null && die "nbdkit/nbdfuse are not installed"

work=$(mktemp -d /tmp/encrypt_bench.XXXXXX) || die "mktemp failed"
pids=()        # daemons we started, stopped in reverse order
mounts=()      # FUSE mountpoints, unmounted in reverse order
fio_pid=""
is_mounted() { awk -v p="$1" '$2 == p { f = 1 } END { exit !f }' /proc/self/mounts; }
cleanup() {
  local rc=$? i
  trap '' INT TERM HUP
  [ -n "$fio_pid" ] && { kill -INT -- "-$fio_pid" 2>/dev/null; sleep 1; kill -KILL -- "-$fio_pid" 2>/dev/null; }
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    is_mounted "${mounts[i]}" && { fusermount3 -u "${mounts[i]}" 2>/dev/null || fusermount3 -uz "${mounts[i]}"; }
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null
    for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pids[i]}" 2>/dev/null
  done
  is_mounted "$work/tmpfs" && { umount "$work/tmpfs" || umount -l "$work/tmpfs"; }
  grep -qF " $work/" /proc/self/mounts || rm -rf --one-file-system "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

wait_for() {  # $1 = path that must appear as a mount (or a file in one), $2 = pid, $3 = log
  for _ in $(seq 200); do
    [ -e "$1" ] && [ "$(stat -c %s "$1" 2>/dev/null || echo 0)" -gt 0 ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$3" >&2; die "$(basename "$3" .log) exited before it served"; }
    sleep 0.1
  done
  tail -n 20 "$3" >&2
  die "$(basename "$3" .log) did not serve within 20 s"
}

# ---- the images --------------------------------------------------------------------------------
mkdir -p "$work/tmpfs"
mount -t tmpfs -o "size=$(( SIZE_MB * 2 + 512 ))M,mode=0700" encrypt_bench "$work/tmpfs" || die "tmpfs mount failed"
store=$work/tmpfs/store
mkdir -p "$store/plain" "$store/enc" "$work/m" "$work/qsd" "$work/nbd"
key=$work/key
printf 'encrypt bench passphrase' > "$key"
chmod 600 "$key"
say "encrypt_bench: writing ${SIZE_MB}M of data, then its LUKS1 container"
fio --name=prep --filename="$store/plain/disk.raw" --rw=write --bs=1M --size="${SIZE_MB}M" --ioengine=psync \
    --output=/dev/null || die "could not write the test file"
"$IOFILTERCTL" encrypt "$store/plain/disk.raw" "$store/enc/disk.raw" --key-file "$key" --iter-time 100ms >&2 ||
  die "iofilterctl encrypt failed"
container=$store/enc/disk.raw
cat > "$work/ds.yaml" <<EOF
datastore:
  images: ["*.raw"]
policies:
  clear:
  secret:
    encrypt: { key-file: $key }
rules:
  - { match: "enc/*", policy: secret }
  - { match: "*", policy: clear }
EOF

# ---- the servers -------------------------------------------------------------------------------
setsid "$IOFILTERFS" "$store" "$work/m" -f --config "$work/ds.yaml" > "$work/iofilterfs.log" 2>&1 &
pids+=($!); mounts+=("$work/m")
wait_for "$work/m/plain/disk.raw" "${pids[-1]}" "$work/iofilterfs.log"
if want qsd; then
  : > "$work/qsd/disk"
  setsid qemu-storage-daemon --object "secret,id=s,file=$key" \
    --blockdev "driver=file,node-name=f,filename=$container,cache.direct=on,aio=io_uring,locking=off" \
    --blockdev "driver=luks,node-name=l,file=f,key-secret=s" \
    --export "type=fuse,id=e,node-name=l,mountpoint=$work/qsd/disk,writable=on" > "$work/qsd.log" 2>&1 &
  pids+=($!); mounts+=("$work/qsd/disk")
  wait_for "$work/qsd/disk" "${pids[-1]}" "$work/qsd.log"
fi
if want nbdkit; then
  setsid nbdkit -f --unix "$work/nbd.sock" --filter=luks file "file=$container" "passphrase=+$key" \
    > "$work/nbdkit.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
  setsid nbdfuse "$work/nbd/disk" --unix "$work/nbd.sock" > "$work/nbdfuse.log" 2>&1 &
  pids+=($!); mounts+=("$work/nbd")
  wait_for "$work/nbd/disk" "${pids[-1]}" "$work/nbdfuse.log"
fi
file_of() {
  case $1 in
    empty) echo "$work/m/plain/disk.raw" ;;
    encrypt) echo "$work/m/enc/disk.raw" ;;
    qsd) echo "$work/qsd/disk" ;;
    nbdkit) echo "$work/nbd/disk" ;;
  esac
}
for t in $TARGETS; do
  sz=$(stat -c %s "$(file_of "$t")")
  [ "$sz" = $(( SIZE_MB * 1024 * 1024 )) ] || die "$t shows $sz bytes, expected ${SIZE_MB}M"
done

# ---- the runs ----------------------------------------------------------------------------------
results=$work/results.tsv
: > "$results"
say "encrypt_bench: fio $(fio --version), ${RUNTIME}s x $REPEAT runs, $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"
for ((r = 1; r <= REPEAT; r++)); do
  for w in "${WORKLOADS[@]}"; do
    read -r name rw bs qd metric <<<"$w"
    line="  [$r/$REPEAT] $(printf '%-10s' "$name")"
    for t in $TARGETS; do
      json=$work/$t-$name-$r.json
      setsid fio --name=b --filename="$(file_of "$t")" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --size="${SIZE_MB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap \
        --randrepeat=0 --output-format=json --output="$json" > "$json.err" 2>&1 &
      fio_pid=$!
      wait "$fio_pid" || { cat "$json.err" >&2; die "fio failed on $t ($name)"; }
      fio_pid=""
      v=$(python3 - "$json" "$metric" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
d = json.loads(t[t.find('{'):])
j = d["jobs"][0]
v = sum(j[k]["bw_bytes"] for k in ("read", "write")) / 1e6 if sys.argv[2] == "bw" else \
    sum(j[k]["iops"] for k in ("read", "write"))
print("%.1f" % v)
EOF
) || die "no result from fio ($t, $name)"
      printf '%s\t%s\t%s\n' "$name" "$t" "$v" >> "$results"
      line+="  $t $(printf '%9s' "$v")"
    done
    say "$line $([ "$metric" = bw ] && echo MB/s || echo IOPS)"
  done
done
grep -Ei '\b(error|critical|sanitizer)\b' "$work/iofilterfs.log" >&2

python3 - "$results" "$TARGETS" <<'EOF'
import statistics, sys
rows = [l.split('\t') for l in open(sys.argv[1]).read().splitlines()]
targets = sys.argv[2].split()
med = {}
for name, t, v in rows:
    med.setdefault((name, t), []).append(float(v))
med = {k: statistics.median(v) for k, v in med.items()}
print("== encrypt benchmark: median MB/s (1M) or IOPS (4k), tmpfs backing ==")
print("%-10s" % "workload" + "".join("%11s" % t for t in targets) + "   enc/empty  enc/best-peer")
for name in ("seq-read", "seq-write", "rand-read", "rand-write"):
    line = "%-10s" % name + "".join("%11.1f" % med.get((name, t), 0) for t in targets)
    enc = med.get((name, "encrypt"))
    empty = med.get((name, "empty"))
    peers = [med[(name, p)] for p in ("qsd", "nbdkit") if (name, p) in med]
    seq = name.startswith("seq")
    if enc and empty:
        line += "   %5.2f%s" % (enc / empty, " (>=0.80)" if seq else "        ")
    if enc and peers:
        line += "  %5.2f (>=%s)" % (enc / max(peers), "3.0" if seq else "1.5")
    print(line)
EOF

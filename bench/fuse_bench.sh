#!/usr/bin/env bash
# FUSE data-path benchmark: the same image file measured three ways with fio (libaio, direct=1):
#   raw         the backing file itself (baseline)
#   iofilterfs  the file through an iofilterfs mount (empty filter chain), as disk.raw
#   qsd         the file through qemu-storage-daemon's FUSE export
# on a private tmpfs and on the real disk, for 1M sequential read/write and 4k random read/write.
# Each point is the median of BENCH_REPEAT runs; the targets are printed next to the ratios.
#
#   bench/fuse_bench.sh            full run (~12 min with the defaults)
#   bench/fuse_bench.sh --quick    smoke test (3 s runs, 1 repeat, 256M file)
#
# Environment (defaults in brackets):
#   BENCH_RUNTIME   seconds per fio run [10]        BENCH_REPEAT    runs per point, median taken [3]
#   BENCH_SIZE      file size, fio syntax [1G]      BENCH_BACKINGS  "tmpfs disk" (either or both)
#   BENCH_RAMP      fio ramp_time in seconds [1]    BENCH_NUMJOBS   fio numjobs, same for all targets [1]
#   BENCH_DISK_DIR  where the disk backing lives [/var/tmp]
#   BENCH_THREADS   iofilterfs -t (unset: the daemon's default)
#   BENCH_QSD_AIO   qsd file driver aio= (io_uring, native, threads) [io_uring]
#   BENCH_TARGETS   subset of "raw iofilterfs qsd" [all three]
#   IOFILTERFS      daemon binary [<repo>/build/iofilterfs]
#   QSD             qemu-storage-daemon binary [qemu-storage-daemon]
# This is a benchmark, not a test: it exits 0 whether or not the targets are met, and non-zero
# only when something failed to run. Everything it mounts or starts is undone on exit or Ctrl-C.
set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

quick=0
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fuse_bench: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done

if [ $quick = 1 ]; then
  RUNTIME=${BENCH_RUNTIME:-3}; REPEAT=${BENCH_REPEAT:-1}; SIZE=${BENCH_SIZE:-256M}; RAMP=${BENCH_RAMP:-0}
else
  RUNTIME=${BENCH_RUNTIME:-10}; REPEAT=${BENCH_REPEAT:-3}; SIZE=${BENCH_SIZE:-1G}; RAMP=${BENCH_RAMP:-1}
fi
BACKINGS=${BENCH_BACKINGS:-tmpfs disk}
NUMJOBS=${BENCH_NUMJOBS:-1}
DISK_DIR=${BENCH_DISK_DIR:-/var/tmp}
QSD_AIO=${BENCH_QSD_AIO:-io_uring}
TARGETS=${BENCH_TARGETS:-raw iofilterfs qsd}
IOFILTERFS=${IOFILTERFS:-$repo/build/iofilterfs}
QSD=${QSD:-qemu-storage-daemon}

# name  fio-rw  bs  iodepth  metric
WORKLOADS=(
  "seq-read   read      1M 8  bw"
  "seq-write  write     1M 8  bw"
  "rand-read  randread  4k 32 iops"
  "rand-write randwrite 4k 32 iops"
)

say() { printf '%s\n' "$*" >&2; }
die() { say "fuse_bench: error: $*"; exit 1; }

# ---- checks -----------------------------------------------------------------------------------
command -v fio >/dev/null || die "fio is not installed"
command -v python3 >/dev/null || die "python3 is not installed"
command -v fusermount3 >/dev/null || die "fusermount3 is not installed"
[ -x "$IOFILTERFS" ] || die "no daemon at $IOFILTERFS (build it: cd $repo/build && make -j2, or set IOFILTERFS)"
case $RUNTIME in ''|*[!0-9]*) die "BENCH_RUNTIME must be a whole number of seconds" ;; esac
case $REPEAT in ''|*[!0-9]*|0) die "BENCH_REPEAT must be a positive number" ;; esac
case $NUMJOBS in ''|*[!0-9]*|0) die "BENCH_NUMJOBS must be a positive number" ;; esac
size_bytes=$(python3 - "$SIZE" <<'EOF'
import re, sys
m = re.fullmatch(r'(\d+)([kmgt]?)(i?b?)', sys.argv[1].strip().lower())
if not m: sys.exit(1)
print(int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
EOF
) || die "BENCH_SIZE '$SIZE' is not a size (e.g. 256M, 1G)"
if [ "$size_bytes" -lt $((16 * 1024 * 1024)) ] || [ $((size_bytes % (1024 * 1024))) != 0 ]; then
  die "BENCH_SIZE must be a multiple of 1M and at least 16M"
fi
for b in $BACKINGS; do case $b in tmpfs|disk) ;; *) die "unknown backing '$b' (tmpfs, disk)" ;; esac; done
for t in $TARGETS; do case $t in raw|iofilterfs|qsd) ;; *) die "unknown target '$t'" ;; esac; done
if [[ " $TARGETS " == *" qsd "* ]] && ! command -v "$QSD" >/dev/null; then
  say "fuse_bench: warning: $QSD not found, the qsd column stays empty"
  TARGETS=${TARGETS//qsd/}
fi
want() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---- state and cleanup --------------------------------------------------------------------------
work=$(mktemp -d /tmp/fuse_bench.XXXXXX) || die "mktemp failed"
results=$work/results.tsv
: > "$results"
fs_pid=""; fs_mnt=""; fs_log=""
qsd_pid=""; qsd_file=""; qsd_log=""
tmpfs_mnt=""; disk_tmp=""; fio_pid=""
cleaning=0

# True when $1 is a mount point in /proc/self/mounts. Unlike mountpoint(1) this also sees a FUSE
# mount whose daemon died (stat fails there with ENOTCONN).
is_mounted() { awk -v p="$1" '$2 == p { found = 1 } END { exit !found }' /proc/self/mounts 2>/dev/null; }

# Waits up to $2 tenths of a second for process $1 to go; reaps it.
wait_gone() {
  local pid=$1 n=${2:-50}
  while [ "$n" -gt 0 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
  if kill -0 "$pid" 2>/dev/null; then return 1; fi
  wait "$pid" 2>/dev/null
  return 0
}

stop_qsd() {
  if [ -n "$qsd_pid" ]; then
    kill -TERM "$qsd_pid" 2>/dev/null
    if ! wait_gone "$qsd_pid" 100; then
      say "fuse_bench: qemu-storage-daemon $qsd_pid did not stop on SIGTERM, killing it"
      kill -KILL "$qsd_pid" 2>/dev/null; wait_gone "$qsd_pid" 50
    fi
    qsd_pid=""
  fi
  if [ -n "$qsd_file" ] && is_mounted "$qsd_file"; then
    fusermount3 -u "$qsd_file" 2>/dev/null || fusermount3 -uz "$qsd_file" 2>/dev/null
  fi
  qsd_file=""
}

stop_iofilterfs() {
  if [ -n "$fs_mnt" ] && is_mounted "$fs_mnt"; then
    fusermount3 -u "$fs_mnt" 2>/dev/null || {
      sleep 0.5
      fusermount3 -u "$fs_mnt" 2>/dev/null || fusermount3 -uz "$fs_mnt" 2>/dev/null
    }
  fi
  if [ -n "$fs_pid" ]; then
    if ! wait_gone "$fs_pid" 100; then
      say "fuse_bench: iofilterfs $fs_pid still running after unmount, sending SIGTERM"
      kill -TERM "$fs_pid" 2>/dev/null
      if ! wait_gone "$fs_pid" 100; then kill -KILL "$fs_pid" 2>/dev/null; wait_gone "$fs_pid" 50; fi
    fi
    fs_pid=""
  fi
  if [ -n "$fs_mnt" ] && is_mounted "$fs_mnt"; then fusermount3 -uz "$fs_mnt" 2>/dev/null; fi
  fs_mnt=""
}

release_backing() {
  if [ -n "$tmpfs_mnt" ]; then
    if is_mounted "$tmpfs_mnt"; then umount "$tmpfs_mnt" 2>/dev/null || umount -l "$tmpfs_mnt"; fi
    rmdir "$tmpfs_mnt" 2>/dev/null
    tmpfs_mnt=""
  fi
  if [ -n "$disk_tmp" ]; then
    rm -rf --one-file-system "$disk_tmp"
    disk_tmp=""
  fi
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  [ "$cleaning" = 1 ] && return
  cleaning=1
  trap '' INT TERM HUP
  if [ -n "$fio_pid" ]; then
    kill -INT -- "-$fio_pid" 2>/dev/null
    wait_gone "$fio_pid" 50 || { kill -KILL -- "-$fio_pid" 2>/dev/null; wait_gone "$fio_pid" 50; }
  fi
  stop_qsd
  stop_iofilterfs
  release_backing
  # Only delete the work dir when nothing is mounted under it any more.
  if ! grep -qF " $work/" /proc/self/mounts 2>/dev/null; then
    rm -rf --one-file-system "$work"
  else
    say "fuse_bench: something is still mounted under $work; left it in place"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "fuse_bench: interrupted"; exit 130' INT
trap 'say "fuse_bench: terminated"; exit 143' TERM HUP

# ---- pieces ---------------------------------------------------------------------------------------
show_log() {  # $1 = log file, $2 = title
  [ -s "$1" ] || return 0
  say "---- $2 (last 30 lines of $1) ----"
  tail -n 30 "$1" >&2
  say "----"
}

# Lines of a daemon log that are warnings or worse, for the report at the end.
problems_in() { grep -E -i '\b(warn|warning|error|critical|fatal|abort|sanitizer|segv)\b' "$1" 2>/dev/null; }

start_iofilterfs() {  # $1 = backing dir
  fs_mnt=$work/mnt-$2
  fs_log=$work/iofilterfs-$2.log
  mkdir -p "$fs_mnt"
  local args=("$1" "$fs_mnt" -f)
  [ -n "${BENCH_THREADS:-}" ] && args+=(-t "$BENCH_THREADS")
  say "  start: $IOFILTERFS ${args[*]}"
  # Own session: a Ctrl-C on the terminal reaches only this script, which unmounts in order.
  setsid "$IOFILTERFS" "${args[@]}" >"$fs_log" 2>&1 &
  fs_pid=$!
  local n=100
  while ! mountpoint -q "$fs_mnt"; do
    if ! kill -0 "$fs_pid" 2>/dev/null; then
      wait "$fs_pid"; local st=$?; fs_pid=""
      show_log "$fs_log" "iofilterfs log"
      die "iofilterfs exited with status $st before mounting"
    fi
    n=$((n - 1)); [ $n -gt 0 ] || { show_log "$fs_log" "iofilterfs log"; die "iofilterfs did not mount within 10 s"; }
    sleep 0.1
  done
  [ -f "$fs_mnt/disk.raw" ] || die "disk.raw is not visible through the iofilterfs mount"
  local sz; sz=$(stat -c %s "$fs_mnt/disk.raw")
  [ "$sz" = "$size_bytes" ] || die "disk.raw through iofilterfs has size $sz, expected $size_bytes"
}

# qemu-storage-daemon's FUSE export of the same file. Matching iofilterfs: O_DIRECT on the backing
# file (cache.direct=on; our daemon opens the backing O_DIRECT for O_DIRECT clients), no format
# layer (the file node is exported as is), writable. locking=off because iofilterfs takes an
# exclusive OFD lock on the image for writable opens and would refuse them (EBUSY) while qemu
# holds its permission locks; the two are never used at the same time here.
start_qsd() {  # $1 = image file, $2 = backing name
  qsd_file=$work/qsd-$2.img
  qsd_log=$work/qsd-$2.log
  : > "$qsd_file"
  local cmd=("$QSD"
    --blockdev "driver=file,node-name=f,filename=$1,cache.direct=on,cache.no-flush=off,aio=$QSD_AIO,locking=off"
    --export "type=fuse,id=e,node-name=f,mountpoint=$qsd_file,writable=on,growable=off,allow-other=off")
  qsd_cmd="${cmd[*]}"
  say "  start: $qsd_cmd"
  setsid "${cmd[@]}" >"$qsd_log" 2>&1 &
  qsd_pid=$!
  local n=100
  while ! mountpoint -q "$qsd_file"; do
    if ! kill -0 "$qsd_pid" 2>/dev/null; then
      wait "$qsd_pid"; local st=$?; qsd_pid=""
      show_log "$qsd_log" "qemu-storage-daemon log"
      die "qemu-storage-daemon exited with status $st before exporting"
    fi
    n=$((n - 1)); [ $n -gt 0 ] || { show_log "$qsd_log" "qsd log"; die "qemu-storage-daemon did not export within 10 s"; }
    sleep 0.1
  done
  local sz; sz=$(stat -c %s "$qsd_file")
  [ "$sz" = "$size_bytes" ] || die "qsd export has size $sz, expected $size_bytes"
}

# Prints the metric of one fio JSON result: MB/s (1e6 bytes/s) for bw, IO/s for iops.
fio_value() {  # $1 = json file, $2 = bw|iops
  python3 - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
start = text.find('{')  # fio may print warnings before the JSON
if start < 0:
    sys.exit("no JSON in fio output")
d = json.loads(text[start:])
bw = iops = 0.0
for j in d["jobs"]:
    if j.get("error"):
        sys.exit("fio job error %s" % j["error"])
    for k in ("read", "write"):
        bw += j[k]["bw_bytes"]
        iops += j[k]["iops"]
v = bw / 1e6 if sys.argv[2] == "bw" else iops
if v <= 0:
    sys.exit("fio measured nothing")
print("%.1f" % v)
EOF
}

# fio runs in the background, in a process group of its own (fio forks its jobs), and is waited
# for, so that a signal reaches our trap at once and the trap can stop all of fio.
run_fio() {  # $1 = file, $2 = rw, $3 = bs, $4 = iodepth, $5 = json out
  setsid fio --name=bench --filename="$1" --ioengine=libaio --direct=1 --rw="$2" --bs="$3" --iodepth="$4" \
      --numjobs="$NUMJOBS" --group_reporting --size="$size_bytes" --time_based --runtime="$RUNTIME" \
      --ramp_time="$RAMP" --norandommap --randrepeat=0 --fallocate=none \
      --output-format=json --output="$5" >"$5.err" 2>&1 &
  fio_pid=$!
  wait "$fio_pid"
  local st=$?
  fio_pid=""
  return $st
}

target_file() {  # $1 = target, $2 = raw file
  case $1 in
    raw) echo "$2" ;;
    iofilterfs) echo "$fs_mnt/disk.raw" ;;
    qsd) echo "$qsd_file" ;;
  esac
}

check_alive() {  # $1 = target
  case $1 in
    iofilterfs)
      if ! kill -0 "$fs_pid" 2>/dev/null || ! mountpoint -q "$fs_mnt"; then
        show_log "$fs_log" "iofilterfs log"; die "iofilterfs is gone (crashed or unmounted)"
      fi ;;
    qsd)
      if ! kill -0 "$qsd_pid" 2>/dev/null || ! mountpoint -q "$qsd_file"; then
        show_log "$qsd_log" "qsd log"; die "qemu-storage-daemon is gone"
      fi ;;
  esac
}

bench_backing() {  # $1 = tmpfs|disk
  local backing=$1 dir
  say ""
  say "== backing: $backing"
  case $backing in
    tmpfs)
      tmpfs_mnt=$work/tmpfs
      mkdir -p "$tmpfs_mnt"
      local tsize=$(( (size_bytes + 512 * 1024 * 1024) / 1024 / 1024 ))M
      if [ "$(id -u)" = 0 ]; then
        mount -t tmpfs -o "size=$tsize,mode=0700" fuse_bench "$tmpfs_mnt" || die "could not mount a tmpfs on $tmpfs_mnt"
      else
        die "mounting a private tmpfs needs root (run as root or set BENCH_BACKINGS=disk)"
      fi
      dir=$tmpfs_mnt/store ;;
    disk)
      mkdir -p "$DISK_DIR" || die "cannot create $DISK_DIR"
      disk_tmp=$(mktemp -d "$DISK_DIR/fuse_bench.XXXXXX") || die "mktemp in $DISK_DIR failed"
      local avail; avail=$(df -P -B1 "$disk_tmp" | awk 'NR==2 {print $4}')
      [ "${avail:-0}" -gt $((size_bytes + 256 * 1024 * 1024)) ] || die "not enough free space in $DISK_DIR"
      dir=$disk_tmp/store ;;
  esac
  mkdir -p "$dir"
  say "  backing dir: $dir ($(df -P "$dir" | awk 'NR==2 {print $1}'), $(stat -f -c %T "$dir"))"
  local img=$dir/disk.raw
  say "  writing $SIZE to $img"
  fio --name=prep --filename="$img" --ioengine=libaio --direct=1 --rw=write --bs=1M --iodepth=8 \
      --size="$size_bytes" --fallocate=native --output="$work/prep.out" >"$work/prep.err" 2>&1 ||
    { cat "$work/prep.out" "$work/prep.err" >&2; die "could not write the test file"; }
  [ "$(stat -c %s "$img")" = "$size_bytes" ] || die "test file has the wrong size"
  sync

  want iofilterfs && start_iofilterfs "$dir" "$backing"
  want qsd && start_qsd "$img" "$backing"

  local r w name rw bs qd metric t f v unit json st
  for ((r = 1; r <= REPEAT; r++)); do
    for w in "${WORKLOADS[@]}"; do
      read -r name rw bs qd metric <<<"$w"
      [ "$metric" = bw ] && unit=MB/s || unit=IOPS
      local line
      line="  [$backing $r/$REPEAT] $(printf '%-10s' "$name")"
      # Targets take turns inside each repeat, so slow drift of the machine hits them alike.
      for t in raw iofilterfs qsd; do
        want "$t" || continue
        check_alive "$t"
        f=$(target_file "$t" "$img")
        json=$work/fio-$backing-$name-$t-$r.json
        run_fio "$f" "$rw" "$bs" "$qd" "$json"
        st=$?
        if [ $st != 0 ]; then
          say "fio exited with status $st$( [ $st -gt 128 ] && echo " (signal $((st - 128)))" ); its output:"
          cat "$json.err" >&2
          tail -n 20 "$json" >&2 2>/dev/null
          [ "$t" = iofilterfs ] && show_log "$fs_log" "iofilterfs log"
          [ "$t" = qsd ] && show_log "$qsd_log" "qsd log"
          die "fio failed on $t ($backing, $name)"
        fi
        v=$(fio_value "$json" "$metric") || { cat "$json" "$json.err" >&2; die "could not read fio's result ($t, $backing, $name)"; }
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$backing" "$name" "$unit" "$t" "$r" "$v" >>"$results"
        line+="  $t $(printf '%10s' "$v")"
      done
      say "$line $unit"
    done
  done

  stop_qsd
  stop_iofilterfs
  if [ -n "$fs_log" ]; then
    problems_in "$fs_log" | sed "s/^/[$backing] /" >>"$work/problems.iofilterfs"
    cp "$fs_log" "$work/last-iofilterfs.log"
  fi
  [ -n "$qsd_log" ] && problems_in "$qsd_log" | sed "s/^/[$backing] /" >>"$work/problems.qsd"
  release_backing
}

# ---- run ------------------------------------------------------------------------------------------
say "fuse_bench: fio $(fio --version), $("$IOFILTERFS" --version 2>/dev/null | head -1)"
want qsd && say "fuse_bench: $("$QSD" --version | head -1)"
say "fuse_bench: size $SIZE, runtime ${RUNTIME}s (+${RAMP}s ramp), repeat $REPEAT (median), numjobs $NUMJOBS," \
    "backings: $BACKINGS, targets: $TARGETS, $(nproc) CPUs, kernel $(uname -r)"
load=$(cut -d' ' -f1 /proc/loadavg)
say "fuse_bench: load average at start: $load"
if python3 -c "import os, sys; sys.exit(0 if float('$load') > os.cpu_count() / 2 else 1)"; then
  say "fuse_bench: warning: the machine is busy (load $load on $(nproc) CPUs); expect noisy numbers"
fi
started=$(date +%s)
for b in $BACKINGS; do bench_backing "$b"; done
say ""
load_end=$(cut -d' ' -f1 /proc/loadavg)
say "fuse_bench: done in $(( $(date +%s) - started )) s; load average at end (this run included): $load_end"

# ---- report ---------------------------------------------------------------------------------------
echo
echo "# $(nproc) CPUs, kernel $(uname -r), load average $load at start, $load_end at end (this run included); qsd aio=$QSD_AIO"
python3 - "$results" "$SIZE" "$RUNTIME" "$REPEAT" "$NUMJOBS" <<'EOF' || die "could not build the report"
import statistics, sys
from collections import defaultdict

path, size, runtime, repeat, numjobs = sys.argv[1:6]
samples = defaultdict(list)
units, order = {}, []
for line in open(path):
    b, w, unit, t, r, v = line.rstrip("\n").split("\t")
    samples[(b, w, t)].append(float(v))
    units[(b, w)] = unit
    if (b, w) not in order:
        order.append((b, w))

# (min iofilterfs/raw, min iofilterfs/qsd) per backing and workload; None = no target.
TARGETS = {
    "tmpfs": {"seq-read": (0.25, 1.2), "seq-write": (0.25, 1.2),
              "rand-read": (0.25, 1.5), "rand-write": (0.25, 1.5)},
    "disk": {"seq-read": (0.8, None), "seq-write": (0.8, None)},
}

def med(b, w, t):
    s = samples.get((b, w, t))
    return statistics.median(s) if s else None

def fmt(v, unit):
    if v is None:
        return "-"
    return "%.0f" % v if unit == "IOPS" else "%.1f" % v

def ratio(a, b):
    return a / b if a is not None and b else None

def judge(r, target):
    if target is None:
        return "", "-"
    if r is None:
        return ">=%.2fx" % target, "n/a"
    return ">=%.2fx" % target, "PASS" if r >= target else "MISS"

summary = []
for backing in dict.fromkeys(b for b, _ in order):
    print("== %s backing: %s file, fio libaio direct=1 numjobs=%s, %ss x %s runs, median ==" %
          (backing, size, numjobs, runtime, repeat))
    hdr = ("%-10s %-5s %10s %10s %10s | %8s %7s %4s | %8s %7s %4s" %
           ("workload", "unit", "raw", "iofilterfs", "qsd", "iofs/raw", "target", "", "iofs/qsd", "target", ""))
    print(hdr)
    print("-" * len(hdr))
    for b, w in order:
        if b != backing:
            continue
        unit = units[(b, w)]
        raw, fs, q = med(b, w, "raw"), med(b, w, "iofilterfs"), med(b, w, "qsd")
        rr, rq = ratio(fs, raw), ratio(fs, q)
        traw, tq = TARGETS.get(b, {}).get(w, (None, None))
        traw_s, vraw = judge(rr, traw)
        tq_s, vq = judge(rq, tq)
        r_s = lambda r: "-" if r is None else "%.2fx" % r
        print("%-10s %-5s %10s %10s %10s | %8s %7s %4s | %8s %7s %4s" %
              (w, unit, fmt(raw, unit), fmt(fs, unit), fmt(q, unit),
               r_s(rr), traw_s, vraw if traw else "", r_s(rq), tq_s, vq if tq else ""))
        verdicts = [v for v, t in ((vraw, traw), (vq, tq)) if t is not None]
        overall = ("MISS" if "MISS" in verdicts else "n/a" if "n/a" in verdicts else "PASS") if verdicts else "none"
        samp = lambda t: ",".join(fmt(x, unit) for x in samples.get((b, w, t), [])) or "-"
        summary.append(
            "BENCH backing=%s workload=%s unit=%s raw=%s iofilterfs=%s qsd=%s iofs_raw=%s iofs_qsd=%s "
            "target_raw=%s target_qsd=%s result=%s samples_raw=%s samples_iofilterfs=%s samples_qsd=%s" %
            (b, w, unit, fmt(raw, unit), fmt(fs, unit), fmt(q, unit),
             "-" if rr is None else "%.3f" % rr, "-" if rq is None else "%.3f" % rq,
             traw if traw else "-", tq if tq else "-", overall, samp("raw"), samp("iofilterfs"), samp("qsd")))
    print()
print("\n".join(summary))
EOF

for p in iofilterfs qsd; do
  if [ -s "$work/problems.$p" ]; then
    echo
    echo "== warnings and errors in the $p log =="
    head -n 40 "$work/problems.$p"
  fi
done
if [ -n "${qsd_cmd:-}" ]; then
  echo
  echo "qsd: $qsd_cmd"
fi
exit 0

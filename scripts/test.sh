#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what is missing, builds the normal tree and
# an ASan+UBSan tree, runs every test (unit and real mounts) in both, and ends with one line
# "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || exit 1
# -g1 (line tables, no variable info): a test run needs file:line in a backtrace, not a debugger's
# view of locals, and it compiles about a quarter faster than RelWithDebInfo's -g.
bash scripts/build.sh build -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" || exit 1
# -O1 -g1: sanitizer builds are for finding bugs; -O1 keeps them quick to build and run, and
# -g1 keeps the file:line of every frame in a report at a fraction of -g's compile time.
bash scripts/build.sh build-asan -DIOFILTERFS_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" || exit 1

passed=0
failed=0
run_suite() {
  local name=$1 dir=$2 log
  shift 2
  log=$(mktemp)
  echo "=== $name ==="
  # -j2: unit tests, and mount tests that measure no rate or time, run two at a time (the rest
  # are RUN_SERIAL: see tests/CMakeLists.txt).
  ctest --test-dir "$dir" --output-on-failure --timeout 600 -j2 "$@" 2>&1 | tee "$log"
  local p f
  # ctest: "100% tests passed, 0 tests failed out of 42"
  f=$(sed -n 's/.* \([0-9][0-9]*\) tests failed out of \([0-9][0-9]*\).*/\1/p' "$log" | tail -1)
  t=$(sed -n 's/.* tests failed out of \([0-9][0-9]*\).*/\1/p' "$log" | tail -1)
  if [ -z "$t" ]; then
    echo "$name: ctest produced no summary"
    failed=$((failed + 1))
  else
    p=$((t - f))
    passed=$((passed + p))
    failed=$((failed + f))
  fi
  rm -f "$log"
}

run_suite "release build" build
# The sanitizer build: the daemon the integration tests start is the instrumented one. The
# throttle's accuracy tests, whose point is a measured figure (a rate held for 10-20 s, the
# throughput of an unthrottled neighbour), are left to the release run: under the sanitizers'
# CPU cost those figures measure ASan, and the code they run is the code the other throttle
# tests (limits changed by a reload while requests wait) run instrumented here.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  run_suite "ASan+UBSan build" build-asan \
  -E "unthrottled neighbour|limit holds within|burst runs near iops-max|busy disks shares one|under congestion, shares"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

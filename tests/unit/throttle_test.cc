// The throttle: QEMU's leaky buckets as an exact scheduler (times checked to the nanosecond,
// without sleeping), the parameter validation table, and the adapter over a memory layer.
#include <catch2/catch.hpp>
#include <yaml-cpp/yaml.h>

#include <string>
#include <vector>

#include "throttle/bucket.h"
#include "throttle/params.h"
#include "throttle/throttle_filter.h"
#include "chain.h"
#include "mem_layer.h"

using namespace iofilterfs;
using namespace iofilterfs::throttle;

namespace {

constexpr uint64_t kMs = 1'000'000;
constexpr uint64_t kSec = 1'000'000'000;
constexpr uint64_t T0 = 1000 * kSec;  // an arbitrary start: nothing depends on time zero

ThrottleConfig config(const char* yaml) {
  ThrottleConfig cfg;
  std::string err = parse_throttle(YAML::Load(yaml), &cfg);
  INFO(yaml);
  REQUIRE(err == "");
  return cfg;
}

}  // namespace

TEST_CASE("500 iops: a tenth of a second at once, then one request every 2ms", "[throttle]") {
  // Without iops-max the bucket holds avg/10 = 50 operations and is checked before a request is
  // poured in (QEMU's rule), so requests 0..50 start at once and request k > 50 at (k-50) x 2ms.
  for (const char* yaml : {"iops: 500", "read-iops: 500"}) {
    ThrottleState s(config(yaml));
    for (uint64_t k = 0; k < 1000; ++k) {
      uint64_t expect = T0 + (k <= 50 ? 0 : (k - 50) * 2 * kMs);
      REQUIRE(s.admit(false, 4096, T0) == expect);
    }
    // The last one: 949 x 2ms.
    CHECK(s.admit(false, 4096, T0) == T0 + 950 * 2 * kMs);
  }
}

TEST_CASE("waits are rounded up to the nanosecond and do not drift", "[throttle]") {
  // 3 iops, bucket 0.3 operations: request k >= 1 may start once k - 3t <= 0.3, at
  // t = (k - 0.3)/3 s, rounded up: 233333333.3 -> 233333334, 566666666.7 -> 566666667, and
  // 900000000 exactly (rounding never accumulates).
  ThrottleState s(config("iops: 3"));
  CHECK(s.admit(false, 1, T0) == T0);
  for (uint64_t k = 1; k < 100; ++k) {
    uint64_t expect = ((10 * k - 3) * 100'000'000 + 2) / 3;  // ceil((10k - 3) x 10^8 / 3)
    REQUIRE(s.admit(false, 1, T0) == T0 + expect);
  }
  ThrottleState r(config("iops: 3"));
  CHECK(r.admit(false, 1, T0) == T0);
  CHECK(r.admit(false, 1, T0) == T0 + 233'333'334);
  CHECK(r.admit(false, 1, T0) == T0 + 566'666'667);
  CHECK(r.admit(false, 1, T0) == T0 + 900'000'000);
}

TEST_CASE("requests arriving at the limit's pace are never delayed", "[throttle]") {
  ThrottleState s(config("iops: 500"));
  for (uint64_t k = 0; k < 10000; ++k) REQUIRE(s.admit(k % 2, 512, T0 + k * 2 * kMs) == T0 + k * 2 * kMs);
}

TEST_CASE("a burst at iops-max for about iops-max-length after idling, then the limit", "[throttle]") {
  // iops 500, max 2000, length 2s: the bucket holds 2000 x 2 = 4000 operations and leaks 500/s;
  // the burst bucket (max-length > 1s) holds 2000/10 = 200 and leaks 2000/s, capping the rate.
  // Requests 0..200 start at once; then one every 0.5ms (2000/s) while the main bucket fills:
  // its level before request k is k - (k-200)/4, which passes 4000 at k = 5267, 2.534s in (the
  // burst lasts a little longer than 2s because the bucket leaks meanwhile); from then on one
  // request every 2ms (500/s).
  ThrottleState s(config("iops: 500\niops-max: 2000\niops-max-length: 2s"));
  auto expect = [](uint64_t start, uint64_t k) {
    if (k <= 200) return start;
    if (k <= 5266) return start + (k - 200) * 500'000;
    return start + (k - 4000) * 2 * kMs;
  };
  uint64_t last = 0;
  for (uint64_t k = 0; k < 6000; ++k) {
    last = s.admit(true, 4096, T0);
    REQUIRE(last == expect(T0, k));
  }
  CHECK(expect(T0, 5266) == T0 + 2'533'000'000);
  CHECK(expect(T0, 5267) == T0 + 2'534'000'000);

  // After a long idle period the disk may burst again, but no further than one bucketful:
  // exactly the same schedule as the first time.
  const uint64_t later = last + 3600 * kSec;
  for (uint64_t k = 0; k < 6000; ++k) REQUIRE(s.admit(true, 4096, later) == expect(later, k));
}

TEST_CASE("with max-length of 1s (the default) the burst rate is not capped, as in QEMU", "[throttle]") {
  // The bucket holds 2000 x 1s; no burst bucket: 2001 requests start at once, then 2ms apart.
  ThrottleState s(config("iops: 500\niops-max: 2000"));
  for (uint64_t k = 0; k < 2100; ++k)
    REQUIRE(s.admit(false, 4096, T0) == T0 + (k <= 2000 ? 0 : (k - 2000) * 2 * kMs));
}

TEST_CASE("a long idle period does not save up more than the bucket", "[throttle]") {
  ThrottleState s(config("iops: 500"));
  for (int round = 0; round < 3; ++round) {
    const uint64_t start = T0 + round * 86400 * kSec;
    for (uint64_t k = 0; k < 200; ++k)
      REQUIRE(s.admit(false, 4096, start) == start + (k <= 50 ? 0 : (k - 50) * 2 * kMs));
  }
}

TEST_CASE("iops-size: a larger request counts as size / iops-size operations", "[throttle]") {
  SECTION("8KiB requests count twice") {
    // 100 iops, bucket 10 operations: levels 0, 2, ..., 10 admit at once (6 requests), then
    // one every 2/100 s.
    ThrottleState s(config("iops: 100\niops-size: 4KiB"));
    for (uint64_t k = 0; k < 50; ++k) REQUIRE(s.admit(false, 8192, T0) == T0 + (k <= 5 ? 0 : (k - 5) * 20 * kMs));
  }
  SECTION("fractions, and requests at or below iops-size count once") {
    ThrottleState s(config("iops: 100\niops-size: 4096"));
    for (int k = 0; k < 10; ++k) REQUIRE(s.admit(true, 1024, T0) == T0);  // level 10
    CHECK(s.admit(true, 6144, T0) == T0);                                 // 10 <= 10; +1.5
    CHECK(s.admit(true, 4096, T0) == T0 + 15 * kMs);                      // 11.5 -> 10; +1
    CHECK(s.admit(true, 12288, T0) == T0 + 25 * kMs);                     // 11 -> 10; +3
    CHECK(s.admit(true, 1024, T0) == T0 + 55 * kMs);                      // 13 -> 10
  }
  SECTION("without iops-size every request is one operation") {
    ThrottleState s(config("iops: 100"));
    for (uint64_t k = 0; k < 30; ++k) REQUIRE(s.admit(false, 1 << 20, T0) == T0 + (k <= 10 ? 0 : (k - 10) * 10 * kMs));
  }
}

TEST_CASE("bps with mixed request sizes", "[throttle]") {
  // 1MiB/s, bucket 104857.6 bytes.
  ThrottleState s(config("bps: 1MiB/s"));
  CHECK(s.admit(false, 65536, T0) == T0);                          // level 0
  CHECK(s.admit(true, 65536, T0) == T0);                           // 65536 <= 104857.6
  CHECK(s.admit(false, 4096, T0) == T0 + 25 * kMs);                // 131072 -> 104857.6: 26214.4 B
  CHECK(s.admit(false, 1 << 20, T0) == T0 + 28'906'250);           // +4096 B: 3.90625ms
  CHECK(s.admit(true, 512, T0) == T0 + 28'906'250 + kSec);         // +1MiB: 1s
  CHECK(s.admit(true, 512, T0 + 10 * kSec) == T0 + 10 * kSec);     // idle: at once
}

TEST_CASE("bps burst: the rate is capped at bps-max during a burst", "[throttle]") {
  // 1MiB/s, max 4MiB/s for 3s: bucket 12MiB leaking 1MiB/s, burst bucket 0.4MiB leaking
  // 4MiB/s. 1MiB requests: the burst level before request k at time t is k - 4t (MiB), so k
  // starts at k/4 - 0.1 s (4 per second after the first); the main level then is 0.75k + 0.1,
  // at most 12 while k <= 15. From request 16 on the main bucket rules: k - t <= 12, one a second.
  ThrottleState s(config("bps: 1MiB/s\nbps-max: 4MiB/s\nbps-max-length: 3s"));
  for (uint64_t k = 0; k < 30; ++k) {
    uint64_t expect = k == 0 ? T0 : k <= 15 ? T0 + k * 250 * kMs - 100 * kMs : T0 + (k - 12) * kSec;
    REQUIRE(s.admit(false, 1 << 20, T0) == expect);
  }
}

TEST_CASE("reads do not wait behind writes when only read/write limits are set", "[throttle]") {
  ThrottleState s(config("read-iops: 100\nwrite-iops: 10"));
  // 50 writes: bucket 1 operation, so two at once, then one every 100ms.
  for (uint64_t k = 0; k < 50; ++k) REQUIRE(s.admit(true, 4096, T0) == T0 + (k <= 1 ? 0 : (k - 1) * 100 * kMs));
  // Reads arriving after them see only the read bucket: eleven at once, then every 10ms.
  for (uint64_t k = 0; k < 50; ++k) REQUIRE(s.admit(false, 4096, T0) == T0 + (k <= 10 ? 0 : (k - 10) * 10 * kMs));
  CHECK(s.pending() == 0);
}

TEST_CASE("a total limit is shared by reads and writes, first come first served", "[throttle]") {
  ThrottleState s(config("iops: 100"));
  // Alternating writes and reads share one bucket of 10 operations: request k at (k-10) x 10ms.
  for (uint64_t k = 0; k < 100; ++k) REQUIRE(s.admit(k % 2 == 0, 4096, T0) == T0 + (k <= 10 ? 0 : (k - 10) * 10 * kMs));

  // Twenty writes, then a read: the writes were held by the shared bucket, so the read does
  // not overtake them (ties go to the earlier request).
  ThrottleState t(config("iops: 100"));
  for (uint64_t k = 0; k < 20; ++k) REQUIRE(t.admit(true, 4096, T0) == T0 + (k <= 10 ? 0 : (k - 10) * 10 * kMs));
  CHECK(t.pending() == 9);  // the writes after T0: a read could still start before them
  CHECK(t.admit(false, 4096, T0) == T0 + 100 * kMs);
  CHECK(t.pending() == 1);  // the writes are folded in; the read is ahead of the last write start
}

TEST_CASE("a total limit does not hold a read behind a write delayed by the write's own limit", "[throttle]") {
  // iops 100 in total, writes 1MiB/s. A 4MiB write starts at once; the next write must wait
  // 3.9s for write bandwidth. A read 100ms later finds the iops bucket nearly empty and starts
  // at once, ahead of that write, which keeps its time.
  ThrottleState s(config("iops: 100\nwrite-bps: 1MiB/s"));
  CHECK(s.admit(true, 4 << 20, T0) == T0);
  CHECK(s.admit(true, 4096, T0) == T0 + 3900 * kMs);
  CHECK(s.pending() == 1);
  CHECK(s.admit(false, 4096, T0 + 100 * kMs) == T0 + 100 * kMs);
  for (uint64_t k = 1; k < 10; ++k) REQUIRE(s.admit(false, 4096, T0 + 100 * kMs) == T0 + 100 * kMs);
  // The iops bucket now holds 10 reads (+ the first write, leaked away): the eleventh read is
  // admitted at once (level 10 <= 10), the twelfth waits 10ms.
  CHECK(s.admit(false, 4096, T0 + 100 * kMs) == T0 + 100 * kMs);
  CHECK(s.admit(false, 4096, T0 + 100 * kMs) == T0 + 110 * kMs);
  // The write keeps its promise; the one after it waits for both its limits.
  CHECK(s.admit(true, 4096, T0 + 200 * kMs) == T0 + 3900 * kMs + 3'906'250);
}

TEST_CASE("a clock reading older than one seen before counts as the latest", "[throttle]") {
  ThrottleState s(config("read-iops: 10"));
  CHECK(s.admit(false, 1, T0 + 5 * kSec) == T0 + 5 * kSec);
  CHECK(s.admit(true, 1, T0 + 4 * kSec) == T0 + 5 * kSec);  // writes are unlimited, but not earlier
}

// ---- parameters ----

TEST_CASE("throttle parameters: good and bad, with the exact message and the node blamed", "[throttle][config]") {
  struct Row {
    const char* yaml;
    const char* message;  // "" when valid
    int line, column;     // of the blamed node (0-based, yaml-cpp's Mark); -1: the whole map
  };
  static const Row rows[] = {
      {"iops: 500", "", 0, 0},
      {"iops: 500\nbps: 20MiB/s", "", 0, 0},
      {"read-iops: 100\nwrite-iops: 50\nread-bps: 10MiB\nwrite-bps: 1048576", "", 0, 0},
      {"iops: 500\niops-max: 2000\niops-max-length: 2s", "", 0, 0},
      {"bps: 200MiB/s\nbps-max: 1GiB/s\nbps-max-length: 500ms", "", 0, 0},
      {"iops: 500/s\niops-size: 4KiB", "", 0, 0},
      {"iops: \"500\"", "", 0, 0},
      {"write-iops: 10\nbps: 1MB/s", "", 0, 0},
      {"read-iops: 100\nread-iops-max: 100\nread-iops-max-length: 60", "", 0, 0},

      {"iosp: 500", "unknown key 'iosp' (did you mean 'iops'?)", 0, 0},
      {"iops: 500\nbsp: 1MiB", "unknown key 'bsp' (did you mean 'bps'?)", 1, 0},
      {"IOPS: 5", "unknown key 'IOPS' (did you mean 'iops'?)", 0, 0},
      {"iops-max-len: 2s", "unknown key 'iops-max-len' (did you mean 'iops-max-length'?)", 0, 0},
      {"iops-total: 500", "unknown key 'iops-total' (did you mean 'iops'?)", 0, 0},
      {"bps-write: 5", "unknown key 'bps-write' (did you mean 'write-bps'?)", 0, 0},
      {"iops_rd_max: 5", "unknown key 'iops_rd_max' (did you mean 'read-iops-max'?)", 0, 0},
      {"throttling.bps-total-max-length: 5", "unknown key 'throttling.bps-total-max-length' (did you mean 'bps-max-length'?)", 0, 0},
      {"iops: 5\n  \ngroup: foo",
       "unknown key 'group' (known keys: iops, read-iops, write-iops, bps, read-bps, write-bps, each also with -max and "
       "-max-length, and iops-size)",
       2, 0},
      {"iops: 500\niops: 600", "duplicate key 'iops' (first on line 1)", 1, 0},

      {"iops: fast", "'iops' must be a whole number of operations per second (e.g. 500), not 'fast'", 0, 6},
      {"iops: 1.5", "'iops' must be a whole number of operations per second (e.g. 500), not '1.5'", 0, 6},
      {"iops: 1k", "'iops' must be a whole number of operations per second (e.g. 500), not '1k'", 0, 6},
      {"iops: -5", "'iops' cannot be negative (-5)", 0, 6},
      {"iops: 0", "'iops' must be greater than 0 (leave it out for no limit)", 0, 6},
      {"iops: 1000000000000001", "'iops' is too large (at most 1000000000000000)", 0, 6},
      {"iops:", "'iops' has no value", 0, 0},
      {"iops:\n  a: 1", "'iops' must be a number, not a mapping", 1, 2},
      {"bps: [1, 2]", "'bps' must be a rate, not a list", 0, 5},
      {"bps: 20Mbit/s",
       "'bps' has an unknown unit 'Mbit' in '20Mbit/s' (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB, optionally "
       "followed by /s)",
       0, 5},
      {"bps: 0.5", "'bps' must be a whole number of bytes per second, not '0.5'", 0, 5},
      {"bps: fast", "'bps' must be a rate in bytes per second (e.g. 20MiB/s or 1048576), not 'fast'", 0, 5},
      {"bps: 0MiB/s", "'bps' must be greater than 0 (leave it out for no limit)", 0, 5},
      {"bps: -1MiB", "'bps' cannot be negative (-1MiB)", 0, 5},
      {"bps: 2000TB/s", "'bps' is too large (at most 1000000000000000 bytes per second)", 0, 5},
      {"bps: 1MiB\nbps-max: 0", "'bps-max' must be greater than 0 (leave it out for no burst)", 1, 9},

      {"iops: 500\niops-max: 2000\niops-max-length: 0s", "'iops-max-length' must be greater than 0", 2, 17},
      {"iops: 500\niops-max: 2000\niops-max-length: -1s", "'iops-max-length' cannot be negative (-1s)", 2, 17},
      {"iops: 500\niops-max: 2000\niops-max-length: 2 weeks",
       "'iops-max-length' has an unknown unit 'weeks' in '2 weeks' (use us, ms, s, m, h, d; a plain number is "
       "seconds)",
       2, 17},
      {"iops: 500\niops-max: 2000\niops-max-length: soon",
       "'iops-max-length' must be a duration (e.g. 2s, 500ms, 1m; a plain number is seconds), not 'soon'", 2, 17},
      {"iops: 5\niops-max: 10\niops-max-length: 100000000000s", "'iops-max-length' is too long (at most 1000000000s)", 2,
       17},
      {"iops: 1\niops-size: 0", "'iops-size' must be greater than 0", 1, 11},
      {"iops: 1\niops-size: 4KiB/s",
       "'iops-size' has an unknown unit 'KiB/s' in '4KiB/s' (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)", 1, 11},
      {"iops: 1\niops-size: 2TiB", "'iops-size' is too large (at most 1TiB)", 1, 11},

      {"iops: 500\nread-iops: 100",
       "'read-iops' cannot be combined with 'iops': a total limit excludes the read and write limits of the same kind", 1,
       0},
      {"write-bps: 1MiB\nbps: 2MiB",
       "'write-bps' cannot be combined with 'bps': a total limit excludes the read and write limits of the same kind", 0,
       0},
      {"iops: 500\niops-max-length: 2s", "'iops-max-length' needs 'iops-max' (the burst rate it applies to)", 1, 0},
      {"bps: 1MiB\niops-max: 2000", "'iops-max' needs 'iops' (the limit a burst falls back to)", 1, 0},
      {"iops: 500\niops-max: 100",
       "'iops-max' (100) is below 'iops' (500); a burst rate must be at least the limit", 1, 10},
      {"bps: 20MiB/s\nbps-max: 10MiB/s",
       "'bps-max' (10MiB/s) is below 'bps' (20MiB/s); a burst rate must be at least the limit", 1, 9},
      {"bps: 1000000\nbps-max: 10000000\nbps-max-length: 1000000000",
       "'bps-max' times 'bps-max-length' is too large a burst (at most 1000000000000000 bytes)", 2, 16},
      {"bps: 1MiB\niops-size: 4KiB", "'iops-size' needs an iops limit ('iops', 'read-iops' or 'write-iops')", 1, 0},
      {"{}", "no limit given; set at least one of iops, read-iops, write-iops, bps, read-bps, write-bps", -1, -1},
      {"[1, 2]", "parameters must be a mapping, not a list", -1, -1},
  };
  for (const Row& row : rows) {
    INFO(row.yaml);
    YAML::Node params = YAML::Load(row.yaml);
    YAML::Node where = params;
    std::string msg = validate_throttle(params, &where);
    CHECK(msg == row.message);
    if (*row.message && row.line >= 0) {
      CHECK(where.Mark().line == row.line);
      CHECK(where.Mark().column == row.column);
    }
    if (*row.message && row.line < 0) CHECK(where.Mark().pos == params.Mark().pos);
    // Blaming a node never changes the parameters (a yaml-cpp Node assignment would).
    CHECK(YAML::Dump(params) == YAML::Dump(YAML::Load(row.yaml)));
    // parse agrees with validate.
    ThrottleConfig cfg;
    CHECK(parse_throttle(params, &cfg) == msg);
  }

  // No parameters at all: the whole node is blamed (the framework points at the filter's name).
  YAML::Node none;
  YAML::Node where = none;
  CHECK(validate_throttle(none, &where) ==
        "no limit given; set at least one of iops, read-iops, write-iops, bps, read-bps, write-bps");
  CHECK(validate_throttle(YAML::Load("iops: 0"), nullptr) == "'iops' must be greater than 0 (leave it out for no limit)");
}

TEST_CASE("throttle parameters parse into limits and describe() reads back", "[throttle][config]") {
  ThrottleConfig c = config("iops: 500\niops-max: 2000\niops-max-length: 2s\nread-bps: 20MiB/s\nwrite-bps: 1000000\n"
                            "write-bps-max: 3MB\nwrite-bps-max-length: 1500ms\niops-size: 4KiB");
  CHECK(c.limit[kOpsTotal] == Limit{500, 2000, 2 * kSec});
  CHECK(c.limit[kBpsRead] == Limit{20 << 20, 0, kSec});
  CHECK(c.limit[kBpsWrite] == Limit{1000000, 3000000, 1500 * kMs});
  CHECK(c.limit[kBpsTotal] == Limit{});
  CHECK(c.iops_size == 4096);
  const std::string d = describe_throttle(c);
  CHECK(d == "iops=500 iops-max=2000 iops-max-length=2s read-bps=20MiB/s write-bps=1MB/s write-bps-max=3MB/s "
             "write-bps-max-length=1500ms iops-size=4KiB");
  std::string yaml = d;
  for (char& ch : yaml) ch = ch == ' ' ? '\n' : ch;
  for (size_t p; (p = yaml.find('=')) != std::string::npos;) yaml.replace(p, 1, ": ");
  CHECK(config(yaml.c_str()) == c);
  CHECK(describe_throttle(config("bps: 1536")) == "bps=1536B/s");
  CHECK(describe_throttle(config("iops: 5\niops-max: 6\niops-max-length: 90")) == "iops=5 iops-max=6 iops-max-length=90s");
}

TEST_CASE("throttle_keys lists every accepted key once", "[throttle][config]") {
  const std::vector<std::string_view> expect = {
      "iops",      "iops-max",      "iops-max-length",      "read-iops",  "read-iops-max",  "read-iops-max-length",
      "write-iops", "write-iops-max", "write-iops-max-length", "bps",        "bps-max",        "bps-max-length",
      "read-bps",  "read-bps-max",  "read-bps-max-length",  "write-bps",  "write-bps-max",  "write-bps-max-length",
      "iops-size"};
  CHECK(throttle_keys() == expect);
  for (std::string_view k : throttle_keys()) {
    // Each listed key is accepted by validation (with whatever it needs beside it).
    std::string yaml = std::string(k) + ": " + (k.find("length") != k.npos ? "2s" : "1000");
    if (k.find("max") != k.npos || k == "iops-size") {
      std::string base = std::string(k.substr(0, k.find("-max")));
      if (k == "iops-size") base = "iops";
      yaml += "\n" + base + ": 1000";
      if (k.find("length") != k.npos) yaml += "\n" + base + "-max: 1000";
    }
    INFO(yaml);
    CHECK(validate_throttle(YAML::Load(yaml), nullptr) == "");
  }
}

// ---- the adapter ----

TEST_CASE("the throttle filter passes reads and writes down and counts them", "[throttle][filter]") {
  const FilterInfo* info = Registry::instance().find("throttle");
  REQUIRE(info != nullptr);
  CHECK(info->cls == FilterClass::Throttle);
  CHECK(info->api_version == kFilterApiVersion);
  CHECK(info->create(YAML::Load("iops: 0")) == nullptr);

  testing::MemLayer bottom;
  Chain chain;
  std::string err;
  // A limit far above what the test does: nothing waits.
  REQUIRE(Chain::build(Registry::instance(), {FilterSpec{"throttle", YAML::Load("iops: 1000000\nbps: 1GiB/s")}}, &bottom,
                       &chain, &err)
              .ok());
  CHECK(chain.describe() == "throttle(iops=1000000 bps=1GiB/s)");
  Layer* top = chain.top();
  REQUIRE(top->write(Io{}, "hello", 5, 3).ok());
  char buf[8] = {};
  size_t got = 0;
  REQUIRE(top->read(Io{}, buf, 8, 0, &got).ok());
  CHECK(got == 8);
  CHECK(std::string(buf + 3, 5) == "hello");
  REQUIRE(top->sync(Io{}, false).ok());  // not throttled, passed down
  CHECK(bottom.syncs == 1);
  std::string stats;
  chain.for_each([&](const Filter& f, const FilterInfo&) { stats = f.stats_json(); });
  CHECK(stats ==
        "{\"delayed\":0,\"wait_ns\":0,\"queued\":0,\"reads\":1,\"writes\":1,\"read_bytes\":8,\"write_bytes\":5}");

  CHECK(Chain::build(Registry::instance(), {FilterSpec{"throttle", YAML::Load("iosp: 5")}}, &bottom, &chain, &err).err ==
        EINVAL);
  CHECK(err == "throttle: unknown key 'iosp' (did you mean 'iops'?)");
}

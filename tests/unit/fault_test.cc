// The fault-injection layer: plan parsing, counted failures, and the power cut that undoes
// unsynced writes.
#include <catch2/catch.hpp>

#include "fault.h"
#include "mem_layer.h"

using namespace iofilterfs;

TEST_CASE("fault plans parse, and bad ones say what is wrong", "[fault]") {
  FaultPlan p;
  REQUIRE(parse_fault_plan("fail=write:EIO:2:1; delay=read+sync:20ms; track", &p).empty());
  REQUIRE(p.fails.size() == 1);
  CHECK(p.fails[0].ops == kFaultWrite);
  CHECK(p.fails[0].err == EIO);
  CHECK(p.fails[0].count == 2);
  CHECK(p.fails[0].skip == 1);
  REQUIRE(p.delays.size() == 1);
  CHECK(p.delays[0].ops == (kFaultRead | kFaultSync));
  CHECK(p.delays[0].usec == 20000);
  CHECK(p.track);

  REQUIRE(parse_fault_plan("fail=all:28", &p).empty());
  CHECK(p.fails[0].ops == kFaultAll);
  CHECK(p.fails[0].err == ENOSPC);
  CHECK(p.fails[0].count == -1);

  CHECK(parse_fault_plan("fail=write", &p) == "fail=OPS:ERRNO[:COUNT[:SKIP]] expected, got 'fail=write'");
  CHECK(parse_fault_plan("fail=scribble:EIO", &p) ==
        "unknown operation 'scribble' (all, read, write, sync, fallocate, resize)");
  CHECK(parse_fault_plan("fail=read:EWHAT", &p) == "unknown errno 'EWHAT'");
  CHECK(parse_fault_plan("delay=read:5parsecs", &p) ==
        "delay: '5parsecs': unknown duration unit 'parsecs' (use us, ms, s, m, h, d)");
  CHECK(parse_fault_plan("explode", &p) == "unknown fault clause 'explode' (fail=, delay=, track, powercut, clear)");
}

TEST_CASE("counted failures skip, fail, then pass", "[fault]") {
  testing::MemLayer mem;
  FaultLayer f;
  f.set_next(&mem);
  FaultPlan p;
  REQUIRE(parse_fault_plan("fail=write:ENOSPC:2:1", &p).empty());
  REQUIRE(f.apply(p).ok());
  CHECK(f.write(Io{}, "a", 1, 0).ok());            // skipped
  CHECK(f.write(Io{}, "b", 1, 1).err == ENOSPC);   // failed
  CHECK(f.write(Io{}, "c", 1, 2).err == ENOSPC);   // failed
  CHECK(f.write(Io{}, "d", 1, 3).ok());            // count used up
  char buf[4];
  size_t got;
  CHECK(f.read(Io{}, buf, 4, 0, &got).ok());       // reads were never targeted
  CHECK(std::string(mem.data.begin(), mem.data.end()) == std::string("a\0\0d", 4));
}

TEST_CASE("a power cut undoes every write since the last sync and then fails everything", "[fault]") {
  testing::MemLayer mem;
  FaultLayer f;
  f.set_next(&mem);
  FaultPlan p;
  REQUIRE(parse_fault_plan("track", &p).empty());
  REQUIRE(f.apply(p).ok());
  REQUIRE(f.write(Io{}, "AAAA", 4, 0).ok());
  REQUIRE(f.sync(Io{}, false).ok());               // AAAA is durable
  REQUIRE(f.write(Io{}, "BB", 2, 1).ok());         // overwrite inside
  REQUIRE(f.write(Io{}, "CCCC", 4, 3).ok());       // overwrite and extend
  REQUIRE(f.resize(Io{}, 12).ok());                // grow
  CHECK(mem.data.size() == 12);

  REQUIRE(parse_fault_plan("powercut", &p).empty());
  REQUIRE(f.apply(p).ok());
  CHECK(std::string(mem.data.begin(), mem.data.end()) == "AAAA");
  char buf[4];
  size_t got;
  CHECK(f.read(Io{}, buf, 4, 0, &got).err == EIO);
  CHECK(f.write(Io{}, "x", 1, 0).err == EIO);

  REQUIRE(parse_fault_plan("clear", &p).empty());
  REQUIRE(f.apply(p).ok());
  CHECK(f.read(Io{}, buf, 4, 0, &got).ok());
  CHECK(std::string(buf, 4) == "AAAA");
}

#include <catch2/catch.hpp>

#include "units.h"

using namespace iofilterfs;

TEST_CASE("sizes take binary and decimal units", "[units]") {
  uint64_t b = 0;
  CHECK(parse_size("4096", &b).empty());
  CHECK(b == 4096);
  CHECK(parse_size("64KiB", &b).empty());
  CHECK(b == 65536);
  CHECK(parse_size("20GiB", &b).empty());
  CHECK(b == 20ull << 30);
  CHECK(parse_size("1.5MiB", &b).empty());
  CHECK(b == 1572864);
  CHECK(parse_size("2MB", &b).empty());
  CHECK(b == 2000000);
  CHECK(parse_size("12 parsecs", &b) == "'12 parsecs': unknown size unit 'parsecs' (use B, KiB, MiB, GiB, TiB)");
  CHECK(parse_size("lots", &b) == "'lots' is not a size (e.g. 4096, 64KiB, 20GiB)");
  CHECK(parse_size("0.3B", &b) == "'0.3B' is not a whole number of bytes");
}

TEST_CASE("durations take us to days, a bare number is seconds", "[units]") {
  uint64_t us = 0;
  CHECK(parse_duration("250ms", &us).empty());
  CHECK(us == 250000);
  CHECK(parse_duration("5s", &us).empty());
  CHECK(us == 5000000);
  CHECK(parse_duration("24h", &us).empty());
  CHECK(us == 86400000000ull);
  CHECK(parse_duration("3", &us).empty());
  CHECK(us == 3000000);
  CHECK(parse_duration("5 fortnights", &us) ==
        "'5 fortnights': unknown duration unit 'fortnights' (use us, ms, s, m, h, d)");
}

TEST_CASE("sizes format for people", "[units]") {
  CHECK(format_size(512) == "512B");
  CHECK(format_size(1536) == "1.5KiB");
  CHECK(format_size(20ull << 30) == "20.0GiB");
}

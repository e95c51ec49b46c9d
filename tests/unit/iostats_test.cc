// The latency histogram: bucket edges and percentiles, exactly.
#include <catch2/catch.hpp>

#include "iostats.h"

using namespace iofilterfs;

TEST_CASE("histogram buckets are log-linear with four steps per power of two", "[stats]") {
  CHECK(LatencyHistogram::bucket_of(0) == 0);
  CHECK(LatencyHistogram::bucket_of(255) == 0);
  CHECK(LatencyHistogram::bucket_of(256) == 1);
  CHECK(LatencyHistogram::bucket_of(319) == 1);
  CHECK(LatencyHistogram::bucket_of(320) == 2);
  CHECK(LatencyHistogram::bucket_of(511) == 4);
  CHECK(LatencyHistogram::bucket_of(512) == 5);
  CHECK(LatencyHistogram::bucket_upper(1) == 320);
  CHECK(LatencyHistogram::bucket_upper(4) == 512);
  // Every value is below its bucket's upper edge and at or above the previous one.
  for (uint64_t v : {300ull, 1000ull, 123456ull, 99999999ull}) {
    int b = LatencyHistogram::bucket_of(v);
    CHECK(v < LatencyHistogram::bucket_upper(b));
    CHECK(v >= LatencyHistogram::bucket_upper(b - 1));
  }
  CHECK(LatencyHistogram::bucket_of(~0ull) == LatencyHistogram::kBuckets - 1);
}

TEST_CASE("percentiles come from the bucket holding the rank", "[stats]") {
  LatencyHistogram h;
  CHECK(h.percentile(50) == 0);
  for (int i = 0; i < 90; ++i) h.record(1000);     // bucket [896, 1024)
  for (int i = 0; i < 10; ++i) h.record(1000000);  // bucket [917504, 1048576)
  CHECK(h.count() == 100);
  CHECK(h.percentile(50) == 1024);
  CHECK(h.percentile(90) == 1024);
  CHECK(h.percentile(91) == 1048576);
  CHECK(h.percentile(100) == 1048576);
}

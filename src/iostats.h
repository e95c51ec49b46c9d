// Per-disk I/O counters and a latency histogram, updated lock-free on the data path.
//
// The histogram is log-linear (like HdrHistogram with 2 significant bits): bucket b covers
// [2^(b/4) .. 2^((b+1)/4)) microseconds roughly, so percentiles are within ~19% and an update
// is one atomic add. Pure and clock-free: callers pass the measured latency.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace iofilterfs {

class LatencyHistogram {
 public:
  static constexpr int kBuckets = 160;
  void record(uint64_t nsec);
  // p in [0, 100]; the upper bound of the bucket holding that rank, in nanoseconds; 0 if empty.
  uint64_t percentile(double p) const;
  uint64_t count() const;

  static int bucket_of(uint64_t nsec);
  static uint64_t bucket_upper(int b);

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
};

struct IoStats {
  std::atomic<uint64_t> reads{0}, writes{0}, read_bytes{0}, write_bytes{0};
  std::atomic<uint64_t> syncs{0}, trims{0}, errors{0};
  LatencyHistogram read_lat, write_lat;

  std::string json() const;
};

}  // namespace iofilterfs

#include "iostats.h"

#include <bit>
#include <cmath>
#include <cstdio>

namespace iofilterfs {

// Bucket index: 4 buckets per power of two of the latency in ns, starting at 256 ns.
int LatencyHistogram::bucket_of(uint64_t nsec) {
  if (nsec < 256) return 0;
  int msb = 63 - std::countl_zero(nsec);          // >= 8
  int sub = static_cast<int>((nsec >> (msb - 2)) & 3);  // the two bits below the top one
  int b = (msb - 8) * 4 + sub + 1;
  return b < kBuckets ? b : kBuckets - 1;
}

uint64_t LatencyHistogram::bucket_upper(int b) {
  if (b == 0) return 256;
  int msb = (b - 1) / 4 + 8, sub = (b - 1) % 4;
  // Values in this bucket are (4+sub) << (msb-2) .. (5+sub) << (msb-2) - 1.
  return (uint64_t{5} + static_cast<uint64_t>(sub)) << (msb - 2);
}

void LatencyHistogram::record(uint64_t nsec) {
  counts_[bucket_of(nsec)].fetch_add(1, std::memory_order_relaxed);
}

uint64_t LatencyHistogram::count() const {
  uint64_t n = 0;
  for (const auto& c : counts_) n += c.load(std::memory_order_relaxed);
  return n;
}

uint64_t LatencyHistogram::percentile(double p) const {
  uint64_t snap[kBuckets], total = 0;
  for (int i = 0; i < kBuckets; ++i) total += snap[i] = counts_[i].load(std::memory_order_relaxed);
  if (total == 0) return 0;
  // The smallest rank r (1-based) with r >= p% of total.
  uint64_t rank = static_cast<uint64_t>(std::ceil(p * static_cast<double>(total) / 100.0));
  if (rank == 0) rank = 1;
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += snap[i];
    if (seen >= rank) return bucket_upper(i);
  }
  return bucket_upper(kBuckets - 1);
}

std::string IoStats::json() const {
  auto lat = [](const LatencyHistogram& h) {
    char b[160];
    std::snprintf(b, sizeof b, "{\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}", h.percentile(50) / 1e3,
                  h.percentile(99) / 1e3, h.percentile(99.9) / 1e3);
    return std::string(b);
  };
  char b[400];
  std::snprintf(b, sizeof b,
                "\"reads\":%llu,\"writes\":%llu,\"read_bytes\":%llu,\"write_bytes\":%llu,\"syncs\":%llu,"
                "\"trims\":%llu,\"errors\":%llu,",
                static_cast<unsigned long long>(reads.load()), static_cast<unsigned long long>(writes.load()),
                static_cast<unsigned long long>(read_bytes.load()),
                static_cast<unsigned long long>(write_bytes.load()), static_cast<unsigned long long>(syncs.load()),
                static_cast<unsigned long long>(trims.load()), static_cast<unsigned long long>(errors.load()));
  return std::string(b) + "\"read_latency\":" + lat(read_lat) + ",\"write_latency\":" + lat(write_lat);
}

}  // namespace iofilterfs

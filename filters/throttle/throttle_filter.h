// The throttle filter (class throttle): per-disk IOPS and bandwidth limits with QEMU's
// semantics. A thin adapter: the scheduling is ThrottleState (bucket.h), the parameters are
// params.h. For each read and write it asks the scheduler, under one short lock, when the
// request may start, sleeps until then on the monotonic clock without holding any lock, and
// passes the request down. Every other operation passes through untouched (not charged, as in
// QEMU, which throttles only reads and writes).
//
// State is per disk (one filter instance per disk's chain). Threads: any number of FUSE workers
// call read/write concurrently; mu_ guards state_ only and is never held while sleeping or
// calling the layer below. The counters are atomics, read without the lock by stats_json().
#pragma once

#include <atomic>
#include <mutex>
#include <string>

#include "bucket.h"
#include "filter.h"

namespace iofilterfs {

class ThrottleFilter : public Filter {
 public:
  explicit ThrottleFilter(const throttle::ThrottleConfig& cfg);

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;

  // {"delayed":N,"wait_ns":N,"queued":N,"reads":N,"writes":N,"read_bytes":N,"write_bytes":N}:
  // requests that had to wait, their total scheduled wait, requests waiting now, and the
  // requests and bytes passed down.
  std::string stats_json() const override;
  // The limits, e.g. "iops=500 bps=20MiB/s".
  std::string describe() const override { return describe_; }

 private:
  // Waits until the request may start.
  void admit(bool is_write, uint64_t bytes);

  std::mutex mu_;                  // guards state_; a leaf lock
  throttle::ThrottleState state_;  // under mu_
  const std::string describe_;
  std::atomic<uint64_t> delayed_{0}, wait_ns_{0}, queued_{0};
  std::atomic<uint64_t> reads_{0}, writes_{0}, read_bytes_{0}, write_bytes_{0};
};

// Adds "throttle" to the registry.
void register_throttle(Registry& r);

}  // namespace iofilterfs

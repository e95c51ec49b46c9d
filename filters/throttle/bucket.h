// The throttle's algorithm: QEMU's leaky buckets (util/throttle.c), as a pure scheduler.
//
// What it limits. Six limits, each optional: operations per second and bytes per second, either
// in total or separately for reads and for writes (a total limit and a read/write limit of the
// same kind are exclusive, as in QEMU). Every limit is one leaky bucket. A request pours its
// cost into each bucket it is charged to (bytes into the bps buckets; one operation, or
// size/iops-size operations for a request larger than iops-size, into the iops buckets), and
// each bucket leaks at its limit, `avg` per second:
//
//            request cost
//                 │
//                 ▼
//          │             │ ◄── size: max × max-length   (avg / 10 when there is no max)
//          │~~~~~~~~~~~~~│ ◄── level
//          │▒▒▒▒▒▒▒▒▒▒▒▒▒│
//          └──────┬──────┘
//                 ▼ leaks at avg per second
//
// A request may start while the level is at or below the size (checked before its cost is
// added, so one request may overshoot: QEMU's rule). A disk that has been idle finds its
// buckets empty and may run faster than avg until they fill: that is the burst. With `max` set
// the size is max × max-length, so after idling a disk may run at up to `max` for about
// max-length (a little longer, since the bucket leaks meanwhile), then settles at avg. With
// max-length above one second a second bucket, of size max / 10 leaking at `max`, caps the rate
// during the burst at `max`; at one second or less QEMU leaves the burst rate uncapped and so do
// we. Without `max` the bucket holds a tenth of a second of avg, so short bursts are smoothed
// rather than each request being spaced exactly. A long idle period empties a bucket and no
// more: a disk never saves up more than one bucketful.
//
// How it schedules. QEMU checks a request against the buckets when it arrives and, if it must
// wait, re-checks it when a timer fires. Here admit() answers at arrival, exactly, the time at
// which the request may start, and charges it at that time; the caller sleeps until then. It
// is the "virtual scheduling" form of the same meter: a request of one direction starts at the
// earliest time t that is
//   - no earlier than its arrival and than the start of the previous request of its direction
//     (requests are served first in, first out per direction, as QEMU queues them), and
//   - at which every bucket it is charged to is at or below its size, counting every request
//     admitted before it whose start time is at or before t.
// The read and write buckets see only their own direction, so a read never waits behind a
// write when only read/write limits are set. The total buckets are shared: a request pours into
// them at its own start time, which may lie before the start of a request of the other
// direction that was admitted earlier but held back by its own limits; that request keeps the
// time it was promised. A total bucket may therefore overshoot its size by one such request,
// which the requests after it pay back; a request that was held back by the total bucket itself
// is never overtaken (ties go to the earlier request).
//
// Numbers are exact: levels are kept in units of (cost × 10^9 × iops-size) in 128 bits, so a
// bucket leaks a whole number of units per nanosecond and every wait is a ceiling division.
// Tests can therefore check start times to the nanosecond.
//
// Threads: none of this is thread-safe; the adapter (throttle_filter.h) holds one mutex around
// admit(). Nothing here reads a clock, sleeps or allocates except to grow the list of pending
// charges to a new high-water mark.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace iofilterfs::throttle {

inline constexpr uint64_t kNsPerSec = 1'000'000'000;
// QEMU's THROTTLE_VALUE_MAX: the largest rate, and the largest burst (max × max-length).
inline constexpr uint64_t kValueMax = 1'000'000'000'000'000;

// The six buckets, in QEMU's BucketType order.
enum Bucket : int { kBpsTotal, kBpsRead, kBpsWrite, kOpsTotal, kOpsRead, kOpsWrite, kBucketCount };

// One limit: QEMU's LeakyBucket avg / max / burst_length.
struct Limit {
  uint64_t avg = 0;                      // bytes or operations per second; 0: no limit
  uint64_t max = 0;                      // burst rate; 0: no burst beyond avg / 10
  uint64_t max_length_ns = kNsPerSec;    // how long a burst at max may last
  bool operator==(const Limit&) const = default;
};

struct ThrottleConfig {
  Limit limit[kBucketCount];
  uint64_t iops_size = 0;  // bytes; a larger request counts as size / iops_size operations
  bool any() const;        // some limit is set
  bool operator==(const ThrottleConfig&) const = default;
};

using u128 = unsigned __int128;

// One leaky bucket with its burst bucket. Quantities are in "q": cost × 10^9 × scale, where
// scale is iops-size for the iops buckets when it is set (else 1), so that the bucket leaks
// avg × scale q per nanosecond exactly.
class LeakyBucket {
 public:
  LeakyBucket() = default;
  LeakyBucket(const Limit& l, uint64_t scale);
  bool on() const { return leak_ != 0; }
  // Lets the bucket leak up to time t (no-op for t at or before the last leak).
  void leak_to(uint64_t t);
  // The earliest time, not before the last leak, at which a request may start if nothing more
  // is poured in: both the level and the burst level are at or below their sizes.
  uint64_t ready_at() const;
  void pour(u128 q);
  uint64_t at() const { return at_; }

 private:
  u128 leak_ = 0, size_ = 0;              // per ns; main bucket size
  u128 burst_leak_ = 0, burst_size_ = 0;  // burst bucket, used when burst_ (max-length > 1 s)
  bool burst_ = false;
  u128 level_ = 0, burst_level_ = 0;
  uint64_t at_ = 0;                       // time of the last leak
};

// The per-disk scheduler. One instance per throttled disk, behind the adapter's mutex.
class ThrottleState {
 public:
  explicit ThrottleState(const ThrottleConfig& cfg = {});

  // Admits a request of `bytes` arriving at now_ns (any monotonic clock, in ns; a value below
  // one seen before counts as the latest one seen) and charges it. Returns the absolute time,
  // >= now_ns, at which it may start.
  uint64_t admit(bool is_write, uint64_t bytes, uint64_t now_ns);

  // The time admit() would return for a request of this direction arriving at now_ns, without
  // admitting it (a request's size does not matter: buckets are checked before it pours in).
  // For a caller that admits only what may start at once (the group queue, group.h).
  uint64_t ready_at(bool is_write, uint64_t now_ns) const;

  const ThrottleConfig& config() const { return cfg_; }
  // Charges to the total buckets not folded into them yet (requests promised a start after
  // the other direction's latest start); for tests.
  size_t pending() const { return count_; }

 private:
  struct Charge {
    uint64_t t;
    uint64_t bytes;
  };
  u128 cost(int bucket, uint64_t bytes) const;
  void pour(LeakyBucket* b, int bucket, uint64_t t, uint64_t bytes) const;
  // The earliest time >= t at which both total buckets allow a request, folding into *sim the
  // pending charges due by then (*next: the first pending charge not folded yet).
  uint64_t total_ready(uint64_t t, LeakyBucket* sim, size_t* next) const;
  const Charge& pending_at(size_t i) const { return ring_[(head_ + i) % ring_.size()]; }
  void push_pending(Charge c);
  void pop_pending() {
    head_ = (head_ + 1) % ring_.size();
    --count_;
  }

  ThrottleConfig cfg_;
  LeakyBucket b_[kBucketCount];
  bool shared_ = false;        // a total bucket is on
  uint64_t now_ = 0;           // the latest now_ns seen
  uint64_t tail_[2] = {0, 0};  // start of the latest admitted read / write
  // Charges to the total buckets with a start later than the other direction's latest start
  // (and than now): a request of the other direction may still start before them. They are
  // always of one direction and in start order. A ring that grows, never shrinks.
  std::vector<Charge> ring_;
  size_t head_ = 0, count_ = 0;
};

}  // namespace iofilterfs::throttle

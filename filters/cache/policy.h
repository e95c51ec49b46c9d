// The cache's small decisions, pure and with the time passed in (no clocks, no sleeping), so
// their tests are exact:
//
//   SequentialCutoff  bcache's sequential_cutoff: a stream of requests that each start where an
//                     earlier one ended is sequential; once a stream has moved `cutoff` bytes,
//                     its further requests bypass the cache (a backup or a copy would otherwise
//                     wash the working set out). bcache tracks streams per task; a FUSE daemon
//                     does not see tasks, so a small table of recent stream ends stands in for
//                     them (several interleaved streams are each recognised).
//   Watermarks        dm-writecache's high/low marks: destaging starts when the dirty share of
//                     the cache reaches `high` percent and runs until it is down to `low`.
//   RateMeter         bytes per second over the last whole second (the destage rate in stats).
#pragma once

#include <array>
#include <cstdint>

namespace iofilterfs::cache {

class SequentialCutoff {
 public:
  static constexpr int kStreams = 16;
  // A stream idle for longer than this is forgotten (bcache: 5 s per task).
  static constexpr uint64_t kIdleNs = 5'000'000'000ull;

  explicit SequentialCutoff(uint64_t cutoff) : cutoff_(cutoff) {}
  // Records a request; true when it should bypass the cache. cutoff 0: never.
  bool observe(uint64_t off, uint64_t len, uint64_t now_ns);
  uint64_t cutoff() const { return cutoff_; }

 private:
  struct Stream {
    uint64_t end = UINT64_MAX;
    uint64_t bytes = 0;
    uint64_t last_ns = 0;
  };
  uint64_t cutoff_;
  std::array<Stream, kStreams> s_{};
};

class Watermarks {
 public:
  Watermarks(unsigned high_pct, unsigned low_pct) : high_(high_pct), low_(low_pct) {}
  // Updates and returns whether the destager should run, given dirty slots out of total.
  bool update(uint64_t dirty, uint64_t total);
  bool active() const { return active_; }
  // Whether dirty slots out of total are at or above the high mark.
  bool above_high(uint64_t dirty, uint64_t total) const { return total > 0 && dirty * 100 >= high_ * total; }
  unsigned high() const { return high_; }
  unsigned low() const { return low_; }

 private:
  unsigned high_, low_;
  bool active_ = false;
};

class RateMeter {
 public:
  void add(uint64_t bytes, uint64_t now_ns);
  // Bytes in the last whole second before now (0 when idle for longer).
  uint64_t per_second(uint64_t now_ns) const;

 private:
  uint64_t window_ = 0;  // now_ns / 1e9 of the current window
  uint64_t cur_ = 0, prev_ = 0;
};

}  // namespace iofilterfs::cache

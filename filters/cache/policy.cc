#include "cache/policy.h"

namespace iofilterfs::cache {

bool SequentialCutoff::observe(uint64_t off, uint64_t len, uint64_t now_ns) {
  if (cutoff_ == 0) return false;
  Stream* oldest = &s_[0];
  for (Stream& s : s_) {
    if (s.end == off && now_ns - s.last_ns <= kIdleNs) {
      s.end = off + len;
      s.bytes += len;
      s.last_ns = now_ns;
      return s.bytes >= cutoff_;
    }
    if (s.last_ns < oldest->last_ns) oldest = &s;
  }
  // A new stream replaces the least recently used one.
  *oldest = Stream{off + len, len, now_ns};
  return len >= cutoff_;
}

bool Watermarks::update(uint64_t dirty, uint64_t total) {
  if (total == 0) return active_ = false;
  if (!active_ && dirty * 100 >= high_ * total) active_ = true;
  else if (active_ && dirty * 100 <= low_ * total) active_ = false;
  return active_;
}

void RateMeter::add(uint64_t bytes, uint64_t now_ns) {
  const uint64_t w = now_ns / 1'000'000'000ull;
  if (w != window_) {
    prev_ = w == window_ + 1 ? cur_ : 0;
    cur_ = 0;
    window_ = w;
  }
  cur_ += bytes;
}

uint64_t RateMeter::per_second(uint64_t now_ns) const {
  const uint64_t w = now_ns / 1'000'000'000ull;
  if (w == window_) return prev_;
  if (w == window_ + 1) return cur_;
  return 0;
}

}  // namespace iofilterfs::cache

// QEMU's leaky-bucket throttling as an exact scheduler; the idea is described in bucket.h.
#include "bucket.h"

#include <algorithm>
#include <limits>

namespace iofilterfs::throttle {
namespace {

constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();

uint64_t ceil_div_sat(u128 a, u128 b) {
  u128 q = (a + b - 1) / b;
  return q > kNever ? kNever : static_cast<uint64_t>(q);
}

uint64_t add_sat(uint64_t a, uint64_t b) { return a > kNever - b ? kNever : a + b; }

}  // namespace

bool ThrottleConfig::any() const {
  for (const Limit& l : limit)
    if (l.avg) return true;
  return false;
}

LeakyBucket::LeakyBucket(const Limit& l, uint64_t scale) {
  if (!l.avg) return;
  leak_ = u128(l.avg) * scale;
  if (l.max) {
    // max × max-length seconds of cost, in q = cost × 10^9 × scale.
    size_ = u128(l.max) * l.max_length_ns * scale;
    if (l.max_length_ns > kNsPerSec) {
      burst_ = true;
      burst_leak_ = u128(l.max) * scale;
      burst_size_ = u128(l.max) * (kNsPerSec / 10) * scale;
    }
  } else {
    size_ = u128(l.avg) * (kNsPerSec / 10) * scale;  // a tenth of a second at avg
  }
}

void LeakyBucket::leak_to(uint64_t t) {
  if (t <= at_) return;
  u128 d = t - at_;
  u128 drop = leak_ * d;
  level_ = level_ > drop ? level_ - drop : 0;
  if (burst_) {
    drop = burst_leak_ * d;
    burst_level_ = burst_level_ > drop ? burst_level_ - drop : 0;
  }
  at_ = t;
}

uint64_t LeakyBucket::ready_at() const {
  uint64_t wait = 0;
  if (level_ > size_) wait = ceil_div_sat(level_ - size_, leak_);
  if (burst_ && burst_level_ > burst_size_) wait = std::max(wait, ceil_div_sat(burst_level_ - burst_size_, burst_leak_));
  return add_sat(at_, wait);
}

void LeakyBucket::pour(u128 q) {
  level_ += q;
  if (burst_) burst_level_ += q;
}

ThrottleState::ThrottleState(const ThrottleConfig& cfg) : cfg_(cfg) {
  for (int i = 0; i < kBucketCount; ++i) {
    bool ops = i >= kOpsTotal;
    b_[i] = LeakyBucket(cfg.limit[i], ops && cfg.iops_size ? cfg.iops_size : 1);
  }
  shared_ = b_[kBpsTotal].on() || b_[kOpsTotal].on();
}

// QEMU's throttle_account: bytes into the bps buckets; into the iops buckets one operation, or
// size / iops-size operations when the request is larger than iops-size.
u128 ThrottleState::cost(int bucket, uint64_t bytes) const {
  if (bucket < kOpsTotal) return u128(bytes) * kNsPerSec;
  if (!cfg_.iops_size) return kNsPerSec;
  return u128(std::max(bytes, cfg_.iops_size)) * kNsPerSec;  // scale is iops_size
}

void ThrottleState::pour(LeakyBucket* b, int bucket, uint64_t t, uint64_t bytes) const {
  b->leak_to(t);
  b->pour(cost(bucket, bytes));
}

uint64_t ThrottleState::total_ready(uint64_t t, LeakyBucket* sim, size_t* next) const {
  for (;;) {
    // A pending charge at or before t counts against this request (ties go to the earlier one).
    for (; *next < count_ && pending_at(*next).t <= t; ++*next) {
      const Charge& c = pending_at(*next);
      for (int i : {kBpsTotal, kOpsTotal})
        if (sim[i].on()) pour(&sim[i], i, c.t, c.bytes);
    }
    uint64_t ready = t;
    for (int i : {kBpsTotal, kOpsTotal}) {
      if (!sim[i].on()) continue;
      sim[i].leak_to(t);
      ready = std::max(ready, sim[i].ready_at());
    }
    if (ready == t) return t;
    // Not ready before `ready` unless more is poured in first; the next pending charge may be.
    if (*next < count_ && pending_at(*next).t <= ready) t = pending_at(*next).t;
    else t = ready;
  }
}

uint64_t ThrottleState::admit(bool is_write, uint64_t bytes, uint64_t now_ns) {
  now_ = std::max(now_, now_ns);
  const int dir = is_write ? 1 : 0;
  const int own[2] = {kBpsRead + dir, kOpsRead + dir};
  uint64_t t = std::max(now_, tail_[dir]);

  // The totals are evaluated on copies, so the pending charges can be folded in up to t
  // without committing them (the other direction may still start before some of them).
  LeakyBucket sim[kBucketCount];
  sim[kBpsTotal] = b_[kBpsTotal];
  sim[kOpsTotal] = b_[kOpsTotal];
  size_t next = 0;
  for (;;) {
    // Own-direction buckets only leak from here on, so their readiness is monotonic in t.
    uint64_t u = t;
    for (int i : own) {
      if (!b_[i].on()) continue;
      b_[i].leak_to(t);
      u = std::max(u, b_[i].ready_at());
    }
    if (shared_) u = total_ready(u, sim, &next);
    if (u == t) break;
    t = u;
  }

  for (int i : own)
    if (b_[i].on()) pour(&b_[i], i, t, bytes);
  tail_[dir] = t;

  if (shared_) {
    // Fold into the real totals every charge no future request can precede: those at or
    // before the horizon min over directions of max(now, tail).
    const uint64_t horizon = std::min(t, std::max(now_, tail_[1 - dir]));
    auto fold = [&](const Charge& c) {
      for (int i : {kBpsTotal, kOpsTotal})
        if (b_[i].on()) pour(&b_[i], i, c.t, c.bytes);
    };
    while (count_ && pending_at(0).t <= horizon) {
      fold(pending_at(0));
      pop_pending();
    }
    // Either this request is within the horizon (then everything before it is folded and it
    // goes straight in), or it is later than everything pending (all of its own direction).
    if (t <= horizon) fold(Charge{t, bytes});
    else push_pending(Charge{t, bytes});
  }
  return t;
}

uint64_t ThrottleState::ready_at(bool is_write, uint64_t now_ns) const {
  const int dir = is_write ? 1 : 0;
  uint64_t t = std::max({now_, now_ns, tail_[dir]});
  // admit()'s search on copies of every bucket it reads, without the charge at the end.
  LeakyBucket own[2] = {b_[kBpsRead + dir], b_[kOpsRead + dir]};
  LeakyBucket sim[kBucketCount];
  sim[kBpsTotal] = b_[kBpsTotal];
  sim[kOpsTotal] = b_[kOpsTotal];
  size_t next = 0;
  for (;;) {
    uint64_t u = t;
    for (LeakyBucket& b : own) {
      if (!b.on()) continue;
      b.leak_to(t);
      u = std::max(u, b.ready_at());
    }
    if (shared_) u = total_ready(u, sim, &next);
    if (u == t) return t;
    t = u;
  }
}

void ThrottleState::push_pending(Charge c) {
  if (count_ == ring_.size()) {
    std::vector<Charge> grown;
    grown.reserve(std::max<size_t>(16, ring_.size() * 2));
    for (size_t i = 0; i < count_; ++i) grown.push_back(pending_at(i));
    grown.resize(grown.capacity());
    ring_.swap(grown);
    head_ = 0;
  }
  ring_[(head_ + count_) % ring_.size()] = c;
  ++count_;
}

}  // namespace iofilterfs::throttle

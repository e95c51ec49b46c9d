// A byte-range lock: a request holds [off, off+len) from before its local write until its
// change is in the journal or on the target, so two requests whose ranges overlap reach the
// image and the replica (journal or target) in the same order; requests that do not overlap
// never wait for each other.
//
// Why: group commit publishes journal records in reservation order, and the local write comes
// after the record, but two in-flight writes A and B to the same bytes could otherwise reserve
// in the order B, A and write the image in the order A, B: the image ends with B's bytes and
// the replica, which replays the journal, with A's. Sync mode has the same race between the
// local write and the target write.
//
// Shape: the in-flight ranges are kept in buckets, one per stripe of `grain`-byte granules
// (granule g is in bucket g % kBuckets). A request takes its buckets in ascending order; in each
// it waits until no held range there overlaps its own (byte-exact), then enters its range and
// goes to the next bucket, keeping what it entered. Whoever a request waits for has already
// entered that bucket, so if the holder waits itself, it is in a higher bucket: a chain of waits
// climbs strictly in bucket order, so there is no cycle (no deadlock). No mutex is held across
// the caller's I/O, only the entries. Entries live in each bucket's vector (reserved, so no allocation once warm).
//
// Threads: any. Each bucket's mutex is a leaf taken alone.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

namespace iofilterfs::replicate {

class RangeLock {
 public:
  static constexpr uint32_t kBuckets = 64;

  // grain_shift: log2 of the granule (the replicate filter's region size).
  explicit RangeLock(uint32_t grain_shift) : shift_(grain_shift) {
    for (auto& b : buckets_) b.held.reserve(16);
  }
  RangeLock(const RangeLock&) = delete;
  RangeLock& operator=(const RangeLock&) = delete;

  // One holder's range (on the caller's stack); unlocks when it goes.
  class Guard {
   public:
    Guard() = default;
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    ~Guard() { release(); }
    void release() {
      if (lock_) lock_->unlock(this);
      lock_ = nullptr;
    }
    bool held() const { return lock_ != nullptr; }

   private:
    friend class RangeLock;
    RangeLock* lock_ = nullptr;
    uint64_t off_ = 0, end_ = 0;
    uint32_t entered_ = 0;  // buckets entered so far, in visiting order (see visit())
  };

  // Waits until [off, off+len) overlaps no held range, then holds it in *g (len 0: nothing).
  void lock(uint64_t off, uint64_t len, Guard* g) { (void)acquire(off, len, g, true); }
  // The same without waiting: false (and nothing held) when a held range overlaps.
  bool try_lock(uint64_t off, uint64_t len, Guard* g) { return acquire(off, len, g, false); }
  // How many times a lock() waited for an overlapping holder (stats; the counter is bumped
  // before the wait begins).
  uint64_t waits() const { return waits_.load(std::memory_order_relaxed); }

 private:
  struct Entry {
    uint64_t off, end;
    const Guard* who;
  };
  struct Bucket {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Entry> held;  // under mu
    uint32_t waiters = 0;     // under mu
  };

  // Calls fn(bucket index) for every bucket [off, end) touches, in ascending order; stops when
  // fn returns false. Returns how many were visited with fn returning true.
  template <typename Fn>
  uint32_t visit(uint64_t off, uint64_t end, Fn&& fn) const {
    const uint64_t g0 = off >> shift_, g1 = (end - 1) >> shift_;
    uint32_t n = 0;
    if (g1 - g0 + 1 >= kBuckets) {
      for (uint32_t b = 0; b < kBuckets; ++b, ++n)
        if (!fn(b)) return n;
      return n;
    }
    // The granules' buckets wrap at most once: [g0 % K, K) and [0, g1 % K] when they wrap.
    const uint32_t b0 = static_cast<uint32_t>(g0 % kBuckets), b1 = static_cast<uint32_t>(g1 % kBuckets);
    if (b0 <= b1) {
      for (uint32_t b = b0; b <= b1; ++b, ++n)
        if (!fn(b)) return n;
    } else {
      for (uint32_t b = 0; b <= b1; ++b, ++n)
        if (!fn(b)) return n;
      for (uint32_t b = b0; b < kBuckets; ++b, ++n)
        if (!fn(b)) return n;
    }
    return n;
  }

  static bool overlaps(const Bucket& bk, uint64_t off, uint64_t end) {
    for (const Entry& e : bk.held)
      if (e.off < end && off < e.end) return true;
    return false;
  }

  bool acquire(uint64_t off, uint64_t len, Guard* g, bool wait) {
    g->release();
    if (len == 0) return true;
    const uint64_t end = off + len < off ? UINT64_MAX : off + len;
    g->lock_ = this;
    g->off_ = off;
    g->end_ = end;
    g->entered_ = 0;
    bool ok = true;
    visit(off, end, [&](uint32_t b) {
      Bucket& bk = buckets_[b];
      std::unique_lock<std::mutex> l(bk.mu);
      if (overlaps(bk, off, end)) {
        if (!wait) return ok = false;
        waits_.fetch_add(1, std::memory_order_relaxed);
        ++bk.waiters;
        bk.cv.wait(l, [&] { return !overlaps(bk, off, end); });
        --bk.waiters;
      }
      bk.held.push_back(Entry{off, end, g});
      ++g->entered_;
      return true;
    });
    if (!ok) {
      unlock(g);
      g->lock_ = nullptr;
    }
    return ok;
  }

  void unlock(const Guard* g) {
    uint32_t left = g->entered_;
    visit(g->off_, g->end_, [&](uint32_t b) {
      if (left == 0) return false;
      --left;
      Bucket& bk = buckets_[b];
      bool notify;
      {
        std::lock_guard<std::mutex> l(bk.mu);
        auto it = std::find_if(bk.held.begin(), bk.held.end(), [&](const Entry& e) { return e.who == g; });
        if (it != bk.held.end()) {
          *it = bk.held.back();
          bk.held.pop_back();
        }
        notify = bk.waiters > 0;
      }
      if (notify) bk.cv.notify_all();
      return true;
    });
  }

  const uint32_t shift_;
  Bucket buckets_[kBuckets];
  std::atomic<uint64_t> waits_{0};
};

}  // namespace iofilterfs::replicate

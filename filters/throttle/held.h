// The requests a disk's throttle holds at stage 1, each until its start time.
//
// A disk's own limits give every request its start time when it arrives (bucket.h), so stage 1
// needs no scheduler, only a place where held requests wait in arrival order: a reload that
// changes the limits charges them to the new buckets again in that order (throttle_filter.h),
// and the timer that resumes deferred requests needs the earliest start among them. Two kinds
// share the list, in one arrival order:
//
//   deferred  the request was taken from its FUSE worker (filter.h, "Deferring"); the
//             throttle's timer takes it out when its start comes (take_due) and resumes it;
//   sleeping  a worker that could not defer (a filter above the throttle that does not pass
//             deferral) sleeps on its own until its start, and takes itself out (remove).
//
//   head ─► [r 12ms, deferred] ─► [w 30ms, sleeping] ─► [r 14ms, deferred] ─► ... ◄─ tail
//
// Starts are not in arrival order (reads and writes have separate buckets under read-*/write-*
// limits, and a reload moves them), so the timer's questions scan the list: it holds at most a
// guest's queue depth, and the scan runs once per timer wake-up.
//
// Nodes are the caller's; nothing here allocates. Pure and clock-free (the time is passed in),
// not thread-safe: the throttle holds its mutex around it.
//
// The throttle's record of a deferred request comes from a Recycler (below): a record given
// back is reused by the next deferral, so a disk that defers steadily allocates no records.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>

#include "group.h"  // kNever

namespace iofilterfs::throttle {

struct Held {
  bool is_write = false;
  uint64_t bytes = 0;
  uint64_t start = 0;     // when it may go on
  bool deferred = false;  // resumed by the timer (true) or waking itself (false)
  void* owner = nullptr;  // the caller's
  Held *prev = nullptr, *next = nullptr;
};

class HeldQueue {
 public:
  // Appends h (arrival order).
  void push(Held* h);
  // Takes h out (it must be in the list).
  void remove(Held* h);
  // Takes out every deferred request whose start is at or before now (every deferred request
  // with now == kNever) and returns them in arrival order, linked through next.
  Held* take_due(uint64_t now);
  // The earliest start of a deferred request, or kNever when none is held.
  uint64_t next_due() const;

  Held* front() const { return head_; }
  bool empty() const { return head_ == nullptr; }
  size_t size() const { return size_; }
  size_t deferred() const { return deferred_; }

 private:
  Held *head_ = nullptr, *tail_ = nullptr;
  size_t size_ = 0, deferred_ = 0;
};

// A free list of records of type T (which has a `T* next_free`): get() answers one given back
// before, or a new one (null when out of memory); put() keeps at most `keep` of them and frees
// the rest. A record from get() holds whatever its last user left: the caller sets every
// field. Not thread-safe (the throttle's mutex).
template <typename T>
class Recycler {
 public:
  explicit Recycler(size_t keep) : keep_(keep) {}
  Recycler(const Recycler&) = delete;
  Recycler& operator=(const Recycler&) = delete;
  ~Recycler() {
    while (T* t = free_) {
      free_ = t->next_free;
      delete t;
    }
  }
  T* get() {
    if (T* t = free_) {
      free_ = t->next_free;
      --kept_;
      return t;
    }
    ++made_;
    return new (std::nothrow) T();
  }
  void put(T* t) {
    if (kept_ >= keep_) {
      delete t;
      return;
    }
    t->next_free = free_;
    free_ = t;
    ++kept_;
  }
  size_t kept() const { return kept_; }
  size_t made() const { return made_; }  // records allocated so far

 private:
  const size_t keep_;
  T* free_ = nullptr;
  size_t kept_ = 0, made_ = 0;
};

}  // namespace iofilterfs::throttle

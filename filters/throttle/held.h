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
#pragma once

#include <cstddef>
#include <cstdint>

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

}  // namespace iofilterfs::throttle

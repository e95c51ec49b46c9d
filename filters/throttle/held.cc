#include "held.h"

namespace iofilterfs::throttle {

void HeldQueue::push(Held* h) {
  h->prev = tail_;
  h->next = nullptr;
  (tail_ ? tail_->next : head_) = h;
  tail_ = h;
  ++size_;
  if (h->deferred) ++deferred_;
}

void HeldQueue::remove(Held* h) {
  (h->prev ? h->prev->next : head_) = h->next;
  (h->next ? h->next->prev : tail_) = h->prev;
  h->prev = h->next = nullptr;
  --size_;
  if (h->deferred) --deferred_;
}

Held* HeldQueue::take_due(uint64_t now) {
  Held *out = nullptr, *out_tail = nullptr;
  for (Held* h = head_; h && deferred_;) {
    Held* next = h->next;
    if (h->deferred && (now == kNever || h->start <= now)) {
      remove(h);
      (out_tail ? out_tail->next : out) = h;
      out_tail = h;
    }
    h = next;
  }
  return out;
}

uint64_t HeldQueue::next_due() const {
  uint64_t t = kNever;
  if (deferred_)
    for (const Held* h = head_; h; h = h->next)
      if (h->deferred && h->start < t) t = h->start;
  return t;
}

}  // namespace iofilterfs::throttle

// Datastore QoS: mClock's tags, the scheduler and the congestion control; see qos.h.
#include "qos.h"

#include <algorithm>

namespace iofilterfs::throttle {

using i128 = __int128;

// ---- TagClock ----

uint64_t TagClock::at(int64_t k) const {
  if (!rate_) return base_;
  const i128 num = i128(k) * scale_;
  const i128 step = num >= 0 ? (num + rate_ - 1) / rate_ : -((-num) / i128(rate_));  // ceil
  const i128 v = i128(base_) + step;
  if (v < 0) return 0;
  if (v > i128(kNever)) return kNever;
  return static_cast<uint64_t>(v);
}

uint64_t TagClock::next(uint64_t t) const { return std::max(at(k_ + 1), t); }

void TagClock::take(uint64_t tag) {
  if (tag == at(k_ + 1)) {
    ++k_;
  } else {
    base_ = tag;
    k_ = 0;
  }
}

void TagClock::set_rate(uint64_t rate) {
  base_ = last();
  k_ = 0;
  rate_ = rate;
}

// ---- QosScheduler ----

int QosScheduler::add(const QosParams& p) {
  size_t i = 0;
  while (i < clients_.size() && clients_[i].used) ++i;
  if (i == clients_.size()) clients_.emplace_back();
  Client& c = clients_[i];
  c = Client{};
  c.used = true;
  c.p = p;
  c.r = TagClock(p.reservation);
  c.pclock = TagClock(p.shares, kPScale);
  return static_cast<int>(i);
}

void QosScheduler::set(int client, const QosParams& p) {
  Client& c = clients_[client];
  const bool r_changed = p.reservation != c.p.reservation;
  c.p = p;
  c.pclock.set_rate(p.shares);
  if (r_changed) {
    c.r.set_rate(p.reservation);
    if (c.head && p.reservation) {
      c.head_r = c.r.next(c.head->arrival);
      c.r.take(c.head_r);
    }
  }
}

void QosScheduler::remove(int client) { clients_[client].used = false; }

uint64_t QosScheduler::reserved_iops() const {
  uint64_t n = 0;
  for (const Client& c : clients_)
    if (c.used) n += c.p.reservation;
  return n;
}

void QosScheduler::tag_head(Client& c) {
  if (c.p.reservation) {
    c.head_r = c.r.next(c.head->arrival);
    c.r.take(c.head_r);
  }
  // Start-time fair queueing: no earlier than the virtual time, so idling earns no credit.
  c.head_p = c.pclock.next(vtime_);
  c.pclock.take(c.head_p);
}

void QosScheduler::arrive(int client, QosRequest* r) {
  Client& c = clients_[client];
  r->next = nullptr;
  r->by_reservation = false;
  if (c.tail) {
    c.tail->next = r;
    c.tail = r;
  } else {
    c.head = c.tail = r;
    tag_head(c);
  }
  ++c.queued;
  ++waiting_;
}

void QosScheduler::replace(int client, QosRequest* r, QosRequest* with) {
  Client& c = clients_[client];
  with->arrival = r->arrival;
  with->by_reservation = r->by_reservation;
  with->next = r->next;
  QosRequest** link = &c.head;
  while (*link != r) link = &(*link)->next;
  *link = with;
  if (c.tail == r) c.tail = with;
  r->next = nullptr;
}

bool QosScheduler::remove_request(int client, QosRequest* r) {
  if (client < 0 || static_cast<size_t>(client) >= clients_.size()) return false;
  Client& c = clients_[client];
  QosRequest* prev = nullptr;
  for (QosRequest* x = c.head; x; prev = x, x = x->next) {
    if (x != r) continue;
    (prev ? prev->next : c.head) = r->next;
    if (c.tail == r) c.tail = prev;
    r->next = nullptr;
    --c.queued;
    --waiting_;
    if (!prev && c.head) tag_head(c);  // a new head
    return true;
  }
  return false;
}

QosRequest* QosScheduler::remove_all(int client) {
  if (client < 0 || static_cast<size_t>(client) >= clients_.size()) return nullptr;
  Client& c = clients_[client];
  QosRequest* const first = c.head;
  waiting_ -= c.queued;
  c.queued = 0;
  c.head = c.tail = nullptr;
  return first;
}

QosRequest* QosScheduler::dispatch(uint64_t now, uint64_t inflight, uint64_t window, uint64_t* next_event) {
  QosRequest *first = nullptr, *last = nullptr;
  uint64_t in = inflight;
  while (waiting_) {
    Client* best = nullptr;
    bool by_reservation = false;
    // Constraint phase: the earliest reservation tag that is due, window or not.
    for (Client& c : clients_)
      if (c.used && c.head && c.p.reservation && c.head_r <= now && (!best || c.head_r < best->head_r)) best = &c;
    if (best) {
      by_reservation = true;
    } else if (in < window) {
      // Weight phase: the smallest proportional tag; ties go to the older request.
      for (Client& c : clients_)
        if (c.used && c.head &&
            (!best || c.head_p < best->head_p || (c.head_p == best->head_p && c.head->arrival < best->head->arrival)))
          best = &c;
    }
    if (!best) break;
    QosRequest* r = best->head;
    best->head = r->next;
    if (!best->head) best->tail = nullptr;
    --best->queued;
    --waiting_;
    r->next = nullptr;
    r->by_reservation = by_reservation;
    if (!by_reservation) {
      vtime_ = std::max(vtime_, best->head_p);
      if (best->p.reservation) best->r.give_back();  // weight service leaves the reservation whole
    }
    if (best->head) tag_head(*best);
    if (last) last->next = r;
    else first = r;
    last = r;
    ++in;
  }
  *next_event = kNever;
  for (const Client& c : clients_)
    if (c.used && c.head && c.p.reservation && c.head_r > now) *next_event = std::min(*next_event, c.head_r);
  return first;
}

// ---- CongestionControl ----

uint64_t CongestionControl::floor(uint64_t reserved_iops, uint64_t latency_ns) const {
  const unsigned __int128 slots = (static_cast<unsigned __int128>(reserved_iops) * latency_ns + 999'999'999) / 1'000'000'000;
  return o_.min_window + static_cast<uint64_t>(std::min<unsigned __int128>(slots, o_.max_window));
}

void CongestionControl::update(uint64_t threshold_ns, uint64_t elapsed_ns, uint64_t completions,
                               uint64_t latency_sum_ns, uint64_t inflight, uint64_t reserved_iops) {
  if (completions) {
    latency_ = latency_sum_ns / completions;
    if (latency_ > threshold_ns) {
      ++above_;
      below_ = 0;
    } else if (static_cast<unsigned __int128>(latency_) * 5 <= static_cast<unsigned __int128>(threshold_ns) * 4) {
      ++below_;
      above_ = 0;
    } else {  // the hysteresis band: neither
      above_ = below_ = 0;
    }
  } else if (inflight == 0) {
    // Idle: every interval that passed counts as a quiet one.
    const uint64_t n = std::max<uint64_t>(1, elapsed_ns / o_.interval_ns);
    below_ = static_cast<int>(std::min<uint64_t>(below_ + n, 1 << 30));
    above_ = 0;
  } else {
    return;  // requests in flight and none done: nothing learnt
  }

  if (!on_) {
    if (above_ >= o_.on_intervals) {
      on_ = true;
      below_ = 0;
      window_ = std::clamp(std::max(inflight, floor(reserved_iops, latency_)), o_.min_window, o_.max_window);
    }
    return;
  }
  if (below_ >= o_.off_intervals) {
    on_ = false;
    above_ = 0;
    return;
  }
  if (!completions) return;
  // PARDA: w <- (1 - g) w + g (threshold / latency * w + beta), g = 1/2.
  uint64_t w = o_.max_window;
  if (latency_) {
    using u128 = unsigned __int128;
    const u128 next = (u128(window_) * latency_ + u128(window_) * threshold_ns + u128(o_.beta) * latency_) / (2 * u128(latency_));
    w = static_cast<uint64_t>(std::min<u128>(next, o_.max_window));
  }
  window_ = std::clamp(w, std::min(floor(reserved_iops, latency_), o_.max_window), o_.max_window);
}

// ---- RateMeter ----

void RateMeter::add(uint64_t now_ns, uint64_t bytes) {
  const uint64_t s = now_ns / 1'000'000'000;
  if (s > sec_) {
    if (s == sec_ + 1) {
      prev_ops_ = ops_;
      prev_bytes_ = bytes_;
    } else {
      prev_ops_ = prev_bytes_ = 0;
    }
    sec_ = s;
    ops_ = bytes_ = 0;
  }
  ++ops_;
  bytes_ += bytes;
}

uint64_t RateMeter::ops_per_sec(uint64_t now_ns) const {
  const uint64_t s = now_ns / 1'000'000'000;
  if (s <= sec_) return prev_ops_;
  return s == sec_ + 1 ? ops_ : 0;
}

uint64_t RateMeter::bytes_per_sec(uint64_t now_ns) const {
  const uint64_t s = now_ns / 1'000'000'000;
  if (s <= sec_) return prev_bytes_;
  return s == sec_ + 1 ? bytes_ : 0;
}

}  // namespace iofilterfs::throttle

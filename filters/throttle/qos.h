// Datastore QoS, as VMware's Storage I/O Control does it with mClock's three controls:
//
//   shares       a disk's relative weight (default 1000; SIOC's low/normal/high are 500/1000/2000)
//   reservation  IOPS the disk is guaranteed while the datastore is congested
//   limit        IOPS the disk never exceeds (applied always, congested or not)
//
// Three pure parts, all with the time passed in:
//
// TagClock — a sequence of tags spaced exactly 1/rate apart, mClock's tag rule
//   tag = max(previous tag + 1/rate, t), kept as base + ceil(k × scale / rate) so that spacing
//   never drifts however many tags are taken. `limit` is one per disk: a request starts no
//   earlier than its L tag (no burst), so a disk never runs faster than its limit.
//
// QosScheduler — mClock (Gulati, Merchant, Varman, OSDI 2010) over the datastore's disks.
//   Each disk with waiting requests has, for its oldest one, an R tag (real time, spaced
//   1/reservation) and a P tag (virtual time, spaced 1/shares). When a request can be
//   dispatched:
//     1. constraint phase: the smallest R tag that is due (R <= now) goes — reservations first,
//        and even when the window below is full, so a reservation never depends on it;
//     2. weight phase: while fewer than `window` requests are in flight below the throttle,
//        the smallest P tag goes, and that disk's R tags move back by 1/reservation (mClock:
//        service by weight does not use up the reservation).
//   P tags are start-time fair queueing tags: a disk that was idle starts at the virtual time
//   (the tag last served by weight), so idling earns no credit. Between backlogged disks the
//   weight phase therefore hands out dispatches in proportion to shares; a disk whose
//   proportional share is below its reservation gets its reservation (its P tags run ahead,
//   so the weight phase serves the others): mClock's max(reservation, share) allocation.
//
// CongestionControl — when the scheduler engages and how wide the window is, from the latency
//   observed below the throttle (SIOC's trigger, PARDA's window, FAST 2009). Every interval
//   (100 ms) it gets the interval's completions and their summed latency:
//     on   after 3 consecutive intervals whose mean latency is above the threshold
//          (congestion-latency, default 30 ms); the window starts at the requests in flight;
//     window, each interval while on: w ← (w + w·threshold/latency + β) / 2, β = 4
//          (PARDA's control law with γ = 1/2): it shrinks while latency is above the
//          threshold and grows below it, settling where latency ≈ threshold; never below
//          4 plus the slots the reservations need (Σ reservation × latency), never above 4096;
//     off  after 10 consecutive intervals with mean latency at or below 4/5 of the threshold
//          (or without I/O): the window opens and only limits apply again.
//   Intervals between 4/5 and 1 × the threshold keep the state (the hysteresis band).
//
// Not thread-safe; the runtime (runtime.h) holds the datastore's QoS mutex around them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "group.h"  // kNever

namespace iofilterfs::throttle {

inline constexpr uint64_t kDefaultShares = 1000;
inline constexpr uint64_t kMaxShares = 1'000'000;
inline constexpr uint64_t kUnlimited = ~uint64_t(0);

class TagClock {
 public:
  // Tags `scale / rate` apart (scale 10^9: rate per second, tags in ns). rate 0: off.
  TagClock() = default;
  explicit TagClock(uint64_t rate, uint64_t scale = 1'000'000'000) : rate_(rate), scale_(scale) {}
  bool on() const { return rate_ != 0; }
  uint64_t rate() const { return rate_; }
  // The tag the next request gets at time t: max(last + scale/rate, t).
  uint64_t next(uint64_t t) const;
  // Takes `tag` (a value next() returned, or a later one) as the last tag.
  void take(uint64_t tag);
  // Moves the last tag back by one step (mClock's R-tag adjustment).
  void give_back() { --k_; }
  // The last tag taken (0 before any).
  uint64_t last() const { return at(k_); }
  // A new rate from now on; the last tag stays.
  void set_rate(uint64_t rate);

 private:
  uint64_t at(int64_t k) const;
  uint64_t rate_ = 0, scale_ = 1'000'000'000;
  uint64_t base_ = 0;
  int64_t k_ = 0;
};

struct QosParams {
  uint64_t shares = kDefaultShares;
  uint64_t reservation = 0;  // IOPS; 0: none
  bool operator==(const QosParams&) const = default;
};

struct QosRequest {
  uint64_t arrival = 0;
  void* owner = nullptr;        // the caller's: its waiter
  bool by_reservation = false;  // set when dispatched: which phase served it
  QosRequest* next = nullptr;
};

class QosScheduler {
 public:
  // A new client (a disk); returns its id (a freed id is reused).
  int add(const QosParams& p);
  // New shares or reservation; its queue stays.
  void set(int client, const QosParams& p);
  // A client with nothing waiting leaves.
  void remove(int client);
  const QosParams& params(int client) const { return clients_[client].p; }
  // Σ reservation over the clients (for the window's floor).
  uint64_t reserved_iops() const;

  // Queues a request of `client` arriving at r->arrival (the caller keeps *r alive until
  // dispatch hands it back).
  void arrive(int client, QosRequest* r);
  // Puts `with` in the place of `r`, a waiting request of `client`, with its tags (see
  // GroupQueue::replace).
  void replace(int client, QosRequest* r, QosRequest* with);
  // Takes r out of `client`'s queue without dispatching it: true when it was waiting there.
  // (The tags a head took stay taken, as if it had been served.)
  bool remove_request(int client, QosRequest* r);
  // Takes every waiting request of `client` out without dispatching it (a disk releasing what
  // it holds) and returns them linked through `next`, in their order; the other clients'
  // queues and tags are untouched.
  QosRequest* remove_all(int client);
  // Dispatches at `now`, given `inflight` requests below the throttle and the window
  // (kUnlimited: dispatch everything). Returns the dispatched requests linked through `next`,
  // in dispatch order; *next_event: the next R tag that falls due (kNever if none), since
  // otherwise only a completion (a free slot) lets more go.
  QosRequest* dispatch(uint64_t now, uint64_t inflight, uint64_t window, uint64_t* next_event);

  size_t waiting() const { return waiting_; }
  size_t waiting(int client) const { return clients_[client].queued; }
  // For tests: the virtual time (P tag last served by weight).
  uint64_t virtual_time() const { return vtime_; }

 private:
  static constexpr uint64_t kPScale = 1'000'000'000'000;  // a 1000-share disk: 10^9 per request
  struct Client {
    bool used = false;
    QosParams p;
    TagClock r, pclock;
    QosRequest *head = nullptr, *tail = nullptr;
    size_t queued = 0;
    uint64_t head_r = 0, head_p = 0;  // tags of the head, set when it became the head
  };
  void tag_head(Client& c);

  std::vector<Client> clients_;
  size_t waiting_ = 0;
  uint64_t vtime_ = 0;
};

struct CongestionOptions {
  uint64_t interval_ns = 100'000'000;
  int on_intervals = 3;
  int off_intervals = 10;
  uint64_t min_window = 4;
  uint64_t max_window = 4096;
  uint64_t beta = 4;
};

class CongestionControl {
 public:
  explicit CongestionControl(const CongestionOptions& o = {}) : o_(o) {}
  const CongestionOptions& options() const { return o_; }

  // One interval's observations (elapsed_ns long, normally options().interval_ns):
  // `completions` requests completed below the throttle with `latency_sum_ns` in total;
  // `inflight` are below it now; `reserved_iops` is Σ reservation.
  void update(uint64_t threshold_ns, uint64_t elapsed_ns, uint64_t completions, uint64_t latency_sum_ns,
              uint64_t inflight, uint64_t reserved_iops);

  bool congested() const { return on_; }
  // The window: kUnlimited when not congested.
  uint64_t window() const { return on_ ? window_ : kUnlimited; }
  // The mean latency of the last interval with completions.
  uint64_t latency_ns() const { return latency_; }

 private:
  uint64_t floor(uint64_t reserved_iops, uint64_t latency_ns) const;

  CongestionOptions o_;
  bool on_ = false;
  int above_ = 0, below_ = 0;
  uint64_t window_ = 0;
  uint64_t latency_ = 0;
};

// Requests and bytes per second over the last whole second of the clock (the "achieved" rate).
class RateMeter {
 public:
  void add(uint64_t now_ns, uint64_t bytes);
  // What passed in the last whole second before now_ns (0 when nothing did).
  uint64_t ops_per_sec(uint64_t now_ns) const;
  uint64_t bytes_per_sec(uint64_t now_ns) const;

 private:
  uint64_t sec_ = 0;                        // the second being counted
  uint64_t ops_ = 0, bytes_ = 0;            // in it
  uint64_t prev_ops_ = 0, prev_bytes_ = 0;  // in the second before it
};

}  // namespace iofilterfs::throttle

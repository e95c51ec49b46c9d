#include "throttle_filter.h"

#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cstdio>
#include <new>

namespace iofilterfs {

using throttle::monotonic_ns;

ThrottleFilter::ThrottleFilter(const throttle::ThrottleParams& p)
    : params_(p),
      state_(p.group.empty() ? p.limits : throttle::ThrottleConfig{}),
      limit_(p.limit),
      describe_(throttle::describe_throttle(p)) {}

ThrottleFilter::ThrottleFilter(const throttle::ThrottleConfig& cfg)
    : ThrottleFilter([&] {
        throttle::ThrottleParams p;
        p.limits = cfg;
        return p;
      }()) {}

ThrottleFilter::~ThrottleFilter() { close(); }

Status ThrottleFilter::open(const DiskInfo&) {
  std::shared_ptr<throttle::GroupMember> member;
  throttle::ThrottleParams p;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (opened_) return Status::Ok();
    p = params_;
  }
  if (!p.group.empty()) member = std::make_shared<throttle::GroupMember>(throttle::Group::get(p.group, p.limits));
  const int client = throttle::QosDomain::instance().add({p.shares, p.reservation});
  std::lock_guard<std::mutex> g(mu_);
  member_ = std::move(member);
  client_.store(client);
  opened_ = true;
  return Status::Ok();
}

void ThrottleFilter::close() {
  release_deferred();  // nothing deferred is left here after this
  std::thread timer;
  {
    std::lock_guard<std::mutex> g(mu_);
    timer_stop_ = true;
    timer = std::move(timer_);
  }
  timer_cv_.notify_all();
  if (timer.joinable()) timer.join();
  std::shared_ptr<throttle::GroupMember> member;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!opened_) return;
    opened_ = false;
    member = std::move(member_);
  }
  const int client = client_.exchange(-1);
  if (client >= 0) throttle::QosDomain::instance().remove(client);
  // `member` leaves the group here, or with the last of its requests still queued there.
}

bool ThrottleFilter::reconfigure(const YAML::Node& params) {
  throttle::ThrottleParams p;
  if (!throttle::parse_throttle(params, &p).empty()) return false;
  bool opened;
  std::string old_group;
  {
    std::lock_guard<std::mutex> g(mu_);
    opened = opened_;
    old_group = params_.group;
  }
  // Join the new group (or give the same group its new limits) before taking mu_.
  std::shared_ptr<throttle::GroupMember> member, old;
  if (opened && !p.group.empty()) {
    std::shared_ptr<throttle::Group> group = throttle::Group::get(p.group, p.limits);
    if (p.group != old_group) member = std::make_shared<throttle::GroupMember>(std::move(group));
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if (p.group != old_group) {
      old = std::move(member_);
      member_ = std::move(member);
    }
    params_ = p;
    describe_ = throttle::describe_throttle(p);
    // As QEMU's throttle_config(): the new limits start with empty buckets. The requests held
    // here (deferred or sleeping) are charged to them again, in their order; sleepers are woken
    // to their new times, and the timer to the new earliest one.
    state_ = throttle::ThrottleState(p.group.empty() ? p.limits : throttle::ThrottleConfig{});
    limit_ = throttle::TagClock(p.limit);
    const uint64_t now = monotonic_ns();
    for (throttle::Held* h = held_.front(); h; h = h->next) {
      h->start = start_for(h->is_write, h->bytes, now);
      if (!h->deferred) static_cast<std::condition_variable*>(h->owner)->notify_one();
    }
    timer_cv_.notify_all();
  }
  const int client = client_.load();
  if (client >= 0) throttle::QosDomain::instance().set(client, {p.shares, p.reservation});
  return true;  // `old` leaves its group when its queued requests are through
}

uint64_t ThrottleFilter::start_for(bool is_write, uint64_t bytes, uint64_t now) {
  uint64_t t = limit_.on() ? limit_.next(now) : now;
  if (params_.group.empty()) t = state_.admit(is_write, bytes, t);
  if (limit_.on()) limit_.take(t);
  return t;
}

ThrottleFilter::Parked* ThrottleFilter::take_locked(const Io& io, bool is_write, uint64_t bytes, uint64_t off,
                                                    uint64_t t_arrival, int stage) {
  if (!io.defer || !may_defer() || released_) return nullptr;
  Parked* p = records_.get();  // a record given back, in the steady state
  Deferred* d = p ? io.defer->take() : nullptr;
  if (!d) {
    if (p) records_.put(p);  // out of memory: the request waits on its thread instead
    return nullptr;
  }
  p->filter = this;
  p->request = d;
  p->direct = io.direct;
  p->off = off;
  p->t_arrival = t_arrival;
  p->stage = stage;
  p->held = throttle::Held{};
  p->held.is_write = is_write;
  p->held.bytes = bytes;
  p->held.owner = p;
  p->member.reset();
  p->wait.waiter.granted = false;
  p->wait.waiter.task = p;
  p->wait.waiter.queued = nullptr;
  p->live_prev = nullptr;
  p->live_next = live_;
  if (live_) live_->live_prev = p;
  live_ = p;
  ++outstanding_;
  return p;
}

bool ThrottleFilter::stage1(const Io& io, bool is_write, uint64_t bytes, uint64_t off, uint64_t t_arrival,
                            bool* waited) {
  std::unique_lock<std::mutex> lk(mu_);
  if (released_) return false;  // releasing (release_deferred): unthrottled
  const uint64_t now = monotonic_ns();
  const uint64_t start = start_for(is_write, bytes, now);
  if (start <= now) return false;
  *waited = true;
  if (!timer_stop_) {
    if (Parked* p = take_locked(io, is_write, bytes, off, t_arrival, 2)) {
      p->held.start = start;
      p->held.deferred = true;
      const bool earliest = start < held_.next_due();
      held_.push(&p->held);
      queued_.fetch_add(1, std::memory_order_relaxed);
      if (!timer_.joinable()) timer_ = std::thread([this] { timer_loop(); });
      else if (earliest) timer_cv_.notify_all();
      return true;
    }
  }
  // This thread sleeps until its start (which a reload may move).
  std::condition_variable cv;
  throttle::Held h;
  h.is_write = is_write;
  h.bytes = bytes;
  h.start = start;
  h.owner = &cv;
  held_.push(&h);
  queued_.fetch_add(1, std::memory_order_relaxed);
  while (!released_ && monotonic_ns() < h.start)
    cv.wait_until(lk, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(h.start)));
  queued_.fetch_sub(1, std::memory_order_relaxed);
  held_.remove(&h);
  return false;
}

void ThrottleFilter::timer_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!timer_stop_) {
    dispatch_locked(held_.take_due(released_ ? throttle::kNever : monotonic_ns()));
    const uint64_t next = held_.next_due();
    if (timer_stop_) break;
    if (next == throttle::kNever) timer_cv_.wait(lk);
    else timer_cv_.wait_until(lk, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(next)));
  }
}

void ThrottleFilter::dispatch_locked(throttle::Held* list) {
  while (list) {
    throttle::Held* h = list;
    list = h->next;
    h->next = nullptr;
    queued_.fetch_sub(1, std::memory_order_relaxed);
    throttle::ResumePool::instance().submit(static_cast<Parked*>(h->owner));
  }
}

// On a pool thread: the next stage, or below.
void ThrottleFilter::Parked::run() {
  ThrottleFilter* f = filter;
  if (f->advance(this)) return;  // queued in its group or the datastore: run again when granted
  request->resume(*this);        // below, inside the disk, then the answer
  std::shared_ptr<throttle::GroupMember> m;  // leaves its group here if the disk did already
  std::lock_guard<std::mutex> g(f->mu_);     // (after the unlock: m is destroyed last)
  m = std::move(member);
  (live_prev ? live_prev->live_next : f->live_) = live_next;
  if (live_next) live_next->live_prev = live_prev;
  f->records_.put(this);
  if (--f->outstanding_ == 0) f->idle_cv_.notify_all();
}

Status ThrottleFilter::Parked::run(void* data, size_t* got) {
  return filter->down(held.is_write, direct, data, held.bytes, off, got, t_arrival, true);
}

bool ThrottleFilter::advance(Parked* p) {
  bool released;
  std::shared_ptr<throttle::GroupMember> member;
  {
    std::lock_guard<std::mutex> g(mu_);
    released = released_;
    if (p->stage == 2 && !released) p->member = member_;  // its group now (a reload may have moved the disk)
    member = p->member;
  }
  const int client = client_.load(std::memory_order_relaxed);
  if (released) {  // release_deferred: the rest of the way unthrottled
    if (p->stage <= 3 && client >= 0) throttle::QosDomain::instance().bypass();
    p->stage = 4;
    return false;
  }
  if (p->stage == 2) {
    p->stage = 3;
    if (member && member->group->park(member->id, p->held.is_write, p->held.bytes, &p->wait, &queued_)) return true;
  }
  if (p->stage == 3) {
    p->stage = 4;
    if (client >= 0 && throttle::QosDomain::instance().park(client, &p->wait, &queued_)) return true;
  }
  return false;
}

void ThrottleFilter::unpark_all_locked() {
  const int client = client_.load(std::memory_order_relaxed);
  if (member_) member_->group->release(member_->id);  // parked and blocked ones of its group
  if (client >= 0) throttle::QosDomain::instance().release(client);  // and of the datastore
  for (Parked* p = live_; p; p = p->live_next) {  // and those left in a group it was in before
    // Each queue checks, under its own mutex, whether p waits in it; at most one does.
    if (p->member && p->member->group->unpark(p->member->id, &p->wait)) continue;
    if (client >= 0) (void)throttle::QosDomain::instance().unpark(client, &p->wait);
  }
}

void ThrottleFilter::release_deferred() {
  std::unique_lock<std::mutex> lk(mu_);
  released_ = true;
  dispatch_locked(held_.take_due(throttle::kNever));
  for (throttle::Held* h = held_.front(); h; h = h->next)  // workers asleep at the limit
    if (!h->deferred) static_cast<std::condition_variable*>(h->owner)->notify_one();
  // A request a worker was parking as the release began reaches its queue only after the
  // sweep: sweep again until none is left (each pass is cheap, and the pool carries the rest).
  // Workers blocked in the group's or the datastore's queue (requests that could not be
  // deferred) are woken by the same sweep, and one that was on its way into a queue as the
  // release began is swept out by the next pass.
  releasing_.store(true);
  while (outstanding_ > 0 || in_queues_.load() > 0) {
    unpark_all_locked();
    idle_cv_.wait_for(lk, std::chrono::milliseconds(10), [&] { return outstanding_ == 0 && in_queues_.load() == 0; });
  }
  releasing_.store(false);
}

void ThrottleFilter::defer_again() {
  std::lock_guard<std::mutex> g(mu_);
  released_ = false;
}

// Offers a request that arrived on a worker to the group's or the datastore's queue for
// parking (runtime.h): it is taken only if it must wait there.
struct ThrottleFilter::WorkerParker final : throttle::Parker {
  ThrottleFilter* f;
  const Io* io;
  bool is_write;
  uint64_t bytes, off, t_arrival;
  int stage = 3;                                                // the next stage once granted
  const std::shared_ptr<throttle::GroupMember>* member = nullptr;  // the group it waits in
  throttle::ParkedWait* park() override {
    std::lock_guard<std::mutex> g(f->mu_);
    Parked* p = f->take_locked(*io, is_write, bytes, off, t_arrival, stage);
    if (!p) return nullptr;
    if (member) p->member = *member;  // kept while it waits there
    return &p->wait;
  }
};

Status ThrottleFilter::pass(const Io& io, bool is_write, void* buf, size_t len, uint64_t off, size_t* got,
                            uint64_t t_arrival, bool waited) {
  std::shared_ptr<throttle::GroupMember> member;
  bool released;
  {
    std::lock_guard<std::mutex> g(mu_);
    member = member_;
    released = released_;
    if (!released) ++in_queues_;  // release_deferred() waits for it to be out of the queues
  }
  if (released) {  // release_deferred: on below unthrottled until defer_again()
    if (client_.load(std::memory_order_relaxed) >= 0) throttle::QosDomain::instance().bypass();
    return down(is_write, io.direct, buf, len, off, got, t_arrival, waited);
  }
  struct OutOfQueues {
    ThrottleFilter* f;
    void reset() {
      if (!f) return;
      // Without mu_ (a second hold per request otherwise), unless a release waits for the 0:
      // it set releasing_ before it read the count, so one of the two sees the other.
      if (f->in_queues_.fetch_sub(1) == 1 && f->releasing_.load()) {
        std::lock_guard<std::mutex> g(f->mu_);
        f->idle_cv_.notify_all();
      }
      f = nullptr;
    }
    ~OutOfQueues() { reset(); }
  } in{this};
  const bool can_park = io.defer && may_defer();
  WorkerParker parker;
  parker.f = this;
  parker.io = &io;
  parker.is_write = is_write;
  parker.bytes = len;
  parker.off = off;
  parker.t_arrival = t_arrival;
  if (member) {
    parker.member = &member;
    switch (member->group->pass(member->id, is_write, len, &queued_, can_park ? &parker : nullptr)) {
      case throttle::Wait::kParked: return Status::Deferred();
      case throttle::Wait::kWaited: waited = true; break;
      case throttle::Wait::kWent: break;
    }
  }
  const int client = client_.load(std::memory_order_relaxed);
  if (client >= 0 && member) {
    // Released while it waited in its group: past the datastore's queue too, unthrottled.
    std::lock_guard<std::mutex> g(mu_);
    released = released_;
  }
  if (client >= 0 && released) {
    throttle::QosDomain::instance().bypass();
  } else if (client >= 0) {
    parker.stage = 4;
    parker.member = nullptr;  // past its group
    switch (throttle::QosDomain::instance().enter(client, &queued_, can_park ? &parker : nullptr)) {
      case throttle::Wait::kParked: return Status::Deferred();
      case throttle::Wait::kWaited: waited = true; break;
      case throttle::Wait::kWent: break;
    }
  }
  in.reset();  // out of the queues: release_deferred() need not wait for its trip below
  return down(is_write, io.direct, buf, len, off, got, t_arrival, waited);
}

Status ThrottleFilter::down(bool is_write, bool direct, void* buf, size_t len, uint64_t off, size_t* got,
                            uint64_t t_arrival, bool waited) {
  const uint64_t t1 = monotonic_ns();
  {
    std::lock_guard<std::mutex> g(meter_mu_);
    meter_.add(t1, len);
  }
  inflight_.fetch_add(1, std::memory_order_relaxed);
  const Io plain{direct};  // deferral is this filter's business, not the layers' below
  Status s = is_write ? next_->write(plain, buf, len, off) : next_->read(plain, buf, len, off, got);
  done(is_write, len, t1, waited, t_arrival);
  return s;
}

void ThrottleFilter::done(bool is_write, uint64_t bytes, uint64_t t_down, bool waited, uint64_t t_arrival) {
  const uint64_t now = monotonic_ns();
  inflight_.fetch_sub(1, std::memory_order_relaxed);
  if (client_.load(std::memory_order_relaxed) >= 0) throttle::QosDomain::instance().leave(now - t_down);
  if (waited) {
    delayed_.fetch_add(1, std::memory_order_relaxed);
    wait_ns_.fetch_add(t_down - t_arrival, std::memory_order_relaxed);
  }
  (is_write ? writes_ : reads_).fetch_add(1, std::memory_order_relaxed);
  (is_write ? write_bytes_ : read_bytes_).fetch_add(bytes, std::memory_order_relaxed);
}

Status ThrottleFilter::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  const uint64_t t0 = monotonic_ns();
  bool waited = false;
  if (stage1(io, false, len, off, t0, &waited)) return Status::Deferred();
  return pass(io, false, buf, len, off, got, t0, waited);
}

Status ThrottleFilter::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  const uint64_t t0 = monotonic_ns();
  bool waited = false;
  if (stage1(io, true, len, off, t0, &waited)) return Status::Deferred();
  // pass() hands buf only to next_->write, which takes it as const.
  return pass(io, true, const_cast<void*>(buf), len, off, nullptr, t0, waited);
}

std::string ThrottleFilter::describe() const {
  std::lock_guard<std::mutex> g(mu_);
  return describe_;
}

std::string ThrottleFilter::stats_json() const {
  auto u = [](const std::atomic<uint64_t>& a) { return static_cast<unsigned long long>(a.load(std::memory_order_relaxed)); };
  const uint64_t now = monotonic_ns();
  uint64_t iops, bps;
  {
    std::lock_guard<std::mutex> g(meter_mu_);
    iops = meter_.ops_per_sec(now);
    bps = meter_.bytes_per_sec(now);
  }
  std::string group;
  unsigned long long shares, reservation, limit;
  {
    std::lock_guard<std::mutex> g(mu_);
    group = params_.group;
    shares = params_.shares;
    reservation = params_.reservation;
    limit = params_.limit;
  }
  const bool qos = client_.load() >= 0;
  const throttle::QosDomain::Snapshot d = qos ? throttle::QosDomain::instance().snapshot() : throttle::QosDomain::Snapshot{};
  char b[768];
  std::snprintf(b, sizeof b,
                "{\"delayed\":%llu,\"wait_ns\":%llu,\"wait_us\":%llu,\"queued\":%llu,\"inflight\":%llu,\"reads\":%llu,"
                "\"writes\":%llu,\"read_bytes\":%llu,\"write_bytes\":%llu,\"iops\":%llu,\"bytes_per_s\":%llu,"
                "\"mb_per_s\":%.1f,\"group\":%s%s%s,\"shares\":%llu,\"reservation\":%llu,\"limit\":%llu,"
                "\"congested\":%s,\"window\":%s,\"datastore_latency_us\":%llu}",
                u(delayed_), u(wait_ns_), u(wait_ns_) / 1000, u(queued_), u(inflight_), u(reads_), u(writes_),
                u(read_bytes_), u(write_bytes_), static_cast<unsigned long long>(iops),
                static_cast<unsigned long long>(bps), bps / 1e6, group.empty() ? "null" : "\"", group.c_str(),
                group.empty() ? "" : "\"", shares, reservation, limit, d.congested ? "true" : "false",
                d.congested ? std::to_string(d.window).c_str() : "null",
                static_cast<unsigned long long>(d.latency_ns / 1000));
  return b;
}

void register_throttle(Registry& r) {
  FilterInfo info{
      "throttle", FilterClass::Throttle, kFilterApiVersion,
      "per-disk IOPS and bandwidth limits with bursts (QEMU's throttling semantics), shared groups, and datastore "
      "QoS by shares, reservations and limits under congestion (SIOC/mClock)",
      [] {
        std::vector<std::string> keys;
        for (std::string_view k : throttle::throttle_keys()) keys.emplace_back(k);
        return keys;
      }(),
      [](const YAML::Node& params, YAML::Node* where) { return throttle::validate_throttle(params, where); },
      [](const YAML::Node& params) -> std::unique_ptr<Filter> {
        throttle::ThrottleParams p;
        if (!throttle::parse_throttle(params, &p).empty()) return nullptr;
        return std::make_unique<ThrottleFilter>(p);
      },
      [](const std::vector<std::pair<std::string, YAML::Node>>& uses, YAML::Node* where) {
        return throttle::validate_throttle_policies(uses, where);
      }};
  info.defers = true;  // a request that must wait is parked, not held on its worker (filter.h, "Deferring")
  r.add(std::move(info));
}

}  // namespace iofilterfs

// Throttle groups and the datastore QoS domain at run time; see runtime.h.
#include "runtime.h"

#include <spdlog/spdlog.h>
#include <time.h>

#include <chrono>
#include <map>
#include <thread>

#include "filter.h"

namespace iofilterfs::throttle {

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kNsPerSec + static_cast<uint64_t>(ts.tv_nsec);
}

// ---- ResumePool ----

ResumePool& ResumePool::instance() {
  static ResumePool* p = new ResumePool();  // never destroyed: its threads outlive statics
  return *p;
}

void ResumePool::submit(PoolTask* t) {
  std::lock_guard<std::mutex> l(mu_);
  t->next_task = nullptr;
  (tail_ ? tail_->next_task : head_) = t;
  tail_ = t;
  ++queued_;
  if (queued_ > idle_ && threads_ < kMaxThreads) {
    ++threads_;
    std::thread([this] { loop(); }).detach();
  }
  if (idle_) cv_.notify_one();
}

unsigned ResumePool::threads() const {
  std::lock_guard<std::mutex> l(mu_);
  return threads_;
}

void ResumePool::loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    while (!head_) {
      ++idle_;
      cv_.wait(lk);
      --idle_;
    }
    PoolTask* t = head_;
    head_ = t->next_task;
    if (!head_) tail_ = nullptr;
    --queued_;
    lk.unlock();
    t->run();
    lk.lock();
  }
}

// ---- Gate ----

void Gate::sleep(std::unique_lock<std::mutex>& lk, Waiter* w) {
  if (deadline_ == kNever) {
    w->cv.wait(lk);
    return;
  }
  // steady_clock is CLOCK_MONOTONIC, the clock of every deadline here.
  const auto at = std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline_));
  w->cv.wait_until(lk, at);
}

void Gate::set_deadline(uint64_t t) {
  const bool earlier = t < deadline_;
  deadline_ = t;
  if (!earlier) return;
  if (leader_) leader_->cv.notify_one();
  if (parked_) timer_cv_.notify_one();
}

void Gate::grant(Waiter* w) {
  w->granted = true;
  if (!w->task) {
    w->cv.notify_one();
    return;
  }
  PoolTask* t = w->task;
  if (w->queued) w->queued->fetch_sub(1, std::memory_order_relaxed);
  --parked_;
  ResumePool::instance().submit(t);  // t may run (and free w) at once
}

Gate::~Gate() {
  if (!timer_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(*mu_);
    timer_stop_ = true;
  }
  timer_cv_.notify_all();
  timer_.join();
}

// ---- groups ----

namespace {

struct GroupRegistry {
  std::mutex mu;
  std::map<std::string, std::weak_ptr<Group>> groups;  // under mu
};

GroupRegistry& registry() {
  static GroupRegistry* r = new GroupRegistry();  // never destroyed: disks may outlive statics
  return *r;
}

}  // namespace

std::shared_ptr<Group> Group::get(const std::string& name, const ThrottleConfig& limits) {
  GroupRegistry& r = registry();
  std::shared_ptr<Group> g;
  {
    std::lock_guard<std::mutex> l(r.mu);
    for (auto it = r.groups.begin(); it != r.groups.end();)  // forget groups nobody holds
      it = it->second.expired() ? r.groups.erase(it) : std::next(it);
    auto it = r.groups.find(name);
    if (it != r.groups.end()) g = it->second.lock();
    if (!g) {
      g = std::make_shared<Group>(name, limits);
      r.groups[name] = g;
      return g;
    }
  }
  g->configure(limits);
  return g;
}

int Group::join() {
  std::lock_guard<std::mutex> l(mu_);
  return q_.join();
}

void Group::leave(int member) {
  std::lock_guard<std::mutex> l(mu_);
  q_.leave(member);
}

void Group::configure(const ThrottleConfig& limits) {
  std::lock_guard<std::mutex> l(mu_);
  if (q_.config() == limits) return;
  q_.configure(limits);
  pump_locked(monotonic_ns());
}

size_t Group::waiting() const {
  std::lock_guard<std::mutex> l(mu_);
  return q_.waiting();
}

void Group::pump_locked(uint64_t now) {
  uint64_t next = kNever;
  for (GroupRequest* r = q_.dispatch(now, &next); r;) {
    GroupRequest* n = r->next;  // r may be gone once granted
    gate_.grant(static_cast<Waiter*>(r->owner));
    r = n;
  }
  gate_.set_deadline(next);
}

Wait Group::pass(int member, bool is_write, uint64_t bytes, std::atomic<uint64_t>* queued, Parker* parker) {
  std::unique_lock<std::mutex> lk(mu_);
  Waiter w;
  GroupRequest r;
  r.is_write = is_write;
  r.bytes = bytes;
  r.owner = &w;
  q_.arrive(member, &r);
  pump_locked(monotonic_ns());
  if (w.granted) return Wait::kWent;
  if (parker) {
    lk.unlock();  // the take copies a write's data: not under the group's lock
    ParkedWait* p = parker->park();
    lk.lock();
    if (p) {
      if (w.granted) {  // its turn came meanwhile: on at once, on a pool thread
        ResumePool::instance().submit(p->waiter.task);
        return Wait::kParked;
      }
      p->waiter.granted = false;
      p->waiter.queued = queued;
      p->group.owner = &p->waiter;
      q_.replace(member, &r, &p->group);
      queued->fetch_add(1, std::memory_order_relaxed);
      gate_.park(&mu_, [this](uint64_t now) { pump_locked(now); });
      return Wait::kParked;
    }
    if (w.granted) return Wait::kWent;
  }
  queued->fetch_add(1, std::memory_order_relaxed);
  gate_.wait(lk, &w, [this](uint64_t now) { pump_locked(now); });
  queued->fetch_sub(1, std::memory_order_relaxed);
  return Wait::kWaited;
}

bool Group::park(int member, bool is_write, uint64_t bytes, ParkedWait* p, std::atomic<uint64_t>* queued) {
  std::lock_guard<std::mutex> lk(mu_);
  PoolTask* const task = p->waiter.task;
  p->waiter.task = nullptr;  // granted at once: goes on on this thread, not through the pool
  p->waiter.granted = false;
  p->waiter.queued = nullptr;
  p->group.is_write = is_write;
  p->group.bytes = bytes;
  p->group.owner = &p->waiter;
  q_.arrive(member, &p->group);
  pump_locked(monotonic_ns());
  p->waiter.task = task;
  if (p->waiter.granted) return false;
  p->waiter.queued = queued;
  queued->fetch_add(1, std::memory_order_relaxed);
  gate_.park(&mu_, [this](uint64_t now) { pump_locked(now); });
  return true;
}

bool Group::unpark(int member, ParkedWait* p) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!p->waiter.task || p->waiter.granted || !q_.remove(member, &p->group)) return false;
  gate_.grant(&p->waiter);  // to the pool; p may be gone once the lock is let go
  pump_locked(monotonic_ns());
  return true;
}

void Group::release(int member) {
  std::lock_guard<std::mutex> lk(mu_);
  for (GroupRequest* r = q_.remove_all(member); r;) {
    GroupRequest* n = r->next;  // r may be gone once granted
    gate_.grant(static_cast<Waiter*>(r->owner));
    r = n;
  }
  pump_locked(monotonic_ns());
}

// ---- the datastore's QoS ----

QosDomain& QosDomain::instance() {
  static QosDomain* d = new QosDomain();  // never destroyed, as the registry
  return *d;
}

int QosDomain::add(const QosParams& p) {
  std::lock_guard<std::mutex> l(mu_);
  return sched_.add(p);
}

void QosDomain::set(int client, const QosParams& p) {
  std::lock_guard<std::mutex> l(mu_);
  if (sched_.params(client) == p) return;
  sched_.set(client, p);
  if (sched_.waiting()) pump_locked(monotonic_ns());
}

void QosDomain::remove(int client) {
  std::lock_guard<std::mutex> l(mu_);
  sched_.remove(client);
}

void QosDomain::maybe_tick(uint64_t now) {
  if (now < next_tick_.load(std::memory_order_relaxed)) return;
  std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);  // someone else is at it otherwise
  if (lk.owns_lock() && now >= next_tick_.load(std::memory_order_relaxed)) tick_locked(now);
}

void QosDomain::tick_locked(uint64_t now) {
  const uint64_t interval = cc_.options().interval_ns;
  const uint64_t elapsed = last_tick_ ? now - last_tick_ : interval;
  last_tick_ = now;
  next_tick_.store(now + interval, std::memory_order_relaxed);
  const uint64_t count = lat_count_.exchange(0, std::memory_order_relaxed);
  const uint64_t sum = lat_sum_.exchange(0, std::memory_order_relaxed);
  const bool was = cc_.congested();
  const uint64_t threshold = datastore_settings().congestion_latency_ns;
  cc_.update(threshold, elapsed, count, sum, inflight_.load(std::memory_order_relaxed), sched_.reserved_iops());
  congested_.store(cc_.congested(), std::memory_order_release);
  window_.store(cc_.window(), std::memory_order_relaxed);
  latency_ns_.store(cc_.latency_ns(), std::memory_order_relaxed);
  if (cc_.congested() != was) {
    if (cc_.congested())
      spdlog::info("datastore congested (latency {:.1f}ms, above {:.1f}ms): I/O shared by shares and reservations, "
                   "window {}",
                   cc_.latency_ns() / 1e6, threshold / 1e6, cc_.window());
    else
      spdlog::info("datastore no longer congested (latency {:.1f}ms): only limits apply", cc_.latency_ns() / 1e6);
  }
  if (sched_.waiting()) pump_locked(now);  // a wider window, or no window at all
}

void QosDomain::pump_locked(uint64_t now) {
  if (now >= next_tick_.load(std::memory_order_relaxed)) {
    tick_locked(now);  // pumps itself
    return;
  }
  uint64_t next = kNever;
  const uint64_t window = cc_.window();
  for (QosRequest* r = sched_.dispatch(now, inflight_.load(std::memory_order_relaxed), window, &next); r;) {
    QosRequest* n = r->next;  // r may be gone once granted
    inflight_.fetch_add(1, std::memory_order_relaxed);  // before a parked one can go down and leave()
    gate_.grant(static_cast<Waiter*>(r->owner));
    r = n;
  }
  waiting_.store(sched_.waiting(), std::memory_order_relaxed);
  // While requests wait the leader also keeps the control loop ticking.
  if (sched_.waiting()) next = std::min(next, next_tick_.load(std::memory_order_relaxed));
  gate_.set_deadline(next);
}

Wait QosDomain::enter(int client, std::atomic<uint64_t>* queued, Parker* parker) {
  const uint64_t now = monotonic_ns();
  maybe_tick(now);
  if (!congested_.load(std::memory_order_acquire)) {
    inflight_.fetch_add(1, std::memory_order_relaxed);
    return Wait::kWent;
  }
  std::unique_lock<std::mutex> lk(mu_);
  if (!cc_.congested()) {
    inflight_.fetch_add(1, std::memory_order_relaxed);
    return Wait::kWent;
  }
  Waiter w;
  QosRequest r;
  r.arrival = now;
  r.owner = &w;
  sched_.arrive(client, &r);
  pump_locked(now);
  if (w.granted) return Wait::kWent;
  if (parker) {
    lk.unlock();  // as in Group::pass
    ParkedWait* p = parker->park();
    lk.lock();
    if (p) {
      if (w.granted) {
        ResumePool::instance().submit(p->waiter.task);
        return Wait::kParked;
      }
      p->waiter.granted = false;
      p->waiter.queued = queued;
      p->qos.owner = &p->waiter;
      sched_.replace(client, &r, &p->qos);
      queued->fetch_add(1, std::memory_order_relaxed);
      gate_.park(&mu_, [this](uint64_t t) { pump_locked(t); });
      return Wait::kParked;
    }
    if (w.granted) return Wait::kWent;
  }
  queued->fetch_add(1, std::memory_order_relaxed);
  gate_.wait(lk, &w, [this](uint64_t t) { pump_locked(t); });
  queued->fetch_sub(1, std::memory_order_relaxed);
  return Wait::kWaited;
}

bool QosDomain::park(int client, ParkedWait* p, std::atomic<uint64_t>* queued) {
  const uint64_t now = monotonic_ns();
  maybe_tick(now);
  if (!congested_.load(std::memory_order_acquire)) {
    inflight_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (!cc_.congested()) {
    inflight_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  PoolTask* const task = p->waiter.task;
  p->waiter.task = nullptr;  // as in Group::park
  p->waiter.granted = false;
  p->waiter.queued = nullptr;
  p->qos.arrival = now;
  p->qos.owner = &p->waiter;
  sched_.arrive(client, &p->qos);
  pump_locked(now);
  p->waiter.task = task;
  if (p->waiter.granted) return false;
  p->waiter.queued = queued;
  queued->fetch_add(1, std::memory_order_relaxed);
  gate_.park(&mu_, [this](uint64_t t) { pump_locked(t); });
  return true;
}

bool QosDomain::unpark(int client, ParkedWait* p) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!p->waiter.task || p->waiter.granted || !sched_.remove_request(client, &p->qos)) return false;
  inflight_.fetch_add(1, std::memory_order_relaxed);  // as pump_locked's grants
  gate_.grant(&p->waiter);
  waiting_.store(sched_.waiting(), std::memory_order_relaxed);
  return true;
}

void QosDomain::release(int client) {
  std::lock_guard<std::mutex> lk(mu_);
  for (QosRequest* r = sched_.remove_all(client); r;) {
    QosRequest* n = r->next;  // r may be gone once granted
    inflight_.fetch_add(1, std::memory_order_relaxed);  // as pump_locked's grants
    gate_.grant(static_cast<Waiter*>(r->owner));
    r = n;
  }
  waiting_.store(sched_.waiting(), std::memory_order_relaxed);
}

void QosDomain::leave(uint64_t latency_ns) {
  inflight_.fetch_sub(1, std::memory_order_relaxed);
  lat_sum_.fetch_add(latency_ns, std::memory_order_relaxed);
  lat_count_.fetch_add(1, std::memory_order_relaxed);
  const uint64_t now = monotonic_ns();
  maybe_tick(now);
  if (waiting_.load(std::memory_order_relaxed) == 0) return;
  std::lock_guard<std::mutex> l(mu_);  // a slot is free: hand it on
  if (sched_.waiting()) pump_locked(now);
}

QosDomain::Snapshot QosDomain::snapshot() const {
  Snapshot s;
  s.congested = congested_.load(std::memory_order_relaxed);
  s.window = window_.load(std::memory_order_relaxed);
  s.inflight = inflight_.load(std::memory_order_relaxed);
  s.waiting = waiting_.load(std::memory_order_relaxed);
  s.latency_ns = latency_ns_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace iofilterfs::throttle

// The throttle's shared run-time state: throttle groups and the datastore QoS domain, with the
// threads, clocks and locks that the pure schedulers (group.h, qos.h) leave out.
//
// Waiting. A request waits in a queue-based stage (a group's round robin, the datastore's
// mClock) in one of two ways, and nothing spins or polls in either:
//
//   parked    a deferred request (filter.h, "Deferring") holds no thread: its nodes (a
//             ParkedWait, in the throttle's record of it) are queued, and when the scheduler
//             grants it, its task goes to the ResumePool, whose thread carries it on. Each
//             queue has one timer thread, started by its first parked request, that sleeps
//             until the scheduler's next event and runs it;
//   blocked   a request that cannot be deferred (a filter above the throttle that does not pass
//             deferral, or an out-of-memory take) blocks its thread on its own condition
//             variable. One of the blocked threads, the leader, sleeps until the scheduler's
//             next event (a timed wait), runs the scheduler and wakes whoever it grants; the
//             others sleep untimed until granted. A granted leader hands the role on.
//
// Arrivals and completions run the scheduler too, inline, so a request that may go at once
// never waits, and a freed slot is handed on without a timer. A request that arrives on a FUSE
// worker and must wait is offered to its Parker first (pass()/enter() below): the queue lets go
// of its lock, the throttle takes the request from the worker (Deferrer::take, which copies a
// write's data), and the queue swaps the worker's nodes for the record's in place — the
// request keeps its turn — or, if it was granted meanwhile, hands the record to the pool at
// once.
//
// The requests a disk's own limits hold (stage 1) wait in the throttle's held queue (held.h)
// under the disk's own timer thread, and go to the ResumePool from there.
//
// Threads and locks. Each Group has its own mutex (members of other groups, and disks in no
// group, never touch it); the QoS domain has one mutex for the datastore, taken per request only
// while the datastore is congested (otherwise a request costs three relaxed atomic operations
// and a clock read there). The group registry's mutex is taken when a disk joins or leaves a
// group. A grant hands a parked request to the ResumePool under the queue's mutex: the pool's
// mutex is a leaf, taken last. No other lock here is held while another is taken, and none while
// calling the layer below.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "group.h"
#include "qos.h"

namespace iofilterfs::throttle {

// CLOCK_MONOTONIC in ns: the clock every throttle time is on (steady_clock is the same clock).
uint64_t monotonic_ns();

// Work for the ResumePool: run() is called once, on a pool thread.
class PoolTask {
 public:
  virtual void run() = 0;
  PoolTask* next_task = nullptr;  // the pool's

 protected:
  ~PoolTask() = default;
};

// The process-wide threads that resume deferred requests. It grows on demand — a task that
// finds no idle thread starts one, up to kMaxThreads — and its threads stay (idle, asleep on
// a condition variable) for the process's life. A task may block (a group's round robin, the
// datastore's QoS, a slow backing store), which is why there is more than one.
class ResumePool {
 public:
  static constexpr unsigned kMaxThreads = 64;
  static ResumePool& instance();
  // Queues t (FIFO). Never blocks beyond the pool's mutex.
  void submit(PoolTask* t);
  unsigned threads() const;

 private:
  void loop();
  mutable std::mutex mu_;
  std::condition_variable cv_;
  PoolTask *head_ = nullptr, *tail_ = nullptr;  // under mu_
  size_t queued_ = 0;                           // under mu_
  unsigned threads_ = 0, idle_ = 0;             // under mu_
};

// One request waiting in a queue-based stage: blocked (on its thread's stack), or parked (in a
// ParkedWait, with `task` set).
struct Waiter {
  std::condition_variable cv;
  bool granted = false;
  PoolTask* task = nullptr;                 // parked: submitted to the ResumePool when granted
  std::atomic<uint64_t>* queued = nullptr;  // parked: counts it until granted
  Waiter *prev = nullptr, *next = nullptr;  // blocked: in the Gate's list
};

// The nodes with which a deferred request waits in a group and then in the datastore, without
// a thread. Lives in the throttle's record of the request; waiter.task is that record.
struct ParkedWait {
  Waiter waiter;
  GroupRequest group;
  QosRequest qos;
};

// Offered by a request that arrives on a thread it could give back (a FUSE worker with a
// Deferrer): park() takes the request and answers the nodes it will wait with, or null when it
// cannot (then it blocks). Called with no lock of the queue held.
class Parker {
 public:
  virtual ParkedWait* park() = 0;

 protected:
  ~Parker() = default;
};

// How a request passed a queue-based stage.
enum class Wait {
  kWent,     // at once
  kWaited,   // after blocking its thread
  kParked,   // it was parked (or taken and granted meanwhile): its task carries it on
};

// The waiting side of one queue (see above): leader/follower for blocked waiters, a timer
// thread for parked ones. Every member is under the queue's mutex, except the thread object,
// which only park() (under it) and the destructor touch.
class Gate {
 public:
  Gate() = default;
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  // Stops the timer thread (takes the queue's mutex, which must outlive the Gate).
  ~Gate();
  // Blocks (lk holds the queue's mutex) until w->granted. pump(now) runs the scheduler: it
  // grants (Gate::grant) and calls set_deadline with the scheduler's next event.
  template <typename Pump>
  void wait(std::unique_lock<std::mutex>& lk, Waiter* w, Pump&& pump);
  // A waiter with its task was queued (the scheduler holds it): it waits without a thread; the
  // timer thread (started here the first time, on the queue's mutex mu) runs pump at the
  // deadlines while any is parked.
  template <typename Pump>
  void park(std::mutex* mu, Pump pump);
  // The scheduler's next event, after a run; wakes the leader and the timer when it is
  // earlier than the one they sleep for.
  void set_deadline(uint64_t t);
  // w may go: a blocked waiter is woken, a parked one's task goes to the ResumePool (w may be
  // gone when this returns).
  void grant(Waiter* w);

 private:
  void sleep(std::unique_lock<std::mutex>& lk, Waiter* w);
  Waiter *head_ = nullptr, *tail_ = nullptr;  // every blocked waiter
  Waiter* leader_ = nullptr;
  uint64_t deadline_ = kNever;
  size_t parked_ = 0;
  std::condition_variable timer_cv_;
  bool timer_stop_ = false;
  std::mutex* mu_ = nullptr;  // the queue's, once the timer runs
  std::thread timer_;
};

// A throttle group: one GroupQueue behind a mutex, shared by its member disks.
class Group {
 public:
  // The group named `name` (made on first use, with `limits`). When it exists with other
  // limits it takes these: every policy that names a group gives it the same limits (checked
  // when the file loads), so they differ only while a reload re-plumbs the members one by one.
  static std::shared_ptr<Group> get(const std::string& name, const ThrottleConfig& limits);

  explicit Group(std::string name, const ThrottleConfig& limits) : name_(std::move(name)), q_(limits) {}
  const std::string& name() const { return name_; }
  int join();
  void leave(int member);
  // New limits: fresh buckets, the queue kept and rescheduled.
  void configure(const ThrottleConfig& limits);
  // Returns when the group's budget lets this request of `member` start (its round-robin
  // turn), or when it was parked through `parker` (see above). *queued counts it while it
  // waits.
  Wait pass(int member, bool is_write, uint64_t bytes, std::atomic<uint64_t>* queued, Parker* parker = nullptr);
  // A deferred request (its nodes in p, p->waiter.task set): false when it may start now;
  // true when it is queued, and then its task runs when the group grants it.
  bool park(int member, bool is_write, uint64_t bytes, ParkedWait* p, std::atomic<uint64_t>* queued);
  // A parked request of `member` (see park) goes on now, uncharged: taken out of the queue and
  // its task handed to the ResumePool. False (nothing done) when it is not parked here.
  bool unpark(int member, ParkedWait* p);
  // Every request of `member` waiting here goes on now, uncharged: blocked ones wake, parked
  // ones go to the pool (a disk releasing what it holds).
  void release(int member);
  size_t waiting() const;

 private:
  void pump_locked(uint64_t now);
  const std::string name_;
  mutable std::mutex mu_;
  GroupQueue q_;  // under mu_
  Gate gate_;     // under mu_
};

// One disk's place in a group; leaves it when the last holder lets go (the filter, and each
// request of it still queued in the group).
struct GroupMember {
  GroupMember(std::shared_ptr<Group> g) : group(std::move(g)), id(group->join()) {}
  ~GroupMember() { group->leave(id); }
  GroupMember(const GroupMember&) = delete;
  GroupMember& operator=(const GroupMember&) = delete;
  const std::shared_ptr<Group> group;
  const int id;
};

// The datastore's QoS: every throttled disk is a client; the scheduler runs only while
// congestion control is on.
class QosDomain {
 public:
  // The daemon's (one datastore per process).
  static QosDomain& instance();
  explicit QosDomain(const CongestionOptions& o = {}) : cc_(o) {}

  int add(const QosParams& p);
  void set(int client, const QosParams& p);
  void remove(int client);

  // Before a request goes below the throttle: returns at once unless the datastore is
  // congested, else when the scheduler dispatches it, or when it was parked through `parker`.
  // *queued counts it while it waits.
  Wait enter(int client, std::atomic<uint64_t>* queued, Parker* parker = nullptr);
  // A deferred request, as Group::park.
  bool park(int client, ParkedWait* p, std::atomic<uint64_t>* queued);
  // As Group::unpark: the request goes below now, counted in flight (leave() follows).
  bool unpark(int client, ParkedWait* p);
  // Every request of `client` waiting in the scheduler goes on now, uncharged and counted in
  // flight (leave() follows each): blocked ones wake, parked ones go to the pool (a disk
  // releasing what it holds, as Group::release).
  void release(int client);
  // A request that skips the scheduler (its disk is releasing what it holds): counted in
  // flight, as enter() counts every request (leave() follows).
  void bypass() { inflight_.fetch_add(1, std::memory_order_relaxed); }
  // After it came back up, latency_ns after it went down.
  void leave(uint64_t latency_ns);

  struct Snapshot {
    bool congested = false;
    uint64_t window = kUnlimited;  // while congested
    uint64_t inflight = 0;         // below the throttle, every disk
    uint64_t waiting = 0;          // in the scheduler, every disk
    uint64_t latency_ns = 0;       // mean of the last interval with completions
  };
  Snapshot snapshot() const;

 private:
  void maybe_tick(uint64_t now);
  void tick_locked(uint64_t now);
  void pump_locked(uint64_t now);

  mutable std::mutex mu_;
  QosScheduler sched_;     // under mu_
  CongestionControl cc_;   // under mu_
  Gate gate_;              // under mu_
  uint64_t last_tick_ = 0; // under mu_
  std::atomic<bool> congested_{false};  // cc_.congested(), for the fast path
  std::atomic<uint64_t> window_{kUnlimited}, latency_ns_{0}, waiting_{0};
  std::atomic<uint64_t> inflight_{0}, lat_sum_{0}, lat_count_{0}, next_tick_{0};
};

template <typename Pump>
void Gate::park(std::mutex* mu, Pump pump) {
  ++parked_;
  if (timer_.joinable()) {
    timer_cv_.notify_one();
    return;
  }
  mu_ = mu;
  timer_ = std::thread([this, pump]() mutable {
    std::unique_lock<std::mutex> lk(*mu_);
    while (!timer_stop_) {
      if (!parked_ || deadline_ == kNever)
        timer_cv_.wait(lk);
      else  // steady_clock is CLOCK_MONOTONIC, the clock of every deadline here
        timer_cv_.wait_until(lk, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline_)));
      if (!timer_stop_ && parked_) pump(monotonic_ns());
    }
  });
}

template <typename Pump>
void Gate::wait(std::unique_lock<std::mutex>& lk, Waiter* w, Pump&& pump) {
  w->prev = tail_;
  w->next = nullptr;
  (tail_ ? tail_->next : head_) = w;
  tail_ = w;
  while (!w->granted) {
    if (!leader_) leader_ = w;
    if (leader_ != w) {
      w->cv.wait(lk);
      continue;
    }
    sleep(lk, w);  // until the deadline, or until woken
    if (!w->granted) pump(monotonic_ns());
  }
  (w->prev ? w->prev->next : head_) = w->next;
  (w->next ? w->next->prev : tail_) = w->prev;
  if (leader_ == w) {
    leader_ = head_;  // hand the timer on
    if (leader_) leader_->cv.notify_one();
  }
}

}  // namespace iofilterfs::throttle

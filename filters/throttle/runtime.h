// The throttle's shared run-time state: throttle groups and the datastore QoS domain, with the
// threads, clocks and locks that the pure schedulers (group.h, qos.h) leave out.
//
// Waiting. A request that must wait blocks its own FUSE worker thread on its own condition
// variable; nothing spins and nothing polls. A queue-based stage (a group's round robin, the
// datastore's mClock) decides who goes when the budget frees up, so someone must wake up at the
// scheduler's next event: one of the waiting threads, the leader, sleeps until then (a timed
// wait), runs the scheduler and wakes whoever it grants; the others sleep untimed until they
// are granted. When the leader itself is granted it hands the role to another waiter. Arrivals
// and completions run the scheduler too, inline, so a request that may go at once never sleeps,
// and a freed slot is handed on without a timer.
//
// Deferred requests (filter.h, "Deferring") wait for their stage-1 start time without any
// thread: the disk's throttle keeps them in its held queue (held.h) and one timer thread per
// disk sleeps until the earliest start. When a start comes the timer hands the request to the
// ResumePool below, whose threads carry it through stages 2 and 3 (which may still wait, on
// the pool's thread then, not a FUSE worker) and down the chain, and complete it.
//
// Threads and locks. Each Group has its own mutex (members of other groups, and disks in no
// group, never touch it); the QoS domain has one mutex for the datastore, taken per request only
// while the datastore is congested (otherwise a request costs three relaxed atomic operations
// and a clock read there). The group registry's mutex is taken when a disk joins or leaves a
// group. No lock here is held while another is taken, and none while calling the layer below.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

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

// One request blocked in a queue-based stage (lives on its thread's stack).
struct Waiter {
  std::condition_variable cv;
  bool granted = false;
  Waiter *prev = nullptr, *next = nullptr;  // in the Gate's list
};

// Leader/follower waiting for one queue (see above). Every member is under the queue's mutex.
class Gate {
 public:
  // Blocks (lk holds the queue's mutex) until w->granted. pump(now) runs the scheduler: it
  // grants (Gate::grant) and calls set_deadline with the scheduler's next event.
  template <typename Pump>
  void wait(std::unique_lock<std::mutex>& lk, Waiter* w, Pump&& pump);
  // The scheduler's next event, after a run; wakes the leader when it is earlier than the one
  // it sleeps for.
  void set_deadline(uint64_t t);
  static void grant(Waiter* w) {
    w->granted = true;
    w->cv.notify_one();
  }

 private:
  void sleep(std::unique_lock<std::mutex>& lk, Waiter* w);
  Waiter *head_ = nullptr, *tail_ = nullptr;  // every waiter
  Waiter* leader_ = nullptr;
  uint64_t deadline_ = kNever;
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
  // turn); true when it had to wait. *queued counts it while it waits.
  bool pass(int member, bool is_write, uint64_t bytes, std::atomic<uint64_t>* queued);
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
  // congested, else when the scheduler dispatches it; true when it had to wait. *queued
  // counts it while it waits.
  bool enter(int client, std::atomic<uint64_t>* queued);
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

// The throttle filter (class throttle): per-disk IOPS and bandwidth limits with QEMU's
// semantics, throttle groups, and the datastore's QoS (shares, reservation, limit) under
// congestion. A thin adapter over pure schedulers: bucket.h (a disk's limits), group.h (a
// group's round robin), qos.h (mClock and the congestion control), params.h (the keys), with
// their run-time side in runtime.h.
//
// A read or write passes three stages, each of which may hold it (other requests, of this disk
// and of others, go on), then goes down, timed:
//
//   1. the disk:       its `limit` (mClock's L tag: requests spaced 1/limit apart) and, when it
//                      is in no group, its own leaky buckets. The start time is known at
//                      arrival (bucket.h), and a request that must wait goes into the held
//                      queue (held.h) until then, under the disk's timer thread.
//   2. its group:      the group's buckets, round robin over the member disks (group.h).
//   3. the datastore:  while congestion control is on, mClock's dispatch by reservation and
//                      shares within the window (qos.h); otherwise it passes at once.
//   4. below:          next_->read/write; the time it takes is the latency that tells the
//                      datastore's congestion control whether the backing store is congested.
//
// Whatever stage makes a request wait, it waits without a thread when it may be deferred
// (filter.h, "Deferring"): it is taken from its FUSE worker (which returns at once) into a
// Parked record, which waits in the held queue or is parked in the group's or the datastore's
// queue (runtime.h); when its time comes, a ResumePool thread carries it to the next stage,
// where it may be parked again, and finally down, and answers it. No thread is spent on a
// waiting request, so no depth of queue on a throttled disk (or group, or congested
// datastore) can take the workers that other disks, or this disk's reads under separate read
// and write limits, need, nor the pool's threads. A request that goes at once is never taken
// (no copy, no allocation). Where the chain does not allow deferral (a filter above the
// throttle that works on results: replicate, or a cache on the requests it does not forward
// as they are), the worker waits instead: at stage 1 on its own condition variable, at stages
// 2 and 3 blocked in the queue (runtime.h). A reload that changes the limits reschedules the
// requests held at stage 1, both kinds, in their arrival order.
//
// Every other operation passes through untouched (not charged, as in QEMU).
//
// State is per disk (one filter instance per disk's chain), plus the shared Group and the
// process-wide QosDomain (runtime.h). Threads: any number of FUSE workers call read/write
// concurrently; reconfigure(), open() and close() run under the disk's control lock, alongside
// them; pool threads carry deferred requests. mu_ guards the disk's own scheduling state and is
// never held while waiting in a group or the datastore, nor while calling the layer below (nor
// is it taken under a group's or the datastore's mutex: a worker's request is taken with those
// let go); meter_mu_ guards the rate meter. The timer thread takes mu_ and, under it, the
// ResumePool's mutex (a leaf). release_deferred()'s sweep takes a group's or the datastore's
// mutex under mu_ (nothing takes mu_ under those). Lock order: mu_, then a group's or the
// datastore's mutex, then the pool's mutex; nothing else here is taken while another lock is
// held.
// The counters are atomics, read without a lock by stats_json().
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "bucket.h"
#include "held.h"
#include "filter.h"
#include "params.h"
#include "qos.h"
#include "runtime.h"

namespace iofilterfs {

class ThrottleFilter : public Filter {
 public:
  explicit ThrottleFilter(const throttle::ThrottleParams& p);
  explicit ThrottleFilter(const throttle::ThrottleConfig& cfg);
  ~ThrottleFilter() override;

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;

  // Joins the group and the datastore's QoS; close() leaves them. A filter used without
  // open() (a unit test's chain) has its own limits only.
  Status open(const DiskInfo&) override;
  void close() override;
  // New parameters in place: the requests waiting at the disk are rescheduled under the new
  // limits in their order, a new group is joined for the requests that arrive from now on (the
  // ones queued in the old group are served there), new shares and reservation apply at once.
  bool reconfigure(const YAML::Node& params) override;
  // Everything this disk holds goes on at once, unthrottled, and so do new requests until
  // defer_again(): the deferred requests held at the disk go to the pool, the ones parked in
  // its group's or the datastore's queue are taken out of it (uncharged) and go too, and the
  // workers sleeping at the disk's limit or blocked in those queues wake; returns when no
  // deferred request is left here and no worker is in a queue
  // (a re-plumb thus waits for the requests' trip below, not for their turns at the limit).
  // close() does it too, and stops the timer thread.
  void release_deferred() override;
  void defer_again() override;

  // {"delayed":N,"wait_ns":N,"wait_us":N,"queued":N,"inflight":N,"reads":N,"writes":N,
  //  "read_bytes":N,"write_bytes":N,"iops":N,"bytes_per_s":N,"mb_per_s":X,"group":S|null,
  //  "shares":N,"reservation":N,"limit":N,"congested":B,"window":N|null,
  //  "datastore_latency_us":N}: see iofilterfs.yaml(5).
  std::string stats_json() const override;
  // The parameters, e.g. "iops=500 bps=20MiB/s group=db shares=2000".
  std::string describe() const override;

 private:
  // A deferred request (filter.h, "Deferring"), from its take until it is answered: in held_
  // until its start (stage 1), then carried by pool threads, parked in its group's and the
  // datastore's queues (runtime.h) while they make it wait.
  struct Parked final : throttle::PoolTask, Continuation {
    ThrottleFilter* filter = nullptr;
    Deferred* request = nullptr;
    throttle::Held held;  // is_write and bytes always; the rest while in held_
    bool direct = false;
    uint64_t off = 0, t_arrival = 0;
    int stage = 2;  // the next stage it passes: 2 its group, 3 the datastore, 4 below
    std::shared_ptr<throttle::GroupMember> member;  // its group (kept while it waits there)
    throttle::ParkedWait wait;                      // wait.waiter.task is this
    Parked* next_free = nullptr;                    // in records_ (Recycler)
    Parked *live_prev = nullptr, *live_next = nullptr;  // in live_ (mu_) from take to answer
    void run() override;                           // PoolTask: on a pool thread
    Status run(void* data, size_t* got) override;  // Continuation: inside the disk
  };
  struct WorkerParker;
  // Takes the request on io.defer into a new Parked that goes on at `stage` (mu_ held), or
  // null when it cannot be deferred (then it waits on its thread).
  Parked* take_locked(const Io& io, bool is_write, uint64_t bytes, uint64_t off, uint64_t t_arrival, int stage);
  // Stage 1. Returns true when the request was deferred (the caller returns Deferred); else
  // it may go on, after sleeping here if it had to (*waited).
  bool stage1(const Io& io, bool is_write, uint64_t bytes, uint64_t off, uint64_t t_arrival, bool* waited);
  // Stages 2-4 on the worker it arrived on: Deferred when it was parked in its group or the
  // datastore, else its status from below.
  Status pass(const Io& io, bool is_write, void* buf, size_t len, uint64_t off, size_t* got, uint64_t t_arrival,
              bool waited);
  // A deferred request's stages 2 and 3 on a pool thread, from p->stage: true when it was
  // parked (its task runs again when granted), false when it may go below now.
  bool advance(Parked* p);
  // Stage 4: below, timed, and the accounting.
  Status down(bool is_write, bool direct, void* buf, size_t len, uint64_t off, size_t* got, uint64_t t_arrival,
              bool waited);
  // Hands the listed requests (take_due's answer) to the pool (mu_ held).
  void dispatch_locked(throttle::Held* list);
  // release_deferred's sweep (mu_ held): every live request parked in a group or the
  // datastore's queue goes on now.
  void unpark_all_locked();
  void timer_loop();
  // Stage 1's start time for a request arriving at now (mu_ held).
  uint64_t start_for(bool is_write, uint64_t bytes, uint64_t now);
  // After the layer below answered.
  void done(bool is_write, uint64_t bytes, uint64_t t_down, bool waited, uint64_t t_arrival);

  mutable std::mutex mu_;  // a leaf lock: guards what is marked so
  throttle::ThrottleParams params_;                 // under mu_
  throttle::ThrottleState state_;                   // under mu_: the disk's own limits (none in a group)
  throttle::TagClock limit_;                        // under mu_
  std::shared_ptr<throttle::GroupMember> member_;   // under mu_: null unless open and in a group
  throttle::HeldQueue held_;                        // under mu_: stage 1's deferred and sleeping requests
  throttle::Recycler<Parked> records_{256};         // under mu_: Parked records given back
  Parked* live_ = nullptr;                          // under mu_: every Parked taken, not yet answered
  std::condition_variable timer_cv_;                // the timer thread sleeps on it (mu_)
  std::condition_variable idle_cv_;                 // release_deferred() waits on it (mu_)
  std::thread timer_;                               // started with the first deferral
  bool timer_stop_ = false;                         // under mu_
  bool released_ = false;                           // under mu_: defer nothing (release_deferred)
  uint64_t outstanding_ = 0;                        // under mu_: taken (Parked), not yet answered
  // Workers in pass() before below: raised under mu_ (with released_ read), lowered without
  // it; release_deferred() waits for it to be 0, and while it does (releasing_) the worker that
  // lowers it to 0 wakes it under mu_.
  std::atomic<uint64_t> in_queues_{0};
  std::atomic<bool> releasing_{false};
  bool opened_ = false;                             // under mu_
  std::string describe_;                            // under mu_
  std::atomic<int> client_{-1};                     // the datastore QoS client while open

  mutable std::mutex meter_mu_;
  throttle::RateMeter meter_;  // under meter_mu_

  std::atomic<uint64_t> delayed_{0}, wait_ns_{0}, queued_{0}, inflight_{0};
  std::atomic<uint64_t> reads_{0}, writes_{0}, read_bytes_{0}, write_bytes_{0};
};

// Adds "throttle" to the registry.
void register_throttle(Registry& r);

}  // namespace iofilterfs

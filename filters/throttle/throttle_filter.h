// The throttle filter (class throttle): per-disk IOPS and bandwidth limits with QEMU's
// semantics, throttle groups, and the datastore's QoS (shares, reservation, limit) under
// congestion. A thin adapter over pure schedulers: bucket.h (a disk's limits), group.h (a
// group's round robin), qos.h (mClock and the congestion control), params.h (the keys), with
// their run-time side in runtime.h.
//
// A read or write passes three stages, each of which may hold it (its worker thread sleeps on
// its own condition variable; other requests, of this disk and of others, go on), then goes
// down, timed:
//
//   1. the disk:       its `limit` (mClock's L tag: requests spaced 1/limit apart) and, when it
//                      is in no group, its own leaky buckets. The start time is known at
//                      arrival (bucket.h), so the request sleeps until then; a reload that
//                      changes the limits reschedules the sleepers, in their order.
//   2. its group:      the group's buckets, round robin over the member disks (group.h).
//   3. the datastore:  while congestion control is on, mClock's dispatch by reservation and
//                      shares within the window (qos.h); otherwise it passes at once.
//   4. below:          next_->read/write; the time it takes is the latency that tells the
//                      datastore's congestion control whether the backing store is congested.
//
// Every other operation passes through untouched (not charged, as in QEMU).
//
// State is per disk (one filter instance per disk's chain), plus the shared Group and the
// process-wide QosDomain (runtime.h). Threads: any number of FUSE workers call read/write
// concurrently; reconfigure(), open() and close() run under the disk's control lock, alongside
// them. mu_ guards the disk's own scheduling state and is never held while waiting in a group
// or the datastore, nor while calling the layer below; meter_mu_ guards the rate meter. Lock
// order: none (no lock here is taken while another is held; the runtime's locks likewise).
// The counters are atomics, read without a lock by stats_json().
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "bucket.h"
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

  // {"delayed":N,"wait_ns":N,"wait_us":N,"queued":N,"inflight":N,"reads":N,"writes":N,
  //  "read_bytes":N,"write_bytes":N,"iops":N,"bytes_per_s":N,"mb_per_s":X,"group":S|null,
  //  "shares":N,"reservation":N,"limit":N,"congested":B,"window":N|null,
  //  "datastore_latency_us":N}: see iofilterfs.yaml(5).
  std::string stats_json() const override;
  // The parameters, e.g. "iops=500 bps=20MiB/s group=db shares=2000".
  std::string describe() const override;

 private:
  // One request sleeping at stage 1.
  struct Sleeper {
    bool is_write;
    uint64_t bytes;
    uint64_t start;  // when it may go on; moved by reconfigure()
    std::condition_variable cv;
    Sleeper *prev = nullptr, *next = nullptr;
  };
  // Stages 1-3; returns when the request may go down. *waited: it was held somewhere.
  void admit(bool is_write, uint64_t bytes, bool* waited);
  // Stage 1's start time for a request arriving at now (mu_ held).
  uint64_t start_for(bool is_write, uint64_t bytes, uint64_t now);
  // After the layer below answered.
  void done(bool is_write, uint64_t bytes, uint64_t t_down, bool waited, uint64_t t_arrival);

  mutable std::mutex mu_;  // a leaf lock: guards what is marked so
  throttle::ThrottleParams params_;                 // under mu_
  throttle::ThrottleState state_;                   // under mu_: the disk's own limits (none in a group)
  throttle::TagClock limit_;                        // under mu_
  std::shared_ptr<throttle::GroupMember> member_;   // under mu_: null unless open and in a group
  Sleeper *sleepers_ = nullptr, *sleepers_tail_ = nullptr;  // under mu_, in arrival order
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

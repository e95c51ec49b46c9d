// A filter's own threads, for the requests it must see through to the end on a thread.
//
// Under a throttle, a request held below holds the thread that waits for it. A filter above
// the throttle lets the throttle park its requests in one of two ways (filter.h, "Deferring"):
//
//   - it passes io.defer down and finishes its work in a completion hook (the cache's fills,
//     its write-through writes): nothing waits;
//   - or, when its work needs a thread of its own from start to end — replicate's journal,
//     send and range lock around the local write; a cache's write that reads part of a page
//     from below first — it takes the request itself and carries it on one of these threads.
//     The FUSE worker goes back at once to the other disks; the wait below holds a thread of
//     this pool, which belongs to this filter of this disk alone.
//
//   worker:  filter.write(io): offload.take(io) ─► return Deferred ─► (free for other disks)
//   pool:    d->resume(job) ─► [disk entered] filter.write(Io{direct}) ─► its call below with a
//            Waiter: the throttle parks it, this thread waits ─► the filter's work after ─► reply
//
// A pool thread runs the filter's ordinary blocking path (Run, with an Io without a Deferrer),
// so the filter's logic is the same on both threads; where that path calls below it may pass
// a Waiter (below) so that the filters below defer the call rather than block in it. Threads
// start on demand, up to a ceiling, and leave after a few idle seconds, so a disk that is
// never throttled has none.
//
// Threads: take() from any worker; release()/again()/stop() from the disk's control path
// (release_deferred, defer_again, close). One mutex (a leaf) guards the queue and the counts.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>

#include "filter.h"

namespace iofilterfs {

class Offload {
 public:
  // The request's work on a pool thread, inside the disk: a read or a write of len bytes at
  // off with `data` as its buffer (the framework's copy of a write's bytes; where a read goes,
  // *got set), `tag` as the filter gave it to take(). io carries no Deferrer.
  using Run = std::function<Status(bool is_write, const Io& io, void* data, size_t len, uint64_t off, uint32_t tag,
                                   size_t* got)>;
  static constexpr unsigned kDefaultThreads = 32;  // per filter and disk: half the daemon's default workers

  explicit Offload(Run run, unsigned max_threads = kDefaultThreads);
  ~Offload();  // stop()
  Offload(const Offload&) = delete;
  Offload& operator=(const Offload&) = delete;

  // Takes the request from io.defer and queues it for a pool thread: true, and the caller
  // returns Status::Deferred(). False (no Deferrer, released, stopped, out of memory): not
  // taken, and the caller carries it on its own thread.
  bool take(const Io& io, bool is_write, size_t len, uint64_t off, uint32_t tag = 0);

  // The filter's release_deferred(): take nothing new, and return once every request taken
  // has completed (queued ones start at once, on threads past the ceiling if need be).
  void release();
  // The filter's defer_again(): take requests again.
  void again();
  // Waits for the requests taken and for every thread to leave; take() refuses from now on.
  void stop();

  uint64_t taken() const;
  unsigned threads() const;

  // A Deferrer for one request that a carried request sends below, made by the carrying
  // thread, which then waits for it (wait()). A filter below may defer it (a throttle parks
  // it) and the filters in between finish their work in completion hooks, as under the
  // framework's own Deferrer (filter.h), so that none of them holds a lock of its own across
  // the wait below (a cache's block lock under replicate's carried write). `data` is the
  // request's buffer as the carrying thread passes it below: it must stay valid until wait()
  // returns.
  class Waiter final : public Deferrer, public Deferred {
   public:
    explicit Waiter(const void* data) : data_(const_cast<void*>(data)) {}
    Deferred* take() override;
    void then(Then* t) override;
    void* data() override { return data_; }
    void resume(Continuation& k) override;
    void finish(Status s, size_t got) override;
    // The call below answered s: returns the request's final status (after the hooks), once it
    // has completed; a read's byte count in *got.
    Status wait(Status s, size_t* got);

   private:
    void complete(Status s, size_t got);  // the finishing thread's party
    void run_hooks();

    void* const data_;
    bool taken_ = false;
    Then* hooks_ = nullptr;  // in registration order (bottom-up)
    Then* tail_ = nullptr;
    std::atomic<int> parties_{2};  // the finishing thread and the waiting one
    Status s_;
    size_t got_ = 0;
    std::mutex mu_;
    std::condition_variable cv_;
    bool done_ = false;  // under mu_: the hooks ran
  };

 private:
  struct Job;
  void loop();
  bool spawn_locked();  // one more thread (mu_ held); false when none can be started

  const Run run_;
  const unsigned max_threads_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // pool threads wait for a job (or stop)
  std::condition_variable done_cv_;  // release()/stop() wait for outstanding_/threads_ to reach 0
  Job* head_ = nullptr;              // the queue, oldest first
  Job* tail_ = nullptr;
  unsigned queued_ = 0;
  unsigned threads_ = 0;
  unsigned idle_ = 0;
  unsigned outstanding_ = 0;  // taken and not yet completed (queued or running)
  uint64_t taken_ = 0;
  bool released_ = false;
  bool stopping_ = false;
};

}  // namespace iofilterfs

// A filter's own threads for requests it carries to the end; see offload.h.
#include "offload.h"

#include <cerrno>
#include <chrono>
#include <new>
#include <system_error>
#include <thread>

namespace iofilterfs {

namespace {
// A pool thread with nothing to do for this long leaves (a burst's threads do not linger).
constexpr auto kIdleExit = std::chrono::seconds(5);
}  // namespace

struct Offload::Job final : Continuation {
  Offload* pool;
  Deferred* request;
  Job* next = nullptr;
  size_t len;
  uint64_t off;
  uint32_t tag;
  bool is_write;
  bool direct;

  Status run(void* data, size_t* got) override {
    return pool->run_(is_write, Io{direct}, data, len, off, tag, got);
  }
};

Offload::Offload(Run run, unsigned max_threads) : run_(std::move(run)), max_threads_(max_threads ? max_threads : 1) {}

Offload::~Offload() { stop(); }

bool Offload::spawn_locked() {
  try {
    std::thread([this] { loop(); }).detach();  // stop() waits for threads_ to reach 0
  } catch (const std::system_error&) {
    return false;  // no thread to be had now (a limit): the ones there are carry it
  }
  ++threads_;
  return true;
}

bool Offload::take(const Io& io, bool is_write, size_t len, uint64_t off, uint32_t tag) {
  if (!io.defer) return false;
  {
    // Counted before anything is taken, so that a release() that begins meanwhile waits for
    // this request too (it is queued after the release looked). A thread for it is started
    // first: a request is taken only when a thread of the pool will run it.
    std::lock_guard<std::mutex> l(mu_);
    if (released_ || stopping_) return false;
    if (queued_ >= idle_ && threads_ < max_threads_ && !spawn_locked() && threads_ == 0) return false;
    ++outstanding_;
  }
  Job* j = new (std::nothrow) Job;
  Deferred* d = j ? io.defer->take() : nullptr;
  std::lock_guard<std::mutex> l(mu_);
  if (!d) {
    delete j;
    if (--outstanding_ == 0) done_cv_.notify_all();
    return false;  // (a thread started for it leaves when idle)
  }
  j->pool = this;
  j->request = d;
  j->len = len;
  j->off = off;
  j->tag = tag;
  j->is_write = is_write;
  j->direct = io.direct;
  (tail_ ? tail_->next : head_) = j;
  tail_ = j;
  ++queued_;
  ++taken_;
  if (idle_) work_cv_.notify_one();
  return true;
}

void Offload::loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    while (!head_) {
      // Leaves when the pool stops, or after idling kIdleExit with nothing come meanwhile.
      bool leave = stopping_;
      if (!leave) {
        ++idle_;
        leave = work_cv_.wait_for(l, kIdleExit) == std::cv_status::timeout && !head_;
        --idle_;
      }
      if (leave) {
        --threads_;
        done_cv_.notify_all();
        return;  // touches nothing of the pool after the lock goes
      }
    }
    Job* j = head_;
    head_ = j->next;
    if (!head_) tail_ = nullptr;
    --queued_;
    l.unlock();
    j->request->resume(*j);  // enters the disk, runs Run, answers; the Deferred is gone after
    delete j;
    l.lock();
    if (--outstanding_ == 0) done_cv_.notify_all();
  }
}

void Offload::release() {
  std::unique_lock<std::mutex> l(mu_);
  released_ = true;
  // Every queued request starts now, past the ceiling: none waits for a thread to come free
  // (the filters below already let everything through).
  for (unsigned n = queued_ > idle_ ? queued_ - idle_ : 0; n && spawn_locked(); --n) {
  }
  work_cv_.notify_all();
  done_cv_.wait(l, [&] { return outstanding_ == 0; });
}

void Offload::again() {
  std::lock_guard<std::mutex> l(mu_);
  released_ = false;
}

void Offload::stop() {
  std::unique_lock<std::mutex> l(mu_);
  stopping_ = true;
  work_cv_.notify_all();
  done_cv_.wait(l, [&] { return outstanding_ == 0 && threads_ == 0; });
}

uint64_t Offload::taken() const {
  std::lock_guard<std::mutex> l(mu_);
  return taken_;
}

unsigned Offload::threads() const {
  std::lock_guard<std::mutex> l(mu_);
  return threads_;
}

// ---- Waiter ----

Deferred* Offload::Waiter::take() {
  if (taken_) return nullptr;  // one filter holds a request at a time
  taken_ = true;
  return this;
}

void Offload::Waiter::then(Then* t) {
  t->next_then = nullptr;
  (tail_ ? tail_->next_then : hooks_) = t;
  tail_ = t;
}

void Offload::Waiter::resume(Continuation& k) {
  size_t got = 0;
  const Status s = k.run(data_, &got);  // (before reading got)
  complete(s, got);
}

void Offload::Waiter::finish(Status s, size_t got) { complete(s, got); }

void Offload::Waiter::run_hooks() {
  for (Then* t = hooks_; t;) {
    Then* next = t->next_then;  // t may be gone once it ran
    s_ = t->then(s_, data_, &got_);
    t = next;
  }
  hooks_ = tail_ = nullptr;
}

void Offload::Waiter::complete(Status s, size_t got) {
  s_ = s;
  got_ = got;
  if (parties_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;  // wait() runs the hooks
  run_hooks();
  std::lock_guard<std::mutex> l(mu_);
  done_ = true;
  cv_.notify_one();  // under the lock: the waiter (and this object) may be gone after it
}

Status Offload::Waiter::wait(Status s, size_t* got) {
  if (!s.deferred() || !taken_) {
    if (s.deferred()) s = Status::Error(EIO, "a filter answered Deferred for a request it had not taken");
    s_ = s;
    run_hooks();  // none, unless a filter registered one for a request nobody took
    *got = got_;
    return s_;
  }
  if (parties_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    run_hooks();  // it completed before the call below was back out
  } else {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
  }
  *got = got_;
  if (s_.deferred()) return Status::Error(EIO, "a filter deferred a request it had resumed");
  return s_;
}

}  // namespace iofilterfs

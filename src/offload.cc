// A filter's own threads for requests it carries to the end; see offload.h.
#include "offload.h"

#include <chrono>
#include <new>
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

bool Offload::take(const Io& io, bool is_write, size_t len, uint64_t off, uint32_t tag) {
  if (!io.defer) return false;
  {
    // Counted before anything is taken, so that a release() that begins meanwhile waits for
    // this request too (it is queued after the release looked).
    std::lock_guard<std::mutex> l(mu_);
    if (released_ || stopping_) return false;
    ++outstanding_;
  }
  Job* j = new (std::nothrow) Job;
  Deferred* d = j ? io.defer->take() : nullptr;
  if (!d) {
    delete j;
    std::lock_guard<std::mutex> l(mu_);
    if (--outstanding_ == 0) done_cv_.notify_all();
    return false;
  }
  j->pool = this;
  j->request = d;
  j->len = len;
  j->off = off;
  j->tag = tag;
  j->is_write = is_write;
  j->direct = io.direct;
  std::lock_guard<std::mutex> l(mu_);
  (tail_ ? tail_->next : head_) = j;
  tail_ = j;
  ++queued_;
  ++taken_;
  if (queued_ > idle_ && threads_ < max_threads_) {
    ++threads_;
    std::thread([this] { loop(); }).detach();  // stop() waits for threads_ to reach 0
  }
  if (idle_) work_cv_.notify_one();
  return true;
}

void Offload::loop() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    while (!head_) {
      if (stopping_) {
        --threads_;
        done_cv_.notify_all();
        return;  // touches nothing of the pool after the lock goes
      }
      ++idle_;
      const bool woke = work_cv_.wait_for(l, kIdleExit) == std::cv_status::no_timeout;
      --idle_;
      if (!woke && !head_) {
        --threads_;
        done_cv_.notify_all();
        return;
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

}  // namespace iofilterfs

#include "disk.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "buffers.h"
#include "json.h"
#include <time.h>

namespace iofilterfs {
namespace {

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace

Status Disk::open(int path_fd, const std::string& relpath, const DiskOptions& opt, std::shared_ptr<Disk>* out,
                  std::string* err) {
  std::shared_ptr<Disk> d(new Disk());
  d->relpath_ = relpath;
  d->policy_ = opt.policy;
  Status s = Backing::open(path_fd, opt.read_only, &d->backing_);
  if (!s.ok()) {
    *err = s.what ? s.what : "backing open failed";
    return s;
  }
  uint64_t fsize = 0;
  s = d->backing_->size(&fsize);
  if (!s.ok()) {
    *err = s.what;
    return s;
  }
  d->image_ = detect_image_fd(d->backing_->fd(), fsize);

  Layer* bottom = d->backing_.get();
  if (opt.fault_injection) {
    d->fault_ = std::make_unique<FaultLayer>();
    d->fault_->set_next(bottom);
    bottom = d->fault_.get();
  }
  if (opt.raw_view) {
    std::string reason;
    if (d->image_.format == "qcow2") {
      format::Qcow2Options qo;
      qo.read_only = opt.read_only;
      qo.path = opt.image_path;
      qo.backing_root = opt.backing_root;
      s = format::Qcow2::open(bottom, qo, &d->qcow2_, err);
      if (!s.ok()) return s;
      d->format_ = d->qcow2_.get();
      d->format_read_only_ = d->qcow2_->read_only();
      reason = d->qcow2_->info().read_only_reason;
      d->image_.virtual_size = d->qcow2_->info().virtual_size;
    } else if (d->image_.format == "vmdk") {
      format::VmdkOptions vo;
      vo.read_only = opt.read_only;
      vo.path = opt.image_path;
      vo.backing_root = opt.backing_root;
      s = format::Vmdk::open(bottom, vo, &d->vmdk_, err);
      if (!s.ok()) return s;
      d->format_ = d->vmdk_.get();
      d->format_read_only_ = d->vmdk_->read_only();
      reason = d->vmdk_->read_only_reason();
      d->image_.virtual_size = d->vmdk_->virtual_size();
    } else {
      *err = "the raw view needs a qcow2 or VMDK image, this is " + d->image_.format;
      return Status::Error(EMEDIUMTYPE, "raw view: unsupported format");
    }
    if (d->format_read_only_ && !opt.read_only) spdlog::warn("{}: raw view is read-only: {}", relpath, reason);
    bottom = d->format_;
  }
  d->bottom_ = bottom;
  s = Chain::build(opt.registry ? *opt.registry : Registry::instance(), opt.filters, bottom, &d->chain_, err);
  if (!s.ok()) return s;
  d->top_ = d->chain_.top();
  d->offer_ = d->chain_.defers();

  d->info_ = DiskInfo{relpath, d->format_ ? std::string("raw") : d->image_.format,
                      opt.read_only || d->format_read_only_};
  // Open bottom-up so each filter's child is ready when it opens; undo on failure.
  s = d->chain_.open_all(d->info_, err);
  if (!s.ok()) return s;
  *out = std::move(d);
  return Status::Ok();
}

Disk::~Disk() {
  if (!closed_) (void)close();
}

Status Disk::attach(bool writable, bool direct) {
  if (writable && format_read_only_)
    return Status::Error(EROFS, "raw view: the image opened read-only (see the log)");
  Status s = backing_->lock(writable ? Backing::LockMode::Exclusive : Backing::LockMode::Shared);
  if (!s.ok()) return s;
  if (direct) {
    bool fell_back = false;
    s = backing_->enable_direct(&fell_back);
    if (!s.ok()) return s;
    if (fell_back) spdlog::warn("{}: backing filesystem has no O_DIRECT; direct opens are served buffered", relpath_);
  }
  ++handles_;
  return Status::Ok();
}

bool Disk::detach() { return --handles_ == 0; }

// ---- deferred requests (filter.h, "Deferring") ----

// A deferred read or write: its own buffer (the Pending lives at its end: one allocation), its
// disk (kept alive), the caller's completion, and the filters' completion hooks (filter.h,
// "Completion hooks"). It completes when two parties are done: the thread that finished it
// below (resume/finish) and the worker it arrived on, once that is back out of the chain with
// its Deferred answer (and so has registered every hook). The last of the two runs the hooks,
// inside the disk, and answers.
class Disk::Pending final : public Deferred {
 public:
  Pending(std::shared_ptr<Disk> d, bool is_write, void* buf, size_t len, uint64_t t0, Completion done)
      : disk_(std::move(d)), is_write_(is_write), buf_(buf), len_(len), t0_(t0), done_(done) {}

  void* data() override { return buf_; }

  void resume(Continuation& k) override {
    size_t got = 0;
    bool last;
    if (is_write_) {
      Modifying in(*disk_);  // as a new write: waits out a quiesce
      const Status s = k.run(buf_, &got);  // (before reading got: argument order is unspecified)
      last = completed(s, got);
      if (last) run_hooks();
    } else {
      Inside in(disk_->plumbing_);
      const Status s = k.run(buf_, &got);
      last = completed(s, got);
      if (last) run_hooks();
    }
    if (last) answer();
  }

  void finish(Status s, size_t got) override {
    if (!completed(s, got)) return;
    if (hooks_) {
      Inside in(disk_->plumbing_);
      run_hooks();
    }
    answer();
  }

  // The worker's side: its chain answered Deferred, with these hooks registered (bottom-up).
  // True when the request had completed already: then the caller, still inside the disk,
  // runs the hooks (run_hooks) and, once out, answers (answer).
  bool returned(Then* hooks) {
    hooks_ = hooks;
    return parties_.fetch_sub(1, std::memory_order_acq_rel) == 1;
  }
  void run_hooks() {
    for (Then* t = hooks_; t;) {
      Then* next = t->next_then;  // t may be gone once it ran
      s_ = t->then(s_, buf_, &got_);
      t = next;
    }
    hooks_ = nullptr;
  }
  void answer() {
    Status s = s_;
    if (s.deferred()) s = Status::Error(EIO, "a filter deferred a request it had resumed");
    const size_t n = is_write_ ? len_ : got_;
    disk_->account(is_write_, s, n, t0_);
    done_.fn(done_.ctx, s, buf_, n);
    std::shared_ptr<Disk> d = std::move(disk_);
    void* const mem = buf_;  // this Pending lives in the same allocation (Offer::take)
    this->~Pending();
    std::free(mem);
    d->deferred_done();  // close() may go on; `d` is not the last reference (see close())
  }

 private:
  // The finishing thread's side: true when the worker is back already (see returned()).
  bool completed(Status s, size_t got) {
    s_ = s;
    got_ = got;
    return parties_.fetch_sub(1, std::memory_order_acq_rel) == 1;
  }

  std::shared_ptr<Disk> disk_;
  const bool is_write_;
  void* const buf_;
  const size_t len_;
  const uint64_t t0_;
  const Completion done_;
  std::atomic<int> parties_{2};  // the finishing thread and the worker
  Status s_;                     // the answer from below, then from each hook
  size_t got_ = 0;
  Then* hooks_ = nullptr;        // set by the worker before its party is done
};

// Offered to the chain in Io::defer by a read or write that has a completion.
class Disk::Offer final : public Deferrer {
 public:
  Offer(Disk& d, bool is_write, const void* data, size_t len, uint64_t t0, const Completion* done)
      : d_(d), is_write_(is_write), data_(data), len_(len), t0_(t0), done_(done) {}

  Deferred* take() override {
    if (pending_) return nullptr;  // one filter holds a request at a time
    // One allocation: the buffer (aligned for O_DIRECT below) with the Pending after it.
    const size_t at = (len_ + alignof(Pending) - 1) / alignof(Pending) * alignof(Pending);
    void* mem = nullptr;
    if (posix_memalign(&mem, kBufferAlign, at + sizeof(Pending)) != 0) return nullptr;
    if (is_write_ && len_) std::memcpy(mem, data_, len_);  // the worker's buffer is reused
    Pending* p = new (static_cast<char*>(mem) + at) Pending(d_.shared_from_this(), is_write_, mem, len_, t0_, *done_);
    {
      std::lock_guard<std::mutex> g(d_.def_mu_);
      ++d_.deferred_;
    }
    pending_ = p;
    return p;
  }
  void then(Then* t) override {
    t->next_then = nullptr;
    (hooks_tail_ ? hooks_tail_->next_then : hooks_) = t;
    hooks_tail_ = t;
  }
  bool taken() const { return pending_ != nullptr; }

  // After the chain answered (inside the disk). `s` Deferred: the worker's party of the
  // Pending; true when the caller must answer it (answered(), once out of the disk). A hook
  // registered for a request that was never taken runs now with the error it ends with.
  bool chain_returned(Status* s) {
    if (s->deferred() && pending_) {
      if (!pending_->returned(hooks_)) return false;
      pending_->run_hooks();
      return true;
    }
    for (Then* t = hooks_; t;) {
      Then* next = t->next_then;
      size_t got = 0;
      *s = t->then(*s, nullptr, &got);
      t = next;
    }
    hooks_ = nullptr;
    return false;
  }
  void answer() { pending_->answer(); }

 private:
  Disk& d_;
  const bool is_write_;
  const void* const data_;
  const size_t len_;
  const uint64_t t0_;
  const Completion* const done_;
  Pending* pending_ = nullptr;
  Then *hooks_ = nullptr, *hooks_tail_ = nullptr;
};

void Disk::account(bool is_write, Status s, size_t bytes, uint64_t t0) {
  if (!s.ok()) {
    stats_.errors.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  (is_write ? stats_.writes : stats_.reads).fetch_add(1, std::memory_order_relaxed);
  (is_write ? stats_.write_bytes : stats_.read_bytes).fetch_add(bytes, std::memory_order_relaxed);
  (is_write ? stats_.write_lat : stats_.read_lat).record(now_ns() - t0);
}

void Disk::deferred_done() {
  std::lock_guard<std::mutex> g(def_mu_);
  if (--deferred_ == 0) def_cv_.notify_all();
}

uint64_t Disk::deferred() const {
  std::lock_guard<std::mutex> g(def_mu_);
  return deferred_;
}

void Disk::release_deferred() {
  // Bottom up: a filter that carries its requests on threads of its own (offload.h) sends them
  // into the filters below it, which by then let everything through at once.
  chain_.for_each_bottom_up([](Filter& f, const FilterInfo&) { f.release_deferred(); });
}

void Disk::defer_again() {
  chain_.for_each([](Filter& f, const FilterInfo&) { f.defer_again(); });
}

namespace {

// A filter that answered Deferred must have taken the request; one that did not is a bug, and
// the request fails rather than going unanswered.
Status checked(Status s, bool taken) {
  if (s.deferred() && !taken) return Status::Error(EIO, "a filter deferred a request without taking it");
  return s;
}

}  // namespace

Status Disk::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got, const Completion* done) {
  uint64_t t0 = now_ns();
  Offer offer(*this, false, nullptr, len, t0, done);
  Io req = io;
  Status s;
  bool answer = false;
  {
    Inside in(plumbing_);
    req.defer = done && done->fn && offer_ ? &offer : nullptr;
    s = top_->read(req, buf, len, off, got);
    s = checked(s, offer.taken());  // (after the call: argument order is unspecified)
    answer = offer.chain_returned(&s);
  }
  if (answer) offer.answer();  // it completed before this thread was back: answered here
  if (s.deferred()) return s;  // counted when it completes
  account(false, s, s.ok() ? *got : 0, t0);
  return s;
}

Status Disk::write(const Io& io, const void* buf, size_t len, uint64_t off, const Completion* done) {
  uint64_t t0 = now_ns();
  Offer offer(*this, true, buf, len, t0, done);
  Io req = io;
  Status s;
  bool answer = false;
  {
    Modifying in(*this);
    req.defer = done && done->fn && offer_ ? &offer : nullptr;
    s = top_->write(req, buf, len, off);
    s = checked(s, offer.taken());
    answer = offer.chain_returned(&s);
  }
  if (answer) offer.answer();
  if (s.deferred()) return s;
  account(true, s, len, t0);
  return s;
}

Status Disk::sync(const Io& io, bool datasync) {
  Inside in(plumbing_);
  Status s = top_->sync(io, datasync);
  (s.ok() ? stats_.syncs : stats_.errors).fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status Disk::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  Modifying in(*this);
  Status s = top_->fallocate(io, mode, off, len);
  (s.ok() ? stats_.trims : stats_.errors).fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status Disk::resize(const Io& io, uint64_t size) {
  Modifying in(*this);
  Status s = top_->resize(io, size);
  if (!s.ok()) stats_.errors.fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status Disk::seek(const Io& io, uint64_t off, int whence, uint64_t* result) {
  Inside in(plumbing_);
  return top_->seek(io, off, whence, result);
}

Status Disk::size(uint64_t* out) {
  Inside in(plumbing_);
  return top_->size(out);
}

Status Disk::replumb(const std::string& policy, const std::vector<FilterSpec>& filters, const Registry& registry,
                     std::string* err) {
  std::lock_guard<std::mutex> g(control_mu_);
  if (closed_) return Status::Error(EBADF, "disk is closed");
  ChainPlan plan;
  Status s = chain_.plan(registry, filters, &plan, err);  // prepare: nothing running is touched
  if (!s.ok()) return s;
  // Filters that can take their new parameters in place do, while requests keep flowing (a
  // throttle keeps its queue and reschedules it under the new limits); only what is left needs
  // the chain stopped.
  chain_.retune(&plan);
  if (!plan.changes()) {
    policy_ = policy;
    return Status::Ok();
  }
  for (Filter* f : chain_.removed_outright(plan)) {
    std::string why = f->removal_refused();
    if (!why.empty()) {
      *err = why;
      chain_.untune(&plan);
      return Status::Error(EBUSY);
    }
  }
  // No request stays deferred in a filter across a change of the filters around it: what they
  // hold goes down now, through the chain it was admitted to (filter.h, "Deferring").
  release_deferred();
  std::vector<std::unique_ptr<Filter>> removed;
  {
    std::lock_guard<RwLock> excl(plumbing_);  // in-flight requests drain; new ones wait
    // Filters that leave hand their data down first (a write-back cache destages).
    for (Filter* f : chain_.leaving(plan)) {
      s = f->drain();
      if (!s.ok()) {
        *err = std::string("a filter being removed could not drain: ") + (s.what ? s.what : std::strerror(s.err));
        chain_.untune(&plan);
        defer_again();
        return s;  // abort: the plan's fresh filters are dropped, the old chain stays
      }
    }
    std::vector<Filter*> opened;
    std::string oerr;
    s = chain_.open_arriving(plan, bottom_, info_, &opened, &oerr);
    if (!s.ok()) {
      for (auto it = opened.rbegin(); it != opened.rend(); ++it) {
        (*it)->release_below(true);  // never linked: its threads must not wait for that
        (*it)->close();
      }
      *err = "a new filter could not open: " + oerr;
      chain_.untune(&plan);
      defer_again();
      return s;
    }
    chain_.commit(std::move(plan), bottom_, &removed);
    top_ = chain_.top();
    offer_ = chain_.defers();
    policy_ = policy;
  }
  defer_again();  // the filters of the new chain
  for (auto& f : removed) {
    f->shutdown();
    f->close();
  }
  return Status::Ok();
}

Disk::Modifying::Modifying(Disk& d) : d_(d) {
  d_.plumbing_.lock_shared();
  while (d_.quiesced_.load(std::memory_order_acquire)) {
    d_.plumbing_.unlock_shared();
    d_.wait_resume();
    d_.plumbing_.lock_shared();
  }
}

void Disk::wait_resume() {
  std::unique_lock<std::mutex> l(q_mu_);
  while (quiesced_.load()) {
    if (q_cv_.wait_until(l, q_deadline_) == std::cv_status::timeout && quiesced_.load() &&
        std::chrono::steady_clock::now() >= q_deadline_) {
      quiesced_.store(false);
      spdlog::warn("{}: quiesce timed out; writes resume", relpath_);
      q_cv_.notify_all();
    }
  }
}

Status Disk::quiesce_locked(std::chrono::seconds timeout) {
  {
    std::lock_guard<std::mutex> l(q_mu_);
    q_deadline_ = std::chrono::steady_clock::now() + timeout;
    quiesced_.store(true);
  }
  // Let the writes already inside the chain finish; later ones wait on the flag.
  plumbing_.lock();
  plumbing_.unlock();
  Status s = Status::Ok();
  chain_.for_each([&](Filter& f, const FilterInfo&) {
    if (s.ok()) s = f.quiesce();
  });
  if (s.ok()) s = format_ ? format_->sync(Io{}, false) : backing_->sync(Io{}, false);
  if (!s.ok()) (void)resume_locked();
  return s;
}

Status Disk::resume_locked() {
  chain_.for_each([&](Filter& f, const FilterInfo&) { f.resume(); });
  std::lock_guard<std::mutex> l(q_mu_);
  quiesced_.store(false);
  q_cv_.notify_all();
  return Status::Ok();
}

Status Disk::quiesce(std::chrono::seconds timeout) {
  std::lock_guard<std::mutex> g(control_mu_);
  if (quiesced()) return Status::Error(EALREADY, "already quiesced");
  return quiesce_locked(timeout);
}

Status Disk::resume() {
  std::lock_guard<std::mutex> g(control_mu_);
  return resume_locked();
}

Status Disk::snapshot(const std::string& name) {
  std::lock_guard<std::mutex> g(control_mu_);
  const bool was_quiesced = quiesced();
  if (!was_quiesced) {
    Status s = quiesce_locked(std::chrono::seconds(60));
    if (!s.ok()) return s;
  }
  Status s = Status::Ok();
  int keepers = 0;
  chain_.for_each([&](Filter& f, const FilterInfo&) {
    if (s.ok()) s = f.snapshot(name);
    ++keepers;
  });
  if (!was_quiesced) (void)resume_locked();
  if (s.ok()) spdlog::info("{}: snapshot '{}' taken ({} filters told)", relpath_, name, keepers);
  return s;
}

bool Disk::quiesced() const {
  std::lock_guard<std::mutex> l(q_mu_);
  return quiesced_.load() && std::chrono::steady_clock::now() < q_deadline_;
}

std::string Disk::policy() const {
  std::lock_guard<std::mutex> g(control_mu_);
  return policy_;
}

Status Disk::flush() {
  std::lock_guard<std::mutex> g(control_mu_);
  Status s = Status::Ok();
  // Top first: what an upper filter drains lands in the filters below before they drain.
  chain_.for_each([&](Filter& f, const FilterInfo&) {
    if (s.ok()) s = f.drain();
  });
  if (!s.ok()) return s;
  return format_ ? format_->sync(Io{}, false) : backing_->sync(Io{}, false);
}

Status Disk::close() {
  std::lock_guard<std::mutex> g(control_mu_);
  if (closed_) return Status::Ok();
  // Deferred requests go down now, while every filter is still open, and are answered.
  release_deferred();
  Status first = Status::Ok();
  chain_.for_each([&](Filter& f, const FilterInfo& info) {
    Status s = f.drain();
    if (!s.ok()) {
      spdlog::error("{}: filter {} could not drain on close: {}", relpath_, info.name,
                    s.what ? s.what : std::strerror(s.err));
      if (first.ok()) first = s;
    }
    f.shutdown();
    f.close();
  });
  if (format_) {  // the decoded image's metadata reaches the file in its safe order
    Status s = format_->sync(Io{}, false);
    if (!s.ok()) {
      spdlog::error("{}: raw view could not write its metadata on close: {}", relpath_, s.what ? s.what : "");
      if (first.ok()) first = s;
    }
  }
  {
    // A filter that failed to release its requests still answers them; nothing is left
    // unanswered when the disk goes. (A deferred request holds a reference to the disk, but the
    // datastore's outlives it: the last reference never goes on the resuming thread.)
    std::unique_lock<std::mutex> l(def_mu_);
    if (deferred_) spdlog::warn("{}: waiting for {} deferred requests", relpath_, deferred_);
    def_cv_.wait(l, [&] { return deferred_ == 0; });
  }
  closed_ = true;
  return first;
}

Status Disk::apply_fault_plan(const FaultPlan& plan) {
  if (!fault_) return Status::Error(ENOTSUP, "fault injection is off (start with --fault-injection)");
  std::lock_guard<std::mutex> g(control_mu_);
  return fault_->apply(plan);
}

std::string Disk::state() const {
  std::lock_guard<std::mutex> g(control_mu_);
  if (!failed_reason_.empty()) return "failed: " + failed_reason_;
  std::string degraded;
  chain_.for_each([&](const Filter& f, const FilterInfo&) {
    std::string r = f.degraded_reason();
    if (!r.empty()) degraded += (degraded.empty() ? "" : ", ") + r;
  });
  if (!degraded.empty()) return "degraded: " + degraded;
  return quiesced() ? "quiesced" : "active";
}

std::string Disk::chain_description() const {
  std::lock_guard<std::mutex> g(control_mu_);
  return chain_.describe();
}

uint64_t Disk::dirty_bytes() const {
  std::lock_guard<std::mutex> g(control_mu_);
  uint64_t n = 0;
  chain_.for_each([&](const Filter& f, const FilterInfo&) { n += f.dirty_bytes(); });
  return n;
}

uint64_t Disk::replica_lag_bytes() const {
  std::lock_guard<std::mutex> g(control_mu_);
  uint64_t n = 0;
  chain_.for_each([&](const Filter& f, const FilterInfo&) { n += f.replica_lag_bytes(); });
  return n;
}

std::string Disk::stats_json() const {
  std::lock_guard<std::mutex> g(control_mu_);
  std::string s = "{\"path\":" + json_str(relpath_) + "," + stats_.json() + ",\"deferred\":" +
                  std::to_string(deferred()) + ",\"filters\":{";
  bool first = true;
  chain_.for_each([&](const Filter& f, const FilterInfo& info) {
    if (!first) s += ",";
    first = false;
    s += "\"" + info.name + "\":" + f.stats_json();
  });
  return s + "}}";
}

}  // namespace iofilterfs
